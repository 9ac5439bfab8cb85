"""mmJSD with shared and modality-specific latents: Eq. 5 of the paper (Sutter et al. 2020)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, missing
from bmvae_tf.models.base import LossTerms
from bmvae_tf.models.mmjsd import MMJSD
from bmvae_tf.models.modality_specific import ModalitySpecificLatents
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MMJSDMS(ModalitySpecificLatents, MMJSD):
    """Eq. 5:
        sum_m E_{q(c | x_{1:M})} E_{q(s_m | x_m)}[log p(x_m | s_m, c)]
          - sum_m KL(q(s_m | x_m) || p(s_m)) - JS_pi^{M+1}({q_m(c | x_m)}, p(c)),
    with q(c | x_{1:M}) = (1/M) sum_m q_m(c | x_m), the mixture of the shared experts, as in
    Sutter et al.'s code (`moe_fusion`; see MMJSD). The dynamic prior f_M, the product of the
    shared experts and p(c), enters only the JS term. The expectation over c is stratified as in
    MMJSD: stratum m decodes c_m ~ q_m(c | x_m) with a draw of every s_m' from its own expert, and
    the strata are averaged with weight 1/M.
    """

    def shared_posterior(self, loc, scale, present) -> tfd.Distribution:
        return aggregation.uniform_mixture(self.posterior_family, loc, scale, present)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, every term runs over each example's observed modalities S."""
        mask = self.example_mask(inputs, present)                                      # None | [B, M]
        c_noise, s_noise = Noise.of(noise).split(2)
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(*self.encode(inputs, mask))
        c = reparameterized_sample("gaussian", c_loc, c_scale, c_noise, batch_axis=1)    # [M, B, D_c]
        s = self.sample_private(s_loc, s_scale, s_noise, [self.num_modalities])        # [M, B, M*D_s]
        reconstruction = missing.stratum_mean(
            self.reconstruction_log_prob(inputs, self.join(c, s), mask), mask)          # [B]

        js = self.js_divergence(c_loc, c_scale, self.shared_prior(), mask)             # [B]
        kl_private = tf.reduce_sum(self.private_kl(s_loc, s_scale, mask), axis=0)       # [B]
        objective = reconstruction - js - kl_private

        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "js": tf.reduce_mean(js),
                     "kl_private": tf.reduce_mean(kl_private)})
