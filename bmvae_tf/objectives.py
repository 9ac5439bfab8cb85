"""Objective pieces shared by the importance-weighted models.

The IWAE bound itself (Eq. 1) is `distributions.log_mean_exp` over the sample axis of the log
weights log w_k = log p(x, z_k) - log q(z_k | x). This module adds the doubly reparameterised
gradient estimator (DReG, Tucker et al. 2018) in the form Shi et al.'s MMVAE code uses it.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from bmvae_tf import distributions


def dreg_latents(z: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """Marks reparameterised samples z for the DReG estimator of an IWAE bound.

    For log weights lw_k = log p(x, z_k) - log q(z_k | x) and normalised weights
    w_k = softmax_k(lw_k), DReG's gradient is
        encoder phi:  sum_k w_k^2 d lw_k / d z_k * d z_k / d phi   (with q's parameters held fixed
                      inside lw, i.e. no direct score term),
        decoder theta: sum_k w_k d lw_k / d theta                  (the plain IWAE gradient).
    The encoder and decoder gradients need different weights, and w is only known after decoding,
    so - like the backward hook on z in Shi et al.'s code - the returned `latents` (equal to z)
    multiply the gradient reaching z by w_k, a factor supplied later by `bound`:

        latents, bound = dreg_latents(z)               # z: [K, *S, D], reparameterised
        log_w = log_joint(latents) - q_stopped.log_prob(latents)   # [K, *S]
        objective = bound(log_w)                       # [*S]

    `bound(log_w)` has the value of log_mean_exp(log_w, axis=0) (so logs report the true bound)
    and the DReG gradient. The caller must evaluate q with stop_gradient on its parameters, call
    `bound` exactly once, and use `latents` only inside log_w. Works in eager mode and inside
    tf.function (the gradient is taken after `bound` has run in both).
    """
    weights_per_sample: list[tf.Tensor] = []

    @tf.custom_gradient
    def _reweighted_identity(samples: tf.Tensor):
        def grad(upstream: tf.Tensor) -> tf.Tensor:
            if not weights_per_sample:
                raise RuntimeError("dreg_latents: differentiate only after calling bound(log_w)")
            return upstream * weights_per_sample[0]

        return tf.identity(samples), grad

    latents = _reweighted_identity(z)

    def bound(log_weights: tf.Tensor) -> tf.Tensor:
        if weights_per_sample:
            raise RuntimeError("dreg_latents: bound() may be called only once per set of latents")
        weights = tf.stop_gradient(tf.nn.softmax(log_weights, axis=0))        # [K, *S]
        weights_per_sample.append(weights[..., None])                          # broadcast over D
        # d/d theta: sum_k w_k d lw_k; d/d z_k: w_k d lw_k, times w_k from the identity above.
        surrogate = tf.reduce_sum(weights * log_weights, axis=0)
        value = tf.stop_gradient(distributions.log_mean_exp(log_weights, axis=0))
        # (s - sg(s)) is exactly 0.0 forward, so the value is the bound to the last bit.
        return value + (surrogate - tf.stop_gradient(surrogate))

    return latents, bound
