"""Aggregation of unimodal experts into a joint posterior.

The experts arrive stacked: loc and scale of shape [M, batch, D]. `present` is a bool mask of
the modalities that were given, [M] for the whole batch or [batch, M] per example; absent
experts are computed on zeros and get weight zero, which keeps shapes static for tf.function and
for the SavedModel signatures.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import distributions

tfd = tfp.distributions


def expert_mask(present: tf.Tensor) -> tf.Tensor:
    """A [M] or [B, M] mask as [M, 1, 1] or [M, B, 1], to broadcast against experts [M, B, D]."""
    present = tf.convert_to_tensor(present, tf.bool)
    if present.shape.rank == 1:
        return present[:, None, None]
    return tf.transpose(present)[:, :, None]


def masked_logits(logits: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """Logits [D, M] with -inf at the absent modalities: [D, M] for a [M] mask, [B, D, M] for a
    per-example [B, M] one."""
    present = tf.convert_to_tensor(present, tf.bool)
    mask = present[None, :] if present.shape.rank == 1 else present[:, None, :]
    return tf.where(mask, logits, tf.constant(-float("inf"), logits.dtype))


def masked_log_weights(logits: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """log softmax over the present modalities: [D, M] logits and a [M] mask -> [D, M] log
    weights; a per-example [B, M] mask -> [B, D, M].

    Renormalising alpha over the given modalities is BMVAE_M's subset inference (Sect. 6.3.1);
    absent modalities get log weight -inf.
    """
    return tf.nn.log_softmax(masked_logits(logits, present), axis=-1)


def straight_through_selection(logits: tf.Tensor, temperature: tf.Tensor,
                               gumbel: tf.Tensor) -> tf.Tensor:
    """One expert per latent dimension by straight-through Gumbel-Softmax (Eq. 9).

    logits: [D, M] (log alpha up to a constant), or [B, D, M] per example (-inf: an expert
    that cannot be chosen); temperature: [D]; gumbel: Gumbel(0, 1) noise
    [..., D, M]. Returns [..., D, M] whose forward values are exactly one-hot (the argmax of
    logits + gumbel, a draw from Categorical(alpha_d)) while the gradient is that of the relaxed
    sample softmax((logits + gumbel) / tau_d).
    """
    soft = tf.nn.softmax((logits + gumbel) / temperature[:, None], axis=-1)
    hard = tf.one_hot(tf.argmax(soft, axis=-1), tf.shape(logits)[-1], dtype=soft.dtype)
    # (soft - sg(soft)) is exactly zero in the forward pass, so the result is exactly one-hot;
    # `hard + soft - sg(soft)` would round.
    return hard + (soft - tf.stop_gradient(soft))


def dimensionwise_mixture(family: str, loc: tf.Tensor, scale: tf.Tensor,
                          log_weights: tf.Tensor) -> tfd.Distribution:
    """q(z | x) = prod_d sum_m alpha_{m,d} q_{m,d}(z_d | x_m)   (Eq. 6).

    loc, scale: [M, B, D]; log_weights: [D, M], or [B, D, M] per example. Returns a distribution
    with batch [B], event [D]. Its mean is the per-dimension mixture mean; sampling is ancestral
    (Eq. 7).
    """
    components = distributions.expert(family, tf.transpose(loc, [1, 2, 0]), tf.transpose(scale, [1, 2, 0]))
    if log_weights.shape.rank == 2:
        batch = tf.shape(loc)[1]
        log_weights = tf.broadcast_to(log_weights[None], [batch, *log_weights.shape])
    mixing = tfd.Categorical(logits=log_weights)
    return tfd.Independent(tfd.MixtureSameFamily(mixing, components), reinterpreted_batch_ndims=1)


def uniform_mixture(family: str, loc: tf.Tensor, scale: tf.Tensor, present: tf.Tensor) -> tfd.Distribution:
    """(1/|S|) sum_{m in S} q_m, mixing whole latent vectors of the present experts (MMVAE's joint
    posterior, and mmJSD's subset posterior as Sutter et al.'s `moe_fusion`).

    loc, scale: [M, B, D]; present: bool [M] or [B, M], at least one True per example. Returns
    batch [B], event [D].
    """
    components = tfd.Independent(
        distributions.expert(family, tf.transpose(loc, [1, 0, 2]), tf.transpose(scale, [1, 0, 2])),
        reinterpreted_batch_ndims=1)                                    # batch [B, M], event [D]
    logits = tf.where(tf.convert_to_tensor(present, tf.bool), tf.constant(0.0, loc.dtype),
                      tf.constant(-float("inf"), loc.dtype))                       # [M] | [B, M]
    batch, num = tf.shape(loc)[1], loc.shape[0]
    mixing = tfd.Categorical(logits=tf.broadcast_to(logits, [batch, num]))
    return tfd.MixtureSameFamily(mixing, components)


def product_of_gaussians(loc: tf.Tensor, scale: tf.Tensor, weights: tf.Tensor | float,
                         present: tf.Tensor, *, prior_loc: tf.Tensor | float = 0.0,
                         prior_scale: tf.Tensor | float = 1.0,
                         prior_weight: tf.Tensor | float = 0.0) -> tfd.Normal:
    """The normalised weighted product prod_m N(mu_m, s_m^2)^{w_m} [* N(mu_0, s_0^2)^{w_0}].

    A weighted product of Gaussian densities is Gaussian with
        precision = sum_m w_m / s_m^2 (+ w_0 / s_0^2),
        mean      = (sum_m w_m mu_m / s_m^2 (+ w_0 mu_0 / s_0^2)) / precision,
    which is MVAE's PoE (w = 1 with the prior expert), mmJSD's dynamic prior f_M (Eq. 4, w = 1/(M+1))
    and BMVAE_P's q_bar (Eq. 14, w = pi, no prior expert).

    Args:
      loc, scale: the experts, [M, B, D].
      weights: w_m, broadcastable to [M, B, D] (a scalar, [M, 1, D] or [M, B, D]).
      present: bool [M], or [B, M] per example; absent experts get weight zero whatever their
        loc, scale or weight.
      prior_loc, prior_scale: the extra prior expert, broadcastable to [B, D]; N(0, 1) by default.
      prior_weight: w_0, broadcastable to [B, D]; 0 (the default) leaves the prior out.

    Returns:
      tfd.Normal with batch shape [B, D] (callers wrap it in tfd.Independent). With no present
      expert and prior_weight = 0 the precision is zero and the result is undefined.
    """
    loc = tf.convert_to_tensor(loc)
    scale = tf.convert_to_tensor(scale, loc.dtype)
    shape = tf.shape(loc)
    mask = tf.broadcast_to(expert_mask(present), shape)
    weights = tf.broadcast_to(tf.cast(weights, loc.dtype), shape)
    # Absent experts are computed from zeros or garbage (NaN, inf, zero scales). Replacing their
    # terms, rather than multiplying them by a zero weight, keeps both the values and the
    # gradients finite: 0 * NaN is NaN, and so is the chain rule through 1 / 0.
    loc = tf.where(mask, loc, tf.zeros_like(loc))
    scale = tf.where(mask, scale, tf.ones_like(scale))
    # The mask applies to the quotient, not to the weights: with constant weights (MVAE's 1)
    # Grappler rewrites 1 / s^2, which rounds differently from a division by runtime weights,
    # so masking the weights would make a [B, M] mask of all True differ in the last bit from
    # a constant [M] one.
    expert_precision = tf.where(mask, weights / tf.square(scale), tf.zeros_like(loc))  # [M, B, D]
    prior_precision = tf.cast(prior_weight, loc.dtype) / tf.square(tf.cast(prior_scale, loc.dtype))
    precision = tf.reduce_sum(expert_precision, axis=0) + prior_precision         # [B, D]
    weighted_loc = (tf.reduce_sum(expert_precision * loc, axis=0)
                    + prior_precision * tf.cast(prior_loc, loc.dtype))
    return tfd.Normal(loc=weighted_loc / precision, scale=tf.math.rsqrt(precision))
