"""Log-likelihoods as the literature reports them, in nats (SPEC 3; docs/metrics.md).

For every non-empty subset S of the modalities the model's subset posterior q(z | x_S) is the
proposal. Each test example draws K = eval.log_likelihood_samples importance samples z_1..z_K
from it, and the same samples score every superset A of S (`MultimodalVAE.log_marginals`):

    L_S(A) = log (1/K) sum_k p(x_A | z_k) p(z_k) / q(z_k | x_S),   p(x_A | z) = prod_{m in A} p(x_m | z).

- `log_likelihood[S]` = L_S(S): the IWAE estimate of log p(x_S) (Burda et al.; Shi et al.'s
  `calculate_likelihoods.py`). A lower bound in expectation that tightens as K grows.
- `joint_log_likelihood` = `log_likelihood` of all modalities: log p(x_1..M) from the joint posterior.
- `conditional_log_likelihood["T|S"]` = L_S(T u S) - L_S(S): log p(x_T | x_S) as the difference of
  two IWAE estimates sharing proposal and samples, i.e. log sum_k wbar_k p(x_T | z_k) with wbar the
  self-normalised importance weights of x_S. Consistent (exact as K grows), but not a bound.

The likelihood weights of training (manifest or model.likelihood_weights) never enter these
numbers: p(x_m | z) is the decoder's density itself. Each is the mean over the first
eval.log_likelihood_examples examples of the split (0: all of them).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterable, Mapping

import numpy as np
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.classifiers import batch_signature
from bmvae_tf.trainers.evaluation.context import EvalContext

logger = logging.getLogger(__name__)

# Latents decoded per log_marginals call (importance samples x examples): bounds the memory of the
# decoders' activations, about 30 KB per latent for a 16x16 CNN decoder.
_LATENTS_PER_CALL = 4096
_CHUNK = 100

# What metrics.json's `likelihood_estimators` says of each number ({K}: the samples).
ESTIMATORS = {
    "log_likelihood": (
        "IWAE (Burda et al. 2016): log (1/K) sum_k p(x_S|z_k) p(z_k) / q(z_k|x_S), z_k ~ q(z|x_S), the "
        "model's subset posterior; p(x_S|z) = prod_(m in S) p(x_m|z) unweighted; mean over examples; nats"),
    "joint_log_likelihood": "log_likelihood of all modalities: the IWAE estimate with the joint posterior",
    "conditional_log_likelihood": (
        "'T|S': log p(x_T|x_S) = L(T+S) - L(S), two IWAE estimates sharing the proposal q(z|x_S) and "
        "its K samples, L(A) = log (1/K) sum_k p(x_A|z_k) p(z_k) / q(z_k|x_S); consistent, not a "
        "bound; unweighted; mean over examples; nats"),
}


@dataclasses.dataclass
class LikelihoodEstimates:
    """Means over `num_examples` examples, in nats; None where the mean is not finite."""

    log_likelihood: dict[str, float | None]  # {subset: log p(x_S)}
    joint_log_likelihood: float | None  # log p(x_1..M)
    conditional_log_likelihood: dict[str, float | None]  # {"T|S": log p(x_T | x_S)}
    num_examples: int


def supersets(names: list[str]) -> dict[str, list[tuple[str, ...]]]:
    """{key of S: every subset A containing S, in schema.subset_names order (S itself first)}."""
    subsets = schema.subset_names(names)
    return {schema.subset_key(s): [a for a in subsets if set(s) <= set(a)] for s in subsets}


def conditional_pairs(names: list[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(T, S) for every non-empty S and every non-empty T of the other modalities, ordered by S
    then T (as the coherence keys): the keys "T|S" of conditional_log_likelihood."""
    return [(t, s) for s in schema.subset_names(names)
            for t in schema.subset_names([n for n in names if n not in s])]


def _scoring_step(model, num_samples: int, chunk: int):
    """One traced step: (inputs, present S, seed) -> [N] summed L_S(A) over the batch, for the
    supersets A of S in subset_names order."""
    specs = model.modalities
    names = [spec.name for spec in specs]
    everything = tf.constant([[n in a for n in names] for a in schema.subset_names(names)])  # [2^M-1, M]

    def step(inputs, present, seed):
        contains = tf.reduce_all(everything | ~present[None], axis=1)
        scored = tf.boolean_mask(everything, contains)
        return tf.reduce_sum(model.log_marginals(inputs, present, scored, num_samples, seed, chunk), axis=1)

    return tf.function(step, input_signature=[batch_signature(specs), tf.TensorSpec([len(names)], tf.bool),
                                              tf.TensorSpec([2], tf.int32)])


def likelihood_estimates(model, batches: Iterable[Mapping[str, tf.Tensor]], *, num_samples: int,
                         seed: int) -> LikelihoodEstimates:
    """The three likelihood metrics of the examples in `batches`.

    Every subset of a batch draws its importance samples from the same seed (the run's seed,
    stream EvalStream.LOG_LIKELIHOOD, the batch index).
    """
    names = [spec.name for spec in model.modalities]
    subsets = schema.subset_names(names)
    scored = supersets(names)
    totals = {key: np.zeros(len(rows)) for key, rows in scored.items()}
    count = 0
    for batch, outputs in subsets_lib.run_subsets(
            _scoring_step(model, num_samples, min(num_samples, _CHUNK)), batches, names, subsets,
            seed=subsets_lib.stream_seed(seed, EvalStream.LOG_LIKELIHOOD),
            scheme=subsets_lib.SeedScheme.BATCH):
        for key, value in outputs.items():
            totals[key] += np.asarray(value, np.float64)
        count += int(tf.shape(batch[names[0]])[0])

    def mean(total: float) -> float | None:
        return total / count if count and math.isfinite(total) else None

    marginal = {key: mean(rows[0]) for key, rows in totals.items()}
    conditional = {}
    for t, s in conditional_pairs(names):
        given = schema.subset_key(s)
        row = scored[given].index(tuple(n for n in names if n in t or n in s))
        conditional[subsets_lib.coherence_key(schema.subset_key(t), s)] = mean(
            totals[given][row] - totals[given][0])
    return LikelihoodEstimates(log_likelihood=marginal, joint_log_likelihood=marginal[schema.subset_key(names)],
                               conditional_log_likelihood=conditional, num_examples=count)


def examples_to_score(config) -> int:
    """How many examples the estimates average over (0: the whole split): eval.log_likelihood_examples
    (0: all), capped by eval.max_examples (0: no cap)."""
    wanted, cap = config.log_likelihood_examples, config.max_examples
    if not cap:
        return wanted
    return min(wanted, cap) if wanted else cap


def log_likelihood_stage(context: EvalContext) -> None:
    """metrics.log_likelihood, joint_log_likelihood, conditional_log_likelihood, their estimators,
    and the examples and importance samples each rests on."""
    started = time.perf_counter()
    config = context.eval
    samples = config.log_likelihood_samples
    batch_size = max(1, _LATENTS_PER_CALL // min(samples, _CHUNK))
    estimates = likelihood_estimates(
        context.model, context.batches("test", batch_size, examples_to_score(config)),
        num_samples=samples, seed=context.seed)
    metrics = context.metrics
    metrics.log_likelihood = estimates.log_likelihood
    metrics.joint_log_likelihood = estimates.joint_log_likelihood
    metrics.conditional_log_likelihood = estimates.conditional_log_likelihood
    metrics.likelihood_estimators = dict(ESTIMATORS)
    for name in ESTIMATORS:
        metrics.num_examples[name] = estimates.num_examples
        metrics.num_examples[f"{name}_samples"] = samples
    logger.info("log-likelihoods of %d subsets and %d conditionals on %d examples with K=%d: %.1f s",
                len(estimates.log_likelihood), len(estimates.conditional_log_likelihood),
                estimates.num_examples, samples, time.perf_counter() - started)
