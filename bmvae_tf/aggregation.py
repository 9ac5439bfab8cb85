"""Aggregation of unimodal experts into a joint posterior.

The experts arrive stacked: loc and scale of shape [M, batch, D]. `present` is a bool [M] mask of
the modalities that were given; absent experts are computed on zeros and get weight zero, which
keeps shapes static for tf.function and for the SavedModel signatures.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import distributions

tfd = tfp.distributions


def masked_log_weights(logits: tf.Tensor, present: tf.Tensor) -> tf.Tensor:
    """log softmax over the present modalities: [D, M] logits, [M] mask -> [D, M] log weights.

    Renormalising alpha over the given modalities is BMVAE_M's subset inference (Sect. 6.3.1);
    absent modalities get log weight -inf.
    """
    masked = tf.where(present[None, :], logits, tf.constant(-float("inf"), logits.dtype))
    return tf.nn.log_softmax(masked, axis=-1)


def straight_through_selection(logits: tf.Tensor, temperature: tf.Tensor, sample_shape,
                               seed: tf.Tensor) -> tf.Tensor:
    """One expert per latent dimension by straight-through Gumbel-Softmax (Eq. 9).

    logits: [D, M] (log alpha up to a constant); temperature: [D]. Returns [*sample_shape, D, M]
    whose forward values are exactly one-hot while the gradient is that of the relaxed sample.
    """
    relaxed = tfd.RelaxedOneHotCategorical(temperature=temperature, logits=logits)
    soft = relaxed.sample(sample_shape, seed=seed)
    hard = tf.one_hot(tf.argmax(soft, axis=-1), tf.shape(logits)[-1], dtype=soft.dtype)
    # (soft - sg(soft)) is exactly zero in the forward pass, so the result is exactly one-hot;
    # `hard + soft - sg(soft)` would round.
    return hard + (soft - tf.stop_gradient(soft))


def dimensionwise_mixture(family: str, loc: tf.Tensor, scale: tf.Tensor,
                          log_weights: tf.Tensor) -> tfd.Distribution:
    """q(z | x) = prod_d sum_m alpha_{m,d} q_{m,d}(z_d | x_m)   (Eq. 6).

    loc, scale: [M, B, D]; log_weights: [D, M]. Returns a distribution with batch [B], event [D].
    Its mean is the per-dimension mixture mean; sampling is ancestral (Eq. 7).
    """
    components = distributions.expert(family, tf.transpose(loc, [1, 2, 0]), tf.transpose(scale, [1, 2, 0]))
    batch = tf.shape(loc)[1]
    mixing = tfd.Categorical(logits=tf.broadcast_to(log_weights[None], [batch, *log_weights.shape]))
    return tfd.Independent(tfd.MixtureSameFamily(mixing, components), reinterpreted_batch_ndims=1)
