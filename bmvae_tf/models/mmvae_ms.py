"""MMVAE with shared and modality-specific latents (Eq. 5 with a mixture of experts for c)."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation
from bmvae_tf.models.mmvae import MMVAE
from bmvae_tf.models.modality_specific import ModalitySpecificLatents
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MMVAEMS(ModalitySpecificLatents, MMVAE):
    """MMVAE's stratified bound (L_M, or L_T with bound="tight") on z = [c, s_1..s_M] with
        q(z | x_{1:M}) = [(1/M) sum_m q_m(c | x_m)] prod_m q(s_m | x_m).
    Stratum m draws c from expert m and every s_m' from its own modality, so each of the M*K
    samples is a full z; the importance weights score it against the density above. The private
    factors are reparameterised, so DReG applies to them as to c.
    """

    def shared_posterior(self, loc, scale, present) -> tfd.Distribution:
        return self.uniform_mixture(loc, scale, present)

    def sample_strata(self, loc: tf.Tensor, scale: tf.Tensor, noise: Noise) -> tf.Tensor:
        c_noise, s_noise = noise.split(2)
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(loc, scale)
        c = reparameterized_sample(self.posterior_family, c_loc, c_scale, c_noise, [self.K], batch_axis=1)
        s = self.sample_private(s_loc, s_scale, s_noise, [self.K, self.num_modalities])
        return self.join(c, s)                                                   # [K, M, B, D]

    def experts(self, inputs, mask):
        """An absent modality's private expert is its prior p(s_m) (as in `posterior`), so its
        draws cancel between p(z) and q(z | x_S) in the importance weights."""
        loc, scale = self.encode(inputs, mask)
        if mask is None:
            return loc, scale
        prior_scale = tf.concat([tf.ones([self.num_modalities, self.shared_dim]),
                                 self.private_prior_scale()], axis=-1)[:, None, :]     # [M, 1, D]
        return loc, tf.where(aggregation.expert_mask(mask), scale, prior_scale)

    def joint_log_prob(self, z: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor,
                       mask: tf.Tensor | None = None) -> tf.Tensor:
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(loc, scale)
        c, s = z[..., :self.shared_dim], z[..., self.shared_dim:]
        return (self.mixture_log_prob(c, c_loc, c_scale, mask)
                + self.private_posterior(s_loc, s_scale).log_prob(s))
