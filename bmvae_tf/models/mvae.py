"""MVAE: the product-of-experts multimodal VAE of Wu & Goodman (2018) (Sect. 2.2; SPEC 4)."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


class MVAE(MultimodalVAE):
    """q(z | x_S) = p(z) prod_{m in S} q_m(z | x_m): a product of Gaussian experts with the prior
    N(0, 1) as an extra expert, so any subset S (even a single modality) has a proper posterior.

    Training maximises Wu & Goodman's sub-sampled objective, the ELBO of the joint plus the ELBO
    of each single modality:
        sum_{S in {1..M}, {1}, ..., {M}} E_{q(z|x_S)}[log p(x_S | z)] - KL(q(z | x_S) || p(z)),
    each expectation estimated with one reparameterised sample and each KL in closed form. The
    joint ELBO decodes every modality, a single-modality ELBO only its own: 2M decoder passes.

    Args:
      posterior: must be "gaussian"; a product of Laplace experts has no closed form.
    """

    POSTERIOR_FAMILIES = ("gaussian",)  # products of Gaussians are Gaussian in closed form

    def __init__(self, modalities, latent_dim: int, *, posterior: str = "gaussian", **kwargs):
        if posterior != "gaussian":
            raise ValueError(f"MVAE needs Gaussian experts for its product; got posterior={posterior!r}")
        super().__init__(modalities, latent_dim, posterior=posterior, **kwargs)

    def _product(self, loc: tf.Tensor, scale: tf.Tensor, present: tf.Tensor) -> tfd.Normal:
        """The PoE of the present experts [M, B, D] and the prior: batch [B, D]."""
        return aggregation.product_of_gaussians(loc, scale, 1.0, present, prior_weight=1.0,
                                                prior_scale=self.expert_prior_scale())

    def _kl_to_prior(self, q: tfd.Normal) -> tf.Tensor:
        """KL(q || p) summed over the latent dimensions: [B, D] -> [B]."""
        return tf.reduce_sum(tfd.kl_divergence(q, self.prior()), axis=-1)

    def single_modality_elbos(self, inputs: Mapping[str, tf.Tensor], loc: tf.Tensor, scale: tf.Tensor,
                              noises: list[Noise], to_latents=lambda z: z,
                              mask: tf.Tensor | None = None) -> tf.Tensor:
        """sum_m [w_m log p(x_m | z) - KL(q(z | x_m) || p(z))], z drawn from the PoE of expert m
        and the prior: [B]. to_latents maps a draw to what the decoders read (the MS variant
        appends its private factors). With a [B, M] mask, an example has the ELBOs of its
        observed modalities only."""
        total = 0.0
        for index, spec in enumerate(self.modalities):
            only = tf.constant([m == index for m in range(self.num_modalities)])
            single = self._product(loc, scale, only)
            z = to_latents(reparameterized_sample("gaussian", single.loc, single.scale, noises[index]))
            log_lik = self.likelihood_weights[index] * self.modality_log_prob(index, inputs[spec.name], z)
            elbo = log_lik - self._kl_to_prior(single)
            if mask is not None:
                elbo = tf.where(mask[:, index], elbo, tf.zeros_like(elbo))
            total += elbo
        return total

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, each example's joint ELBO is that of the PoE of its observed experts
        and the prior, and it has the single-modality ELBOs of its observed modalities only."""
        mask = self.example_mask(inputs, present)                          # None | [B, M]
        noises = Noise.of(noise).split(self.num_modalities + 1)
        loc, scale = self.encode(inputs, mask)                             # [M, B, D]

        joint = self._product(loc, scale, self.all_present() if mask is None else mask)
        z = reparameterized_sample("gaussian", joint.loc, joint.scale, noises[0])      # [B, D]
        reconstruction = self.reconstruction_log_prob(inputs, z, mask)                  # [B]
        kl_joint = self._kl_to_prior(joint)
        objective = reconstruction - kl_joint + self.single_modality_elbos(inputs, loc, scale, noises[1:],
                                                                           mask=mask)
        return LossTerms(
            per_example=-objective,
            global_term=tf.constant(0.0),
            metrics={"objective": tf.reduce_mean(objective),
                     "elbo_joint": tf.reduce_mean(reconstruction - kl_joint),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "kl_joint": tf.reduce_mean(kl_joint)})

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        loc, scale = self.encode(inputs)
        return tfd.Independent(self._product(loc, scale, present), reinterpreted_batch_ndims=1)
