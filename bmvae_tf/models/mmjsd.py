"""mmJSD: the multimodal Jensen-Shannon VAE of Sutter et al. (2020) (Sect. 2.5.1, Eq. 4; SPEC 4)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MMJSD(MultimodalVAE):
    """The ELBO with the KL replaced by a Jensen-Shannon divergence to a dynamic prior (Eq. 4):
        E_{z ~ f_M}[log p(x_{1:M} | z)] - JS_pi^{M+1}({q_m}_{m=1..M}, p),
        JS_pi^{M+1} = sum_{k=1}^{M+1} pi_k KL(r_k || f_M),   r_k = q_k (k <= M), r_{M+1} = p,
    where the dynamic prior f_M = prod_m q_m^{pi_m} p^{pi_{M+1}} is the weighted geometric product of
    the Gaussian experts and the prior N(0, 1), with pi_k = 1/(M+1) ("mmJSD's dynamic prior weights
    the prior and each expert equally", SPEC 6). The KLs are Gaussian, so in closed form.

    As in Sutter et al.'s code, f_M is also the joint posterior: the reconstruction term decodes one
    reparameterised sample of it (M decoder passes), and `posterior` of a subset S is the same
    product over the experts in S and the prior with the weights renormalised to 1/(|S|+1).

    Args:
      posterior: must be "gaussian"; the dynamic prior is a product of Gaussians.
    """

    POSTERIOR_FAMILIES = ("gaussian",)  # products of Gaussians are Gaussian in closed form

    def __init__(self, modalities, latent_dim: int, *, posterior: str = "gaussian", **kwargs):
        if posterior != "gaussian":
            raise ValueError(
                f"mmJSD needs Gaussian experts for its dynamic prior; got posterior={posterior!r}")
        super().__init__(modalities, latent_dim, posterior=posterior, **kwargs)

    def dynamic_prior(self, loc: tf.Tensor, scale: tf.Tensor, present: tf.Tensor) -> tfd.Normal:
        """f_M over the present experts [M, B, D] and the prior, each weighted 1/(|S|+1): [B, D]."""
        weight = 1.0 / (tf.reduce_sum(tf.cast(present, loc.dtype)) + 1.0)
        return aggregation.product_of_gaussians(loc, scale, weight, present, prior_weight=weight)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor) -> LossTerms:
        loc, scale = self.encode(inputs)                                   # [M, B, D]
        f_m = self.dynamic_prior(loc, scale, self.all_present())           # [B, D]
        z = reparameterized_sample("gaussian", f_m.loc, f_m.scale, Noise.of(noise))
        reconstruction = self.reconstruction_log_prob(inputs, z)           # [B]

        kl_experts = tf.reduce_sum(tfd.kl_divergence(tfd.Normal(loc, scale), f_m), axis=-1)  # [M, B]
        kl_prior = tf.reduce_sum(tfd.kl_divergence(self.prior(), f_m), axis=-1)              # [B]
        js = (tf.reduce_sum(kl_experts, axis=0) + kl_prior) / (self.num_modalities + 1.0)
        objective = reconstruction - js

        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "js": tf.reduce_mean(js)})

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        loc, scale = self.encode(inputs)
        return tfd.Independent(self.dynamic_prior(loc, scale, present), reinterpreted_batch_ndims=1)
