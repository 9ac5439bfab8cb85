"""mmJSD with shared and modality-specific latents: Eq. 5 of the paper (Sutter et al. 2020)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf.models.base import LossTerms
from bmvae_tf.models.mmjsd import MMJSD
from bmvae_tf.models.modality_specific import ModalitySpecificLatents
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MMJSDMS(ModalitySpecificLatents, MMJSD):
    """Eq. 5:
        sum_m E_{q(c | x_{1:M})} E_{q(s_m | x_m)}[log p(x_m | s_m, c)]
          - sum_m KL(q(s_m | x_m) || p(s_m)) - JS_pi^{M+1}({q_m(c | x_m)}, p(c)),
    with q(c | x_{1:M}) the dynamic prior f_M of the shared experts, as in mmJSD.
    """

    def shared_posterior(self, loc, scale, present) -> tfd.Distribution:
        return tfd.Independent(self.dynamic_prior(loc, scale, present), reinterpreted_batch_ndims=1)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor) -> LossTerms:
        c_noise, s_noise = Noise.of(noise).split(2)
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(*self.encode(inputs))
        f_m = self.dynamic_prior(c_loc, c_scale, self.all_present())             # [B, D_c]
        z = self.join(reparameterized_sample("gaussian", f_m.loc, f_m.scale, c_noise),
                      self.sample_private(s_loc, s_scale, s_noise))
        reconstruction = self.reconstruction_log_prob(inputs, z)                 # [B]

        kl_experts = tf.reduce_sum(tfd.kl_divergence(tfd.Normal(c_loc, c_scale), f_m), axis=-1)  # [M, B]
        kl_prior = tf.reduce_sum(tfd.kl_divergence(self.shared_prior(), f_m), axis=-1)        # [B]
        js = (tf.reduce_sum(kl_experts, axis=0) + kl_prior) / (self.num_modalities + 1.0)
        kl_private = tf.reduce_sum(self.private_kl(s_loc, s_scale), axis=0)                   # [B]
        objective = reconstruction - js - kl_private

        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "js": tf.reduce_mean(js),
                     "kl_private": tf.reduce_mean(kl_private)})
