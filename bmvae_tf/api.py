"""The Python API: build a model, read a dataset, train with Keras, load a run, evaluate.

    import bmvae_tf
    model = bmvae_tf.build_model("bmvae_m", "data/digits", latent_dim=20)
    model.compile(optimizer="adam")
    model.fit(bmvae_tf.load_dataset("data/digits", "train", 128, shuffle=True), epochs=5)
    bmvae_tf.evaluate(model, "data/digits", metrics=["latent_accuracy"])

Every function here is what the CLI uses underneath: `build_model` the trainer's model factory
(`trainers/config.py`, with the same defaults and checks as a config file), `load_dataset` the
trainer's `tf.data` pipeline (`trainers/input_pipeline.py`), `load_run` the loader of
`bmvae evaluate` (`trainers/run_dir.py`), `evaluate` the stages of `bmvae evaluate`
(`trainers/evaluation/`). Bad arguments are `bmvae_tf.errors.UserError`s (a ValueError) naming
the argument. `fit()` itself is `bmvae_tf.keras_fit`; custom layers `bmvae_tf.custom_networks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import keras
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.custom_networks import CustomNetworks
from bmvae_tf.errors import UserError
from bmvae_tf.models import MODELS
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir

__all__ = ["Run", "build_model", "evaluate", "load_dataset", "load_run", "modality_specs"]


def modality_specs(modalities) -> list[schema.ModalitySpec]:
    """The modality specs of a dataset directory (its manifest), a Manifest, or specs given by
    hand: ModalitySpecs or dicts with name, kind, shape, likelihood (and dtype, vocab,
    likelihood_weight as in manifest.json)."""
    if isinstance(modalities, (str, os.PathLike)):
        return list(schema.read_manifest(os.fspath(modalities)).modalities)
    if isinstance(modalities, schema.Manifest):
        return list(modalities.modalities)
    if isinstance(modalities, Mapping) or not isinstance(modalities, Sequence) or not modalities:
        raise UserError("modalities: give a dataset directory, a Manifest or a non-empty list of "
                        "modality specs (dicts with name, kind, shape, likelihood)")
    specs = []
    for i, m in enumerate(modalities):
        if isinstance(m, schema.ModalitySpec):
            m.validate()
            specs.append(m)
        elif isinstance(m, Mapping):
            specs.append(schema.ModalitySpec.from_json(dict(m), f"modalities[{i}]"))
        else:
            raise UserError(f"modalities[{i}]: {type(m).__name__} is not a ModalitySpec or a dict")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"modalities: names must be unique, got {names}")
    return specs


def _field_names(dataclass) -> set[str]:
    return {f.name for f in dataclasses.fields(dataclass)}


def _model_section(name: str, hyper_parameters: Mapping[str, Any]) -> dict:
    """The `model:` config section: shared keys as they are; a class's hyper-parameters either
    as its section (`bmvae_m={"lambda_c": 12}`) or flat (`lambda_c=12`)."""
    if name not in MODELS:
        raise UserError(f"build_model: unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name][0]
    sections = cls.hyper_parameter_sections()
    every_section = {s for model_cls, _ in MODELS.values() for s in model_cls.hyper_parameter_sections()}
    shared = {f.name for f in dataclasses.fields(config_lib.ModelConfig)} - every_section - {"name"}
    if not cls.IMPORTANCE_SAMPLED:
        shared.discard("K")
    section: dict[str, Any] = {"name": name}
    for key, value in hyper_parameters.items():
        owner = next((s for s, dc in sections.items() if key in _field_names(dc)), None)
        if key in shared or key in sections:
            section[key] = dict(value) if key in sections else value
        elif owner is not None:
            section.setdefault(owner, {})[key] = value
        else:
            known = sorted(shared | set(sections) | {f for dc in sections.values() for f in _field_names(dc)})
            raise UserError(f"build_model: {name} takes no hyper-parameter {key!r}; "
                            f"known: {', '.join(known)}")
    return section


def build_model(name: str, modalities, *, encoders: Mapping[str, keras.layers.Layer] | None = None,
                decoders: Mapping[str, keras.layers.Layer] | None = None, seed: int | None = None,
                **hyper_parameters):
    """A model of the zoo with every variable built, ready for `compile` and `fit`.

    Args:
      name: a model name (`bmvae_tf.models.MODELS`: bmvae_m, mmvae, mvae, mmjsd, ...).
      modalities: a dataset directory (its manifest.json is read), a Manifest, or specs by hand
        (`modality_specs`).
      encoders, decoders: {modality: keras layer} replacing the built-in networks; each layer
        keeps the contract of `bmvae_tf.custom_networks` (a UserError names the one that breaks it).
      seed: seeds the initial weights (keras.utils.set_random_seed), as `train.seed` does.
      **hyper_parameters: the keys of a config file's `model:` section (latent_dim, K, posterior,
        hidden_units, networks, ...; the model's own, e.g. lambda_c, flat or as their section).
    """
    specs = modality_specs(modalities)
    config = config_lib.from_dict({"model": _model_section(name, hyper_parameters)}, source="build_model")
    names = [s.name for s in specs]
    networks: dict[str, Any] = dict(config.model.networks)
    for role, layers in (("encoders", encoders or {}), ("decoders", decoders or {})):
        for modality, layer in layers.items():
            if modality not in names:
                raise UserError(f"{role}: no modality {modality!r} in {names}")
            current = networks.get(modality, "auto")
            custom = current if isinstance(current, CustomNetworks) else CustomNetworks(fallback=current)
            networks[modality] = dataclasses.replace(custom, **{role[:-1]: layer})
    config.model.networks = networks
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    model = config_lib.build_model(config.model, specs)
    model.build_variables()
    return model


def load_dataset(data_dir: str, split: str = "train", batch_size: int = 128, *, shuffle: bool = False,
                 seed: int = 0, drop_remainder: bool = False, take: int = 0) -> tf.data.Dataset:
    """The trainer's own tf.data pipeline over one split of a built dataset: batches
    {modality: [B, *shape], "label": [B], metadata..., "present": bool [B, M]} (the modalities
    observed in each row: all True unless the dataset has missing rows, whose absent values are
    zeros), which `fit`, `evaluate` and `predict` take as they are.

    shuffle: a new order each pass (each epoch of `fit`), keyed by `seed`. take: only the first
    `take` records (0: all). The dataset knows its length, so Keras shows epoch progress.
    """
    manifest = schema.read_manifest(data_dir)
    if split not in manifest.splits:
        raise UserError(f"{data_dir}: no split {split!r}; the dataset has {sorted(manifest.splits)}")
    if int(batch_size) < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    options = input_pipeline.ReadOptions(shuffle=shuffle, seed=int(seed), drop_remainder=drop_remainder)
    dataset = input_pipeline.make_dataset(manifest, split, int(batch_size), options, take=int(take))
    count = manifest.split(split).count
    count = min(count, int(take)) if take else count
    batches = count // batch_size if drop_remainder else math.ceil(count / batch_size)
    return dataset.apply(tf.data.experimental.assert_cardinality(batches))


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run: the model with its checkpoint's weights (the best one under early
    stopping, else the latest), the run's config and the dataset's manifest."""

    model: Any
    config: config_lib.Config
    manifest: schema.Manifest
    workdir: str


def load_run(workdir: str, data_dir: str | None = None) -> Run:
    """The trained model of a run directory of `bmvae train` (data_dir: where its dataset is
    now, if it moved)."""
    config, manifest, model = run_dir.load_trained_model(workdir, data_dir)
    return Run(model=model, config=config, manifest=manifest, workdir=workdir)


def metric_names() -> list[str]:
    """The stages `evaluate(metrics=...)` can run, in the order `bmvae evaluate` runs them."""
    from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib

    return [_stage_name(stage) for stage in evaluate_lib.STAGES]


def _stage_name(stage) -> str:
    return stage.run.__name__.removesuffix("_stage")


def evaluate(model, data_dir: str, *, metrics: Sequence[str] | None = None, seed: int = 0,
             cache_dir: str | None = None, **eval_settings) -> dict:
    """The metrics of `bmvae evaluate` for a model in memory on a built dataset.

    metrics: the stages to run (`metric_names()`: latent_accuracy, cross_coherence,
      log_likelihood, ...); None runs them all. seed: the base of every evaluation stream, as a
      run's train.seed. cache_dir: a run-like directory for the coherence classifiers (by
      default a temporary one). Either way the dataset cache keeps them, and the robustness
      baseline, for every later call on the same data and seed (`shared_cache=False` turns it
      off; trainers/evaluation/dataset_cache.py).
    **eval_settings: keys of a config's `eval:` section (batch_size, max_examples,
      classifier_epochs, log_likelihood_samples, ...).

    Returns the metrics dict in metrics.json's format (without a run's epochs and timings).
    """
    from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
    from bmvae_tf.trainers.evaluation.context import EvalContext
    from bmvae_tf.trainers.evaluation.metrics import Metrics

    manifest = schema.read_manifest(data_dir)
    eval_config = config_lib.from_dict({"eval": dict(eval_settings)}, source="evaluate").eval
    known = metric_names()
    chosen = known if metrics is None else list(metrics)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise UserError(f"evaluate: unknown metric {unknown[0]!r}; choose from {', '.join(known)}")
    weights = model.mixture_weights()
    weights = None if weights is None else tf.convert_to_tensor(weights).numpy().tolist()
    record = Metrics(model=model.name, dataset=manifest.name, modalities=manifest.modality_names,
                     epochs=0, seconds_per_epoch=None, mixture_weights=weights)
    with tempfile.TemporaryDirectory(prefix="bmvae-eval-") as scratch:
        context = EvalContext(model=model, manifest=manifest, eval=eval_config, seed=int(seed),
                              paths=run_dir.RunPaths(cache_dir or scratch), history=[], metrics=record)
        reason = f"dataset {manifest.name!r} declares no label"
        with input_pipeline.reading(manifest):
            for stage in evaluate_lib.STAGES:
                if _stage_name(stage) not in chosen:
                    continue
                if manifest.label is None and stage.needs_labels:
                    record.skipped.update({key: reason for key in stage.needs_labels})
                else:
                    stage.run(context)
    return record.to_json()
