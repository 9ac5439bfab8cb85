"""MVAE with shared and modality-specific latents (Eq. 5 with a product of experts for c)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf.models.base import LossTerms
from bmvae_tf.models.modality_specific import ModalitySpecificLatents
from bmvae_tf.models.mvae import MVAE
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MVAEMS(ModalitySpecificLatents, MVAE):
    """MVAE's sub-sampled objective on z = [c, s_1..s_M]: for S in {1..M}, {1}, ..., {M},
        E[sum_{m in S} w_m log p(x_m | c, s_m)] - KL(q(c | x_S) || p(c)) - sum_{m in S} KL(q(s_m | x_m) || p(s_m)),
    with q(c | x_S) the PoE of the shared experts in S and the prior. Each term is the ELBO of x_S
    on the latents x_S's decoders read. One draw of the private factors serves every term.
    """

    def _kl_to_prior(self, q: tfd.Normal) -> tf.Tensor:
        return self.shared_kl(q)  # the products are over c only

    def shared_posterior(self, loc, scale, present) -> tfd.Distribution:
        return tfd.Independent(self._product(loc, scale, present), reinterpreted_batch_ndims=1)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, every term runs over each example's observed modalities S: the PoE of
        the shared experts in S, the private KLs of S, the single ELBOs of S."""
        mask = self.example_mask(inputs, present)                                # None | [B, M]
        noises = Noise.of(noise).split(self.num_modalities + 2)
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(*self.encode(inputs, mask))
        s = self.sample_private(s_loc, s_scale, noises[0])                       # [B, M * D_s]
        kl_private = self.private_kl(s_loc, s_scale, mask)                       # [M, B]

        joint = self._product(c_loc, c_scale, self.all_present() if mask is None else mask)  # [B, D_c]
        c = reparameterized_sample("gaussian", joint.loc, joint.scale, noises[1])
        reconstruction = self.reconstruction_log_prob(inputs, self.join(c, s), mask)
        kl_joint = self.shared_kl(joint) + tf.reduce_sum(kl_private, axis=0)
        # Each single-modality ELBO also pays its own private KL: together, once more the sum.
        singles = (self.single_modality_elbos(inputs, c_loc, c_scale, noises[2:], lambda c: self.join(c, s),
                                              mask=mask)
                   - tf.reduce_sum(kl_private, axis=0))
        objective = reconstruction - kl_joint + singles

        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "elbo_joint": tf.reduce_mean(reconstruction - kl_joint),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "kl_private": tf.reduce_mean(tf.reduce_sum(kl_private, axis=0))})
