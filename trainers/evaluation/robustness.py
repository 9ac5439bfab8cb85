"""Robustness in MultiBench's manner: latent accuracy under increasing input noise.

MultiBench (Liang et al., 2021; github.com/pliang279/MultiBench) tests a model at noise levels
0, 0.1, ..., 1.0 (`robustness/all_in_one.py`: `noise_level / 10` for `noise_level in
range(11)`) and summarises the accuracy curve f_0..f_L two ways (`eval_scripts/robustness.py`):

- relative robustness (`relative_robustness_helper`): the area under the curve by the
  trapezoidal rule, sum_i (f_i + f_{i+1}) * 0.1 / 2, i.e. accuracy integrated over the levels;
- effective robustness (`effective_robustness_helper`): the accuracy a method keeps beyond a
  baseline shifted to the same clean accuracy, sum_i (f_i - (b_i + f_0 - b_0)), where MultiBench's
  baseline b is its late-fusion model (LF). Across methods both are then min-max normalised
  (`maxmin_normalize`); `bmvae compare` does that (`trainers.reporting.compare`).

Our choices where MultiBench's setting does not carry over:
- the "performance" is the latent accuracy of Sect. 6.1.1: each subset's linear probe is fitted on
  clean train latents and scored on latents of noisy test inputs;
- the noise is MultiBench's white noise (`timeseries_robust.white_noise`: zero-mean Gaussian
  with standard deviation equal to the level) on images, which the data contract keeps in
  [0, 1]; vectors are unbounded (ResNet features, user arrays), so their standard deviation is
  the level times the modality's own standard deviation. Token ids cannot take Gaussian noise, so
  sequences get MultiBench's probabilistic text noise in its simplest form: each token is
  replaced by a uniformly random token with probability equal to the level;
- the baseline b is model-independent, the nearest thing to LF without a second trained model:
  a linear probe on the concatenated raw inputs of the subset (flattened images and vectors,
  token counts of sequences), fitted on clean train inputs and scored on the same noisy test
  inputs the model sees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import batched, dataset_cache
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.classifiers import batch_signature
from bmvae_tf.trainers.evaluation.context import EvalContext
from bmvae_tf.trainers.evaluation.probes import SideBySide, fit_probes, latent_probes, probe_accuracy, side_by_side

logger = logging.getLogger(__name__)

# MultiBench's levels: noise_level / 10 for noise_level in range(11).
DEFAULT_NOISE_LEVELS = tuple(i / 10 for i in range(11))
NOISE_DESCRIPTION = ("images: x + N(0, level^2); vectors: x + N(0, (level * std of the modality)^2); "
                     "sequences: each token replaced by a uniform random token with probability level")


# ------------------------------------------------------------------------------------ summaries


def relative_robustness(levels: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under accuracy [L] against noise level [L] by the trapezoidal rule (MultiBench's
    `relative_robustness_helper`, which assumes the level step 0.1)."""
    levels, accuracy = np.asarray(levels, np.float64), np.asarray(accuracy, np.float64)
    _check_curve(levels, accuracy)
    return float(np.sum((accuracy[1:] + accuracy[:-1]) * np.diff(levels) / 2.0))


def effective_robustness(accuracy: Sequence[float], baseline: Sequence[float]) -> float:
    """sum_i (f_i - (b_i + f_0 - b_0)): accuracy kept beyond the baseline's curve shifted to the
    model's clean accuracy (MultiBench's `effective_robustness_helper`). Positive: the model
    loses accuracy more slowly than the baseline."""
    f, b = np.asarray(accuracy, np.float64), np.asarray(baseline, np.float64)
    if f.shape != b.shape or f.ndim != 1 or len(f) == 0:
        raise ValueError(f"accuracy {f.shape} and baseline {b.shape} must be equal-length curves")
    # (f_i - f_0) - (b_i - b_0): the same sum, exactly 0 for identical curves.
    return float(np.sum((f - f[0]) - (b - b[0])))


def _check_curve(levels: np.ndarray, accuracy: np.ndarray) -> None:
    if levels.shape != accuracy.shape or levels.ndim != 1 or len(levels) < 2:
        raise ValueError(f"need at least two levels and one accuracy per level, got "
                         f"{levels.shape} and {accuracy.shape}")
    if np.any(np.diff(levels) <= 0):
        raise ValueError(f"noise levels must increase, got {levels.tolist()}")


# ------------------------------------------------------------------------------------ noise


def noise_scales(specs: Sequence[schema.ModalitySpec],
                 batches: Iterable[Mapping[str, tf.Tensor]]) -> dict[str, float]:
    """The standard deviation unit of each float modality's noise: 1 for images (in [0, 1]),
    the standard deviation over `batches` of all values for vectors. Sequences get none."""
    vectors = [s.name for s in specs if s.kind == "vector"]
    sums = {n: np.zeros(3) for n in vectors}  # count, sum, sum of squares
    if vectors:
        for batch in batches:
            for name in vectors:
                x = np.asarray(batch[name], np.float64)
                sums[name] += (x.size, x.sum(), np.square(x).sum())
    scales = {}
    for spec in specs:
        if spec.kind == "image":
            scales[spec.name] = 1.0
        elif spec.kind == "vector":
            count, total, squares = sums[spec.name]
            var = squares / max(count, 1) - (total / max(count, 1)) ** 2
            scales[spec.name] = float(np.sqrt(max(var, 0.0)))
    return scales


def add_noise(specs: Sequence[schema.ModalitySpec], inputs: Mapping[str, tf.Tensor],
              level: tf.Tensor, scales: Mapping[str, float], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Noisy copies of a batch {modality: [B, *shape]} at noise `level` (scalar), graph-safe.

    Float modalities: x + level * scale * N(0, 1), unclipped as in MultiBench. Sequences: each
    token replaced with probability `level` by a token drawn uniformly from the vocabulary.
    seed: int32 [2], a stateless seed; every modality folds in its position.
    """
    level = tf.cast(level, tf.float32)
    out = {}
    for m, spec in enumerate(specs):
        x = inputs[spec.name]
        modality_seed = tf.random.experimental.stateless_fold_in(seed, m)
        if spec.kind == "sequence":
            draw_seed, token_seed = tf.unstack(tf.random.experimental.stateless_split(modality_seed, 2))
            replace = tf.random.stateless_uniform(tf.shape(x), draw_seed) < level
            tokens = tf.random.stateless_uniform(tf.shape(x), token_seed, minval=0,
                                                 maxval=spec.vocab_size, dtype=tf.int64)
            out[spec.name] = tf.where(replace, tokens, tf.cast(x, tf.int64))
        else:
            noise = tf.random.stateless_normal(tf.shape(x), modality_seed)
            out[spec.name] = x + level * float(scales[spec.name]) * noise
    return out


def input_features(specs: Sequence[schema.ModalitySpec], inputs: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """The baseline's features per modality, [B, F_m]: flattened values, or for sequences the
    count of each vocabulary token (a bag of tokens: shift-invariant, vocabulary-sized)."""
    out = {}
    for spec in specs:
        x = np.asarray(inputs[spec.name])
        if spec.kind == "sequence":
            tokens = x.reshape(len(x), -1).astype(np.int64)
            counts = np.zeros((len(x), spec.vocab_size), np.float32)
            np.add.at(counts, (np.repeat(np.arange(len(x)), tokens.shape[1]), tokens.ravel()), 1.0)
            out[spec.name] = counts
        else:
            out[spec.name] = x.reshape(len(x), -1).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------ scoring


@dataclasses.dataclass
class RobustnessResult:
    """Curves per subset key: accuracy [L] of the latent probe and of the input baseline
    (baseline_accuracy is empty when no baseline was fitted)."""

    levels: list[float]
    latent_accuracy: dict[str, list[float]]
    baseline_accuracy: dict[str, list[float]]
    num_test: int

    def to_json(self) -> dict:
        return {
            "noise_levels": list(self.levels), "noise": NOISE_DESCRIPTION,
            "baseline": "linear probe on the concatenated raw inputs of the subset",
            "latent_accuracy": self.latent_accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "relative": {k: relative_robustness(self.levels, v) for k, v in self.latent_accuracy.items()},
            # Without a baseline there is nothing to measure the rate of decline against.
            "effective": {k: effective_robustness(v, self.baseline_accuracy[k])
                          if k in self.baseline_accuracy else None
                          for k, v in self.latent_accuracy.items()},
            "baseline_relative": {k: relative_robustness(self.levels, v)
                                  for k, v in self.baseline_accuracy.items()},
        }


def collect_features(specs: Sequence[schema.ModalitySpec],
                     batches: Iterable[Mapping[str, tf.Tensor]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The baseline's clean features {modality: [N, F_m]} and labels [N] of a split."""
    parts: dict[str, list] = {s.name: [] for s in specs}
    labels = []
    for batch in batches:
        for name, value in input_features(specs, {s.name: batch[s.name] for s in specs}).items():
            parts[name].append(value)
        labels.append(np.asarray(batch["label"]))
    return {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels)


def subset_features(features: Mapping[str, np.ndarray], subset: Sequence[str]) -> np.ndarray:
    return np.concatenate([features[name] for name in subset], axis=1)


def noisy_accuracy(model, batches: tf.data.Dataset, probes: Mapping[str, object],
                   baselines: Mapping[str, object], *, levels: Sequence[float],
                   scales: Mapping[str, float], seed: int) -> RobustnessResult:
    """Accuracy of every subset's latent probe and input baseline at each noise level.

    For each level, each test batch is corrupted once (`add_noise`, seeded by the run's seed,
    the level's index and the batch's index); every subset encodes its own modalities of that
    noisy batch (the others are absent), and its baseline sees the same noisy values. The split is
    read once: each batch is corrupted at every level by one traced step that also encodes every
    subset with each encoder run once (`batched`).

    Args:
      model: a MultimodalVAE.
      batches: the test split, {modality: [B, *shape], "label": [B]}; iterated once.
      probes: {subset key: fitted classifier of posterior means [N, D]} (fitted on clean train).
      baselines: {subset key: fitted classifier of `subset_features`}; may be empty.
      levels: increasing noise levels, normally starting at 0 (the clean accuracy).
      scales: `noise_scales`.
      seed: the run's seed.
    """
    specs = list(model.modalities)
    names = [s.name for s in specs]
    subsets = schema.subset_names(names)
    keys = [schema.subset_key(s) for s in subsets]
    step = _noisy_means_step(model, scales, subsets, seed)
    means = [{key: [] for key in keys} for _ in levels]
    correct = {(key, i): 0 for key in keys for i in range(len(levels))} if baselines else {}
    labels = []
    with SideBySide() as run:
        for batch_index, batch in enumerate(batches):
            inputs, batch_labels = {n: batch[n] for n in names}, np.asarray(batch["label"])
            for level_index, level in enumerate(levels):
                noisy, level_means = step(inputs, tf.constant(level, tf.float32), tf.constant(level_index, tf.int32),
                                          tf.constant(batch_index, tf.int32))
                for key, mean in zip(keys, level_means.numpy()):
                    means[level_index][key].append(mean)
                if baselines:  # scored batch by batch: the noisy inputs of every level never pile up
                    features = input_features(specs, {n: noisy[n].numpy() for n in names})
                    hits = run(_count_correct, {key: (baselines[key], subset_features(features, s), batch_labels)
                                                for key, s in zip(keys, subsets)})
                    for key, count in hits.items():
                        correct[key, level_index] += count
            labels.append(batch_labels)
    labels = np.concatenate(labels)
    scores = side_by_side(probe_accuracy, {(key, i): (probes[key], np.concatenate(means[i][key]), labels)
                                           for i in range(len(levels)) for key in keys})
    latent = {key: [scores[key, i] for i in range(len(levels))] for key in keys}
    # correct / N is probe.score's mean of (prediction == label): the predictions are row by row.
    baseline = {key: [correct[key, i] / len(labels) for i in range(len(levels))] for key in keys if baselines}
    return RobustnessResult(levels=[float(v) for v in levels], latent_accuracy=latent,
                            baseline_accuracy=baseline, num_test=len(labels))


def _count_correct(probe, features: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(probe.predict(features) == labels))


def _noisy_means_step(model, scales: Mapping[str, float], subsets, seed: int):
    """(inputs, level, level index, batch index) -> (the noisy batch, posterior means [S, B, D] of
    every subset of it): the noise seeded by fold_in(fold_in(stream seed, level index), batch index),
    the means by the evaluation's one encoding graph (`batched.posterior_step`)."""
    specs = list(model.modalities)
    base_seed = subsets_lib.stream_seed(seed, EvalStream.ROBUSTNESS_NOISE)
    encode = batched.posterior_step(model, subsets)

    @tf.function(input_signature=[batch_signature(specs), tf.TensorSpec([], tf.float32),
                                  tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def corrupt(inputs, level, level_index, batch_index):
        fold = tf.random.experimental.stateless_fold_in
        return add_noise(specs, inputs, level, scales, fold(fold(base_seed, level_index), batch_index))

    def step(inputs, level, level_index, batch_index):
        noisy = corrupt(inputs, level, level_index, batch_index)
        return noisy, encode(noisy, base_seed, batch_index)["mean"]

    return step


def robustness_stage(context: EvalContext) -> None:
    """metrics.robustness: every subset's latent probe (fitted on clean train latents) scored on
    noisy test inputs, against the raw-input baseline.

    The baseline's curves depend on the data, the seed and the eval settings in
    `_baseline_fingerprint`, not on the model: with eval.shared_cache they are computed by the
    first evaluation on a dataset and read from the dataset cache by the later ones."""
    started = time.perf_counter()
    config, names = context.eval, context.names
    scales = noise_scales(context.manifest.modalities, context.batches("test"))
    baselines, baseline_examples, cached = {}, config.robustness_baseline_examples, None
    fingerprint = _baseline_fingerprint(context, scales)
    if baseline_examples and config.shared_cache:
        cached = dataset_cache.lookup(context.manifest, _CACHE_KIND, fingerprint)
    if baseline_examples and cached is None:
        features, labels = collect_features(context.manifest.modalities, context.batches(
            "train", limit=min(baseline_examples, config.max_examples or baseline_examples)))
        baselines = fit_probes({schema.subset_key(s): (subset_features(features, s), labels)
                                for s in schema.subset_names(names)})
        baseline_examples = len(labels)
    result = noisy_accuracy(context.model, context.batches("test"), latent_probes(context), baselines,
                            levels=config.robustness_noise_levels, scales=scales, seed=context.seed)
    if cached is not None:
        result.baseline_accuracy, baseline_examples = cached["accuracy"], cached["train_examples"]
    elif baselines and config.shared_cache:
        dataset_cache.store(context.manifest, _CACHE_KIND, fingerprint,
                            {"accuracy": result.baseline_accuracy, "train_examples": baseline_examples})
    context.metrics.robustness = result.to_json()
    context.metrics.num_examples["robustness"] = {
        "train": context.train_latents.num_examples, "test": result.num_test,
        "baseline_train": baseline_examples, "levels": len(result.levels)}
    logger.info("robustness at %d noise levels: %.1f s", len(config.robustness_noise_levels),
                time.perf_counter() - started)


_CACHE_KIND = "robustness_baseline"


def _baseline_fingerprint(context: EvalContext, scales: Mapping[str, float]) -> dict:
    """What decides the baseline's curves besides the data: the scored split, the seed (the noise
    stream), the levels and scales, how many train examples it is fitted on and the batching of
    the test split (the noise is seeded per batch)."""
    config = context.eval
    return {"split": context.resolve("test"), "seed": int(context.seed),
            "levels": [float(v) for v in config.robustness_noise_levels],
            "scales": {k: float(v) for k, v in sorted(scales.items())},
            "baseline_examples": int(config.robustness_baseline_examples),
            "max_examples": int(config.max_examples), "batch_size": int(config.batch_size),
            "noise": NOISE_DESCRIPTION, "recipe": 1}
