"""mmJSD: the multimodal Jensen-Shannon VAE of Sutter et al. (2020) (Sect. 2.5.1, Eq. 4; SPEC 4)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, missing
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MMJSD(MultimodalVAE):
    """The ELBO of the uniform mixture of the unimodal experts, with its KL replaced by a
    Jensen-Shannon divergence to a dynamic prior (Eq. 4):
        E_{z ~ (1/M) sum_m q_m}[log p(x_{1:M} | z)] - JS_pi^{M+1}({q_m}_{m=1..M}, p),
        JS_pi^{M+1} = sum_{k=1}^{M+1} pi_k KL(r_k || f_M),   r_k = q_k (k <= M), r_{M+1} = p,
    where the dynamic prior f_M = prod_m q_m^{pi_m} p^{pi_{M+1}} is the weighted geometric product of
    the Gaussian experts and the prior p(z), with pi_k = 1/(M+1) ("mmJSD's dynamic prior weights
    the prior and each expert equally", SPEC 6). The KLs are Gaussian, so in closed form.

    f_M appears only inside the JS term. The joint posterior is the mixture of the experts, as in
    Sutter et al.'s code (thomassutter/mmjsd: `modality_jsd` sets the fusion to `moe_fusion`,
    `utils.mixture_component_selection`; the product is only in `mm_div.py`'s `alpha_poe` and
    `calc_alphaJSD_modalities`) and the BMVAE paper's Sect. 4.1. Their code decodes, for each
    example, one sample of one expert, picked by the example's position in the batch. We stratify
    instead: every example decodes one reparameterised sample of every expert, z_m ~ q_m, and the
    reconstruction term is (1/M) sum_m log p(x_{1:M} | z_m). Its expectation is the mixture's,
    and its variance, (1/M^2) sum_m Var_{q_m}, is that of M mixture draws whose components were
    picked at random less their between-expert part (stratification with each expert's share 1/M
    never adds variance). The price is M decoder passes of M*B rows (M^2 B rows, as MMVAE with
    K = 1) against M passes of B rows.

    `posterior` of a subset S is the uniform mixture of the experts in S, Sutter et al.'s
    `moe_fusion` with the prior's weight set to zero (`cond_generation_2a`, `inference`).

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
        """f_M over the present experts [M, B, D] and the prior, each weighted 1/(|S|+1): [B, D].
        present: bool [M], or [B, M] (S per example)."""
        present = tf.convert_to_tensor(present, tf.bool)
        weight = 1.0 / (tf.reduce_sum(tf.cast(present, loc.dtype), axis=-1) + 1.0)      # [] | [B]
        expert_weight, prior_weight = weight, weight
        if present.shape.rank == 2:
            expert_weight, prior_weight = weight[None, :, None], weight[:, None]
        return aggregation.product_of_gaussians(loc, scale, expert_weight, present,
                                                prior_weight=prior_weight,
                                                prior_scale=self.expert_prior_scale())

    def js_divergence(self, loc: tf.Tensor, scale: tf.Tensor, prior: tfd.Distribution,
                      mask: tf.Tensor | None = None) -> tf.Tensor:
        """JS_pi^{M+1} of every expert [M, B, D] and the prior (batch [D]) to f_M: [B]. With a
        [B, M] mask, JS_pi^{|S|+1} of each example's observed experts S and the prior to f_S."""
        f_m = self.dynamic_prior(loc, scale, self.all_present() if mask is None else mask)  # [B, D]
        kl_experts = tf.reduce_sum(tfd.kl_divergence(tfd.Normal(loc, scale), f_m), axis=-1)  # [M, B]
        kl_prior = tf.reduce_sum(tfd.kl_divergence(prior, f_m), axis=-1)                 # [B]
        if mask is None:
            return (tf.reduce_sum(kl_experts, axis=0) + kl_prior) / (self.num_modalities + 1.0)
        kl_experts = tf.where(tf.transpose(mask), kl_experts, tf.zeros_like(kl_experts))
        count = tf.reduce_sum(tf.cast(mask, kl_prior.dtype), axis=-1)                    # [B]
        return (tf.reduce_sum(kl_experts, axis=0) + kl_prior) / (count + 1.0)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, each example mixes and reconstructs its observed modalities S only
        (|S| strata), and its JS runs over S and the prior."""
        mask = self.example_mask(inputs, present)                                  # None | [B, M]
        loc, scale = self.encode(inputs, mask)                                     # [M, B, D]
        z = reparameterized_sample("gaussian", loc, scale, Noise.of(noise), batch_axis=1)  # z[m] ~ q_m
        # The stratified mixture reconstruction: each stratum decoded by every decoder.
        reconstruction = missing.stratum_mean(self.reconstruction_log_prob(inputs, z, mask), mask)  # [B]
        js = self.js_divergence(loc, scale, self.prior(), mask)
        objective = reconstruction - js

        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "js": tf.reduce_mean(js)})

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        """The uniform mixture of the present experts; batch [B], event [D]. At least one present."""
        present = tf.convert_to_tensor(present, tf.bool)
        loc, scale = self.encode(inputs, present)
        return aggregation.uniform_mixture(self.posterior_family, loc, scale, present)
