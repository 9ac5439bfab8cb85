"""Log-likelihoods: the IWAE estimate of log p(x_S) for every subset S (SPEC 3).

Averaged over the first eval.log_likelihood_examples test examples with
K = eval.log_likelihood_samples importance samples; each subset is scored on its own modalities
with its own posterior as proposal (`MultimodalVAE.log_marginal`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable, Mapping

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.context import EvalContext

logger = logging.getLogger(__name__)

# Latents decoded per log_marginal call (importance samples x examples): bounds the memory of the
# decoders' activations, about 30 KB per latent for a 16x16 CNN decoder.
_LATENTS_PER_CALL = 4096
_CHUNK = 100


def log_likelihoods(model, batches: Iterable[Mapping[str, tf.Tensor]], *, num_samples: int,
                    seed: int) -> tuple[dict[str, float | None], int]:
    """Mean IWAE estimate of log p(x_S) for every subset S, and the number of examples.

    Every subset of a batch draws its importance samples from the same seed (the run's seed,
    stream EvalStream.LOG_LIKELIHOOD, the batch index). A non-finite mean is reported as None
    so metrics.json stays valid JSON.
    """
    names = [spec.name for spec in model.modalities]
    subsets = schema.subset_names(names)
    chunk = min(num_samples, _CHUNK)

    def total(inputs, present, batch_seed):
        return tf.reduce_sum(model.log_marginal(inputs, present, num_samples, batch_seed, chunk))

    totals = {schema.subset_key(s): 0.0 for s in subsets}
    count = 0
    for batch, outputs in subsets_lib.run_subsets(
            subsets_lib.masked_step(model.modalities, total), batches, names, subsets,
            seed=subsets_lib.stream_seed(seed, EvalStream.LOG_LIKELIHOOD),
            scheme=subsets_lib.SeedScheme.BATCH):
        for key, value in outputs.items():
            totals[key] += float(value)
        count += int(tf.shape(batch[names[0]])[0])
    means = {key: total / count if count and math.isfinite(total) else None
             for key, total in totals.items()}
    return means, count


def log_likelihood_stage(context: EvalContext) -> None:
    """metrics.log_likelihood and the examples and importance samples it rests on."""
    started = time.perf_counter()
    config, take = context.eval, context.eval.max_examples
    examples = min(config.log_likelihood_examples, take) if take else config.log_likelihood_examples
    batch_size = max(1, _LATENTS_PER_CALL // min(config.log_likelihood_samples, _CHUNK))
    num_examples = context.metrics.num_examples
    context.metrics.log_likelihood, num_examples["log_likelihood"] = log_likelihoods(
        context.model, context.batches("test", batch_size, examples),
        num_samples=config.log_likelihood_samples, seed=context.seed)
    num_examples["log_likelihood_samples"] = config.log_likelihood_samples
    logger.info("log-likelihoods of %d subsets on %d examples with K=%d: %.1f s", len(context.subsets),
                num_examples["log_likelihood"], config.log_likelihood_samples, time.perf_counter() - started)
