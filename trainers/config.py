"""Typed, validated run configuration.

Defaults live in these dataclasses; YAML files in configs/ and `--set key=value` only override
them. A model's own hyper-parameters (`model.bmvae_m`, ...) are the frozen dataclasses declared
beside the model, which hold their defaults and checks. Unknown keys, wrong types and values out
of range are UserErrors naming the dotted key. The resolved config is
written to RUN/config.yaml in full, so a run can be reproduced and resumed from it alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any, Mapping

import yaml

from bmvae_tf import custom_networks
from bmvae_tf import networks as networks_lib
from bmvae_tf.errors import UserError
from bmvae_tf.models import (MODELS, BMVAEMHyperParameters, BMVAEPHyperParameters, HyperParameterError,
                             MMVAEHyperParameters, ModalitySpecificHyperParameters)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


@dataclasses.dataclass
class ModelConfig:
    name: str = "bmvae_m"
    latent_dim: int = 20
    K: int = 1
    # gaussian | laplace | auto: the family of experts and prior. auto resolves to the model's
    # default (laplace for mixtures as in Shi et al., gaussian for products of experts).
    posterior: str = "auto"
    likelihood_scale: float = 0.75
    hidden_units: list[int] = dataclasses.field(default_factory=lambda: [400])
    channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128])
    sequence_width: int = 128
    networks: dict[str, str] = dataclasses.field(default_factory=dict)  # modality -> networks.NETWORKS
    # modality -> weight of its log-likelihood; replaces the manifest's likelihood_weight.
    likelihood_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Learn the prior's scale per latent dimension (Shi et al.'s --learn-prior), for every model.
    learn_prior: bool = False
    # The models' own hyper-parameters: each section is the dataclass its models declare
    # (`hyper_parameter_sections()`), with its defaults and checks, and goes to every model that
    # reads it (bmvae_m to bmvae_m and bmvae_m_uniform, mmvae to mmvae, mmvae_tight and mmvae_ms).
    bmvae_m: BMVAEMHyperParameters = dataclasses.field(default_factory=BMVAEMHyperParameters)
    bmvae_p: BMVAEPHyperParameters = dataclasses.field(default_factory=BMVAEPHyperParameters)
    mmvae: MMVAEHyperParameters = dataclasses.field(default_factory=MMVAEHyperParameters)
    ms: ModalitySpecificHyperParameters = dataclasses.field(default_factory=ModalitySpecificHyperParameters)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # the global batch, over all replicas
    learning_rate: float = 1e-3
    amsgrad: bool = False
    strategy: str = "auto"
    seed: int = 0
    shuffle_buffer: int = 10000
    log_every_steps: int = 100
    # TensorBoard's pictures (mixture weights, cross generation, prior samples) every N epochs
    # and after the last one (0: after the last only). Drawing them costs seconds on a CPU,
    # more than a whole epoch of a small dataset (1.5 s of training against ~10 s of pictures
    # per epoch on a six-view vector set, 2 cores).
    images_every_epochs: int = 5
    checkpoints_to_keep: int = 3
    # A checkpoint every N steps as well as at each epoch's end (0: epochs only); a rerun after
    # a crash or kill -9 resumes from the exact step and loses at most N steps.
    checkpoint_every_steps: int = 500
    # Early stopping on the validation loss: stop after this many epochs without an improvement
    # of more than min_delta (0: off); evaluate and export then use the best epoch's weights.
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    # Without a `validation` split, hold out this fraction of the training records (chosen by a
    # hash of each record, so the choice does not depend on sharding or order) for validation.
    validation_fraction: float = 0.0
    deterministic: bool = False  # tf.config.experimental.enable_op_determinism()
    mixed_precision: bool = False  # mixed_float16 with dynamic loss scaling (for GPUs)
    # XLA-compile the loss and gradient computation: true, false, or null (auto: on for runs of
    # at least JIT_MIN_STEPS steps, off for shorter ones, whose compilation costs more than XLA
    # saves, and off with `deterministic`, as not every op has a deterministic XLA kernel).
    # Measured on 2 CPU cores (README, Performance): XLA is 1.5-2.1x faster on the digits
    # networks (configs/digits sets null), but 0.3-1.1x on the MNIST-SVHN(-Text) conv nets, so
    # the default is off. On GPUs, measure with bench/train_step.py --jit-datasets.
    jit_compile: bool | None = False
    # Modality dropout (issue 16): during training each example, with this probability, hides a
    # random non-empty proper subset of its observed modalities (how many uniform on 1 .. n - 1,
    # which ones uniform), through the same `present` mask as missing data. 0: off.
    modality_dropout: float = 0.0
    # Multi-worker runs: how long a worker waits for every peer of TF_CONFIG's cluster to start,
    # logging the ones it waits for, before it exits 2 naming them.
    cluster_timeout_s: float = 300.0


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 256
    classifier_epochs: int = 5
    random_samples: int = 1000
    log_likelihood_samples: int = 1000  # K of the IWAE estimate; the paper uses 1000
    log_likelihood_examples: int = 500  # test examples the estimates average over (0: all of them)
    max_examples: int = 0  # 0: every example of each split
    # Robustness (trainers/robustness.py): MultiBench's noise levels 0, 0.1, ..., 1.0, and how many
    # train examples the raw-input baseline probe is fitted on (0: no baseline, no effective
    # robustness).
    robustness_noise_levels: list[float] = dataclasses.field(
        default_factory=lambda: [i / 10 for i in range(11)])
    robustness_baseline_examples: int = 5000
    # Keep what depends on the data and the seed alone (the coherence classifiers, the raw-input
    # robustness baseline) in the dataset cache, $BMVAE_CACHE_DIR or ~/.cache/bmvae, for every
    # later run evaluated on the same data (trainers/evaluation/dataset_cache.py).
    shared_cache: bool = True


@dataclasses.dataclass
class DataConfig:
    dir: str = ""
    # Re-draw the text padding on every read in training (Sutter et al.); null: the dataset's
    # default, on for mnist-svhn-text (its manifest's text_padding), off elsewhere.
    dynamic_text_padding: bool | None = None


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        m, t = self.model, self.train
        if m.name not in MODELS:
            raise UserError(f"model.name: unknown model {m.name!r}; choose one of {sorted(MODELS)}")
        _check(m.latent_dim >= 1, "model.latent_dim must be >= 1")
        _check(m.K >= 1, "model.K must be >= 1")
        families = MODELS[m.name][0].POSTERIOR_FAMILIES
        m.posterior = resolve_posterior(m)  # written back, so config.yaml names the family used
        _check(m.posterior in families,
               f"model.posterior: {m.name} supports {' or '.join(families)} experts, not {m.posterior!r}")
        _check(m.likelihood_scale > 0, "model.likelihood_scale must be positive")
        _check(all(n in networks_lib.NETWORKS or custom_networks.is_factory_name(n)
                   for n in m.networks.values()),
               f"model.networks values must be one of {', '.join(networks_lib.NETWORKS)} or a "
               f"\"module:factory\" name")
        _check(all(w > 0 for w in m.likelihood_weights.values()),
               "model.likelihood_weights values must be positive")
        _check(t.epochs >= 0, "train.epochs must be >= 0")
        _check(t.batch_size >= 1, "train.batch_size must be >= 1")
        _check(t.learning_rate > 0, "train.learning_rate must be positive")
        _check(t.seed >= 0, "train.seed must be >= 0")
        _check(t.shuffle_buffer >= 1, "train.shuffle_buffer must be >= 1 (1: no shuffling)")
        _check(t.cluster_timeout_s > 0, "train.cluster_timeout_s must be positive")
        _check(t.strategy in STRATEGIES, f"train.strategy must be one of {STRATEGIES}")
        _check(t.log_every_steps >= 1, "train.log_every_steps must be >= 1")
        _check(t.images_every_epochs >= 0, "train.images_every_epochs must be >= 0 (0: after the last epoch only)")
        _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0")
        _check(t.checkpoints_to_keep >= 1, "train.checkpoints_to_keep must be >= 1")
        _check(t.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0")
        _check(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta must be >= 0")
        _check(0 <= t.validation_fraction < 1, "train.validation_fraction must be in [0, 1)")
        _check(0 <= t.modality_dropout <= 1, "train.modality_dropout must be in [0, 1] (a probability)")
        e = self.eval
        _check(e.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(e.classifier_epochs >= 1, "eval.classifier_epochs must be >= 1")
        _check(e.random_samples >= 0, "eval.random_samples must be >= 0")
        _check(e.log_likelihood_samples >= 1, "eval.log_likelihood_samples must be >= 1")
        _check(e.log_likelihood_examples >= 0, "eval.log_likelihood_examples must be >= 0")
        _check(e.max_examples >= 0, "eval.max_examples must be >= 0 (0: every example)")
        levels = self.eval.robustness_noise_levels
        _check(len(levels) >= 2 and levels[0] >= 0 and all(b > a for a, b in zip(levels, levels[1:])),
               "eval.robustness_noise_levels must be at least two increasing levels >= 0")
        _check(self.eval.robustness_baseline_examples >= 0, "eval.robustness_baseline_examples must be >= 0")


# Runs of at least this many steps are XLA-compiled under `train.jit_compile: null`: the digits
# demo config gains ~11 ms a step from XLA and pays ~5 s more compilation, even after ~500 steps.
JIT_MIN_STEPS = 1000


def resolve_jit_compile(train_config: TrainConfig, total_steps: int) -> bool:
    """`train.jit_compile`, with null (auto) resolved for a run of `total_steps` steps."""
    if train_config.jit_compile is not None:
        return train_config.jit_compile
    return not train_config.deterministic and total_steps >= JIT_MIN_STEPS


def resolve_posterior(model_config: ModelConfig) -> str:
    """`auto` -> the model's default expert family; any other value is returned as it is."""
    if model_config.posterior != "auto":
        return model_config.posterior
    return MODELS[model_config.name][0].POSTERIOR_FAMILIES[0]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


# ------------------------------------------------------------------------------------ (de)serialise


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    config = _build(Config, data, prefix="", source=source)
    config.validate()
    return config


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown config key {prefix + unknown[0]!r} "
                        f"(known under {prefix.rstrip('.') or 'top level'}: {sorted(fields)})")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, prefix + name, source)
    try:
        return cls(**values)
    except HyperParameterError as e:  # a model's dataclass checks its values; name the config key
        raise UserError(f"{source}: {prefix}{e}") from None


def _coerce(hint, value, key: str, source: str):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, source)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise UserError(f"{source}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(item, v, f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def load_yaml(path: str) -> dict:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: config file not found")
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            data = yaml.safe_load(f.read())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping at the top level")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict:
    """`key.sub=value` overrides; values are parsed as YAML scalars (so 1e-3, true, [1, 2] work)."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Deep merge: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ------------------------------------------------------------------------------------ the model


def build_model(model_config: ModelConfig, modalities):
    """The configured model for the manifest's modalities (constructed, not yet built)."""
    names = [m.name for m in modalities]
    unknown = sorted(set(model_config.likelihood_weights) - set(names))
    if unknown:
        raise UserError(f"model.likelihood_weights: no modality {unknown[0]!r} in the dataset {names}")
    modalities = [dataclasses.replace(m, likelihood_weight=model_config.likelihood_weights[m.name])
                  if m.name in model_config.likelihood_weights else m for m in modalities]
    cls, fixed = MODELS[model_config.name]
    kwargs = dict(
        posterior=resolve_posterior(model_config),
        likelihood_scale=model_config.likelihood_scale, networks=dict(model_config.networks),
        hidden_units=tuple(model_config.hidden_units), channels=tuple(model_config.channels),
        sequence_width=model_config.sequence_width, learn_prior=model_config.learn_prior,
    )
    if cls.IMPORTANCE_SAMPLED:
        kwargs["K"] = model_config.K
    for section in cls.hyper_parameter_sections():
        kwargs.update(dataclasses.asdict(getattr(model_config, section)))
    kwargs.update(fixed)
    return cls(list(modalities), model_config.latent_dim, name=model_config.name, **kwargs)
