"""Expert posteriors, priors, likelihoods and the closed-form KLs the objectives use (SPEC 4).

Everything here is a pure function of tensors returning tensorflow-probability distributions.
Experts and priors keep the latent dimension as a *batch* dimension ([..., D]) rather than an
event dimension, because BMVAE mixes experts per dimension and needs per-dimension densities.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf.schema import ModalitySpec

tfd = tfp.distributions

FAMILIES = ("gaussian", "laplace")
_SCALE_FLOOR = 1e-6


def posterior_scale(family: str, raw_scale: tf.Tensor) -> tf.Tensor:
    """Positive scales from unconstrained encoder outputs [..., D].

    Gaussian: softplus(raw) + 1e-6. Laplace: softmax(raw) * D + 1e-6, as in Shi et al.'s MMVAE,
    which ties the scales of one posterior together (they sum to D).
    """
    if family == "gaussian":
        return tf.nn.softplus(raw_scale) + _SCALE_FLOOR
    if family == "laplace":
        latent_dim = tf.cast(tf.shape(raw_scale)[-1], raw_scale.dtype)
        return tf.nn.softmax(raw_scale, axis=-1) * latent_dim + _SCALE_FLOOR
    raise ValueError(f"unknown posterior family {family!r}; expected one of {FAMILIES}")


def expert(family: str, loc: tf.Tensor, scale: tf.Tensor) -> tfd.Distribution:
    """A diagonal expert with batch shape [..., D] (one scalar distribution per dimension)."""
    if family == "gaussian":
        return tfd.Normal(loc=loc, scale=scale)
    if family == "laplace":
        return tfd.Laplace(loc=loc, scale=scale)
    raise ValueError(f"unknown posterior family {family!r}; expected one of {FAMILIES}")


def standard_prior(family: str, latent_dim: int, dtype=tf.float32) -> tfd.Distribution:
    """p(z): standard Normal or Laplace(0, 1), batch shape [D]."""
    return expert(family, tf.zeros([latent_dim], dtype), tf.ones([latent_dim], dtype))


def likelihood(spec: ModalitySpec, params: tf.Tensor, scale: float) -> tfd.Distribution:
    """p(x_m | z) with event shape = the modality's shape.

    params: decoder output, [..., *shape] for images and vectors, [..., L, V] logits for
    sequences. Images live in [0, 1], so their mean is sigmoid(params); vectors are unbounded.
    Laplace and Gaussian likelihoods use a fixed scale (0.75 in Shi et al.).
    """
    if spec.likelihood == "categorical":
        return tfd.Independent(tfd.Categorical(logits=params), reinterpreted_batch_ndims=1)
    mean = tf.sigmoid(params) if spec.kind == "image" else params
    rank = len(spec.shape)
    if spec.likelihood == "laplace":
        return tfd.Independent(tfd.Laplace(loc=mean, scale=scale), reinterpreted_batch_ndims=rank)
    if spec.likelihood == "gaussian":
        return tfd.Independent(tfd.Normal(loc=mean, scale=scale), reinterpreted_batch_ndims=rank)
    raise ValueError(f"modality {spec.name!r}: unknown likelihood {spec.likelihood!r}")


def likelihood_mean(spec: ModalitySpec, params: tf.Tensor) -> tf.Tensor:
    """The generated value of a modality: the mean, or for sequences the most likely tokens."""
    if spec.likelihood == "categorical":
        return tf.argmax(params, axis=-1, output_type=tf.int64)
    return tf.sigmoid(params) if spec.kind == "image" else params


def kl_categorical_uniform(logits: tf.Tensor) -> tf.Tensor:
    """KL(Cat(softmax(logits)) || Uniform(M)) over the last axis, in closed form.

    = sum_m a_m log a_m + log M. Shape [..., M] -> [...].
    """
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    num = tf.cast(tf.shape(logits)[-1], logits.dtype)
    return tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1) + tf.math.log(num)


def log_mean_exp(x: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """log (1/K) sum_k exp(x_k), stably: the IWAE estimator's outer operation (Eq. 1)."""
    k = tf.cast(tf.shape(x)[axis], x.dtype)
    return tf.reduce_logsumexp(x, axis=axis) - tf.math.log(k)

