"""Per-example missing modalities: the `present` mask and modality dropout.

A batch carries `present`, bool [B, M] in manifest order, True where the modality is observed
(trainers/input_pipeline). The models take it as `present=` of `loss_terms` (and of
`posterior`): None (every modality observed), bool [M] (one subset for the whole batch) or bool
[B, M] (per example). An absent modality's expert is replaced by (loc 0, scale 1) before any
maths, so its encoder gets exactly zero gradient from that example; its reconstruction term is
zero. With every modality present the masked objective is bit for bit the unmasked one.

Modality dropout (`train.modality_dropout`) hides, with a given probability per example, a
random non-empty proper subset of the modalities the example has, through the same mask.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from bmvae_tf.noise import Noise
from bmvae_tf.random_streams import TrainingStream

NO_MODALITY = "a row of `present` has no modality present"


def example_mask(present, batch: tf.Tensor, num_modalities: int) -> tf.Tensor | None:
    """`present` as bool [B, M] (None stays None: every modality of every example observed).

    Raises ValueError on a static shape other than [M] or [B, M]; a row with no modality
    present fails with an InvalidArgumentError starting with NO_MODALITY (checked in the graph:
    eagerly at once, in a tf.function when the step runs; XLA-compiled steps skip the check).
    """
    if present is None:
        return None
    present = tf.convert_to_tensor(present)
    if present.dtype != tf.bool:
        present = tf.cast(present, tf.bool)
    shape = present.shape
    if shape.rank not in (1, 2) or (shape[-1] is not None and shape[-1] != num_modalities):
        raise ValueError(f"present must be bool [M] or [batch, M] with M = {num_modalities} "
                         f"modalities, got shape {shape}")
    if shape.rank == 1:
        present = tf.broadcast_to(present[None], tf.stack([batch, num_modalities]))
    present = tf.ensure_shape(present, [None, num_modalities])
    rows = tf.shape(present)[0]
    empty = tf.logical_not(tf.reduce_any(present, axis=1))
    checks = [
        tf.debugging.Assert(tf.equal(rows, batch), [
            "present: its rows differ from the batch size; rows, batch:", rows, batch]),
        tf.debugging.Assert(tf.logical_not(tf.reduce_any(empty)), [
            f"{NO_MODALITY}: every example needs at least one observed modality; rows:",
            tf.where(empty)[:, 0]]),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(present)


def batch_present(batch: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
    """The batch's `present` mask, or None when the batch has none (every modality observed)."""
    return batch.get("present") if hasattr(batch, "get") else None


def modality_dropout(present: tf.Tensor, rate: float, noise: Noise) -> tf.Tensor:
    """Hides, in each example with probability `rate`, a random non-empty proper subset of its
    observed modalities: present bool [B, M] -> bool [B, M].

    The number hidden is uniform on 1 .. n - 1 (n: the example's observed modalities), and which
    ones uniform among the subsets of that size; an example with one observed modality keeps it.
    The draws are keyed by the example's row (bmvae_tf.noise), so they do not depend on how the
    batch is split between replicas.
    """
    present = tf.convert_to_tensor(present, tf.bool)
    batch, num = tf.shape(present)[0], present.shape[-1]
    u = noise.uniform([], batch, [num + 2])                                   # [B, M + 2]
    keys, size_u, apply_u = u[:, :num], u[:, num], u[:, num + 1]
    observed = tf.cast(tf.reduce_sum(tf.cast(present, tf.int32), axis=1), tf.float32)   # [B]
    hidden_count = 1.0 + tf.floor(size_u * (observed - 1.0))                  # in 1 .. n - 1
    # Rank of each observed modality among the example's observed ones, by its random key.
    keys = tf.where(present, keys, 2.0)
    rank = tf.reduce_sum(tf.cast(keys[:, None, :] < keys[:, :, None], tf.float32), axis=2)  # [B, M]
    hide = (apply_u < rate) & (observed >= 2.0)
    hidden = present & hide[:, None] & (rank < hidden_count[:, None])
    return present & tf.logical_not(hidden)


def training_inputs(names: Sequence[str], batch: Mapping[str, tf.Tensor], seed: tf.Tensor, offset,
                    global_batch: int | None, dropout: float):
    """(inputs, present) of a training step (the loop's and Keras fit's): the batch and its
    `present` mask (None when the batch has none: every modality observed), with modality
    dropout applied when `dropout` > 0.

    Dropout's draws are keyed by the example's global row and by the step's seed folded with
    TrainingStream.MODALITY_DROPOUT, so they leave the model's noise as it was and do not depend
    on how the batch is split between replicas. Hidden modalities are zeroed in the inputs, as
    the reader stores an absent one.
    """
    present = batch_present(batch)
    if not dropout:
        return batch, present
    if present is None:
        present = tf.ones([tf.shape(batch[names[0]])[0], len(names)], tf.bool)
    stream = tf.random.experimental.stateless_fold_in(seed, int(TrainingStream.MODALITY_DROPOUT),
                                                      alg="philox")
    present = modality_dropout(present, dropout, Noise(stream, offset=offset, global_batch=global_batch))
    return hide_inputs(batch, present, names), present


def hide_inputs(inputs: Mapping[str, tf.Tensor], present: tf.Tensor,
                names: Sequence[str]) -> dict[str, tf.Tensor]:
    """The batch with every absent modality's tensor replaced by zeros, as the reader stores it."""
    out = dict(inputs)
    for m, name in enumerate(names):
        x = inputs[name]
        given = tf.reshape(present[:, m], [-1] + [1] * (x.shape.rank - 1))
        out[name] = tf.where(given, x, tf.zeros_like(x))
    return out


def log_share(mask: tf.Tensor) -> tf.Tensor:
    """log(M / |S|) of each example's observed modalities S, [B]: exactly 0 when all are."""
    count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=-1)
    return tf.math.log(float(mask.shape[-1]) / count)


def stratum_mean(per_stratum: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """The mean of per-stratum terms [M, B] over the strata: [B]; with a [B, M] mask, over each
    example's observed strata (the mean of the rest scaled by M / |S|, exactly 1 when all are
    observed, so the value is then bit for bit the plain mean)."""
    if mask is None:
        return tf.reduce_mean(per_stratum, axis=0)
    count = tf.reduce_sum(tf.cast(mask, per_stratum.dtype), axis=-1)                  # [B]
    kept = tf.where(tf.transpose(mask), per_stratum, tf.zeros_like(per_stratum))
    return tf.reduce_mean(kept * (float(mask.shape[-1]) / count)[None], axis=0)
