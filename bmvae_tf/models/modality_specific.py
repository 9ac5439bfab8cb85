"""Shared and modality-specific latents, the "MS" framework of Sutter et al. (2020) (Sect. 2.5.2).

The latent vector is z = [c, s_1, ..., s_M] (Eq. 5): c (D_c dimensions) is inferred from every
given modality by the model's own aggregation of experts (PoE, mixture or dynamic prior), and
s_m (D_s dimensions) from modality m alone. Decoder m reads [c, s_m] only, so s_m can carry what
only modality m has (an image's style, a caption's padding) without leaking into the others.

Each encoder emits one expert over [c, s_m], D_c + D_s dimensions. The joint posterior of a
subset S is the aggregation of the shared parts of the experts in S, independent of
q(s_m | x_m) for m in S and of the prior p(s_m) for m outside S: a modality that is not given
has its private factors drawn from the prior, as Sutter et al. do in cross-generation.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, distributions
from bmvae_tf.models.hyper_parameters import require
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


@dataclasses.dataclass(frozen=True)
class ModalitySpecificHyperParameters:
    """The *_ms variants' latent layout, `model.ms` in the trainer config.

    private_dim: D_s, the dimensions of each s_m (equal for all modalities, as in Eq. 5). Neither
      paper fixes D_s for these datasets; 4 is ours.
    """

    private_dim: int = 4

    def __post_init__(self):
        require(self.private_dim >= 1, "private_dim", "must be >= 1", self.private_dim)


_DEFAULTS = ModalitySpecificHyperParameters()


class ModalitySpecificLatents:
    """Mixin placed before a MultimodalVAE subclass: `class MVAEMS(ModalitySpecificLatents, MVAE)`.

    Args:
      latent_dim: D_c, the shared dimensions. The model's `latent_dim` becomes D_c + M * D_s.
      private_dim: D_s, the dimensions of each s_m (ModalitySpecificHyperParameters).

    Subclasses implement `shared_posterior(loc, scale, present)`: the aggregation of the shared
    parts [M, B, D_c] of the present experts, batch [B] and event [D_c].
    """

    HYPER_PARAMETERS = {"ms": ModalitySpecificHyperParameters}

    def __init__(self, modalities, latent_dim: int, *, private_dim: int = _DEFAULTS.private_dim,
                 **kwargs):
        private_dim = ModalitySpecificHyperParameters(private_dim).private_dim
        z_dim = int(latent_dim) + len(modalities) * int(private_dim)
        # Experts over [c, s_m]; the (learned) prior over the whole z = [c, s_1..s_M].
        super().__init__(modalities, int(latent_dim) + int(private_dim), prior_dim=z_dim, **kwargs)
        self.shared_dim = int(latent_dim)
        self.private_dim = int(private_dim)
        self.latent_dim = self.shared_dim + self.num_modalities * self.private_dim

    def get_config(self) -> dict:
        # latent_dim is the constructor's D_c, not the D_c + M * D_s of z.
        return {**super().get_config(), "latent_dim": self.shared_dim, "private_dim": self.private_dim}

    # ---------------------------------------------------------------- layout of z
    def split_experts(self, loc: tf.Tensor, scale: tf.Tensor):
        """Experts [M, B, D_c + D_s] -> ((shared loc, scale) [M, B, D_c], (private loc, scale) [M, B, D_s])."""
        c = self.shared_dim
        return (loc[..., :c], scale[..., :c]), (loc[..., c:], scale[..., c:])

    def join(self, c: tf.Tensor, s: tf.Tensor) -> tf.Tensor:
        """z = [c, s_1..s_M] from c [..., D_c] and the stacked private block s [..., M * D_s]."""
        return tf.concat([c, s], axis=-1)

    def decoder_latents(self, index: int, z: tf.Tensor) -> tf.Tensor:
        start = self.shared_dim + index * self.private_dim
        return tf.concat([z[..., :self.shared_dim], z[..., start:start + self.private_dim]], axis=-1)

    # ---------------------------------------------------------------- distributions
    def shared_prior(self) -> tfd.Distribution:
        """p(c), batch shape [D_c]: the first D_c dimensions of the prior over z."""
        if not self.learn_prior:
            return distributions.standard_prior(self.posterior_family, self.shared_dim)
        scale = self.expert_prior_scale()
        return distributions.expert(self.posterior_family, tf.zeros_like(scale), scale)

    def expert_prior_scale(self) -> tf.Tensor:
        """The prior's scale over c, [D_c]: the prior expert of a product over the shared experts."""
        return self.prior_scale()[:self.shared_dim]

    def private_prior_scale(self) -> tf.Tensor:
        """The prior's scale over each s_m, [M, D_s]."""
        return tf.reshape(self.prior_scale()[self.shared_dim:], [self.num_modalities, self.private_dim])

    def private_posterior(self, loc: tf.Tensor, scale: tf.Tensor) -> tfd.Distribution:
        """prod_m q(s_m | x_m) from the private parts [M, B, D_s]: batch [B], event [M * D_s].

        An absent modality's expert arrives from `encode(inputs, present)` as loc 0, scale 1,
        which is exactly its prior p(s_m) unless the prior is learned; `posterior` puts the
        learned prior's scale in its place.
        """
        batch = tf.shape(loc)[1]
        flat = lambda t: tf.reshape(tf.transpose(t, [1, 0, 2]), [batch, self.num_modalities * self.private_dim])
        return tfd.Independent(distributions.expert(self.posterior_family, flat(loc), flat(scale)),
                               reinterpreted_batch_ndims=1)

    def sample_private(self, loc: tf.Tensor, scale: tf.Tensor, noise: Noise,
                       sample_shape=()) -> tf.Tensor:
        """Reparameterised draws of [s_1..s_M] from the private parts [M, B, D_s]: [..., B, M * D_s]."""
        s = reparameterized_sample(self.posterior_family, loc, scale, noise, sample_shape, batch_axis=1)
        n = len(sample_shape)
        s = tf.transpose(s, [*range(n), n + 1, n, n + 2])                        # [..., B, M, D_s]
        return tf.reshape(s, tf.concat([tf.shape(s)[:-2], [self.num_modalities * self.private_dim]], 0))

    def private_kl(self, loc: tf.Tensor, scale: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        """KL(q(s_m | x_m) || p(s_m)) summed over D_s, in closed form: [M, B]; zero where a
        [B, M] mask marks modality m absent (its s_m is not inferred from that example)."""
        experts = distributions.expert(self.posterior_family, loc, scale)
        if self.learn_prior:
            prior_scale = self.private_prior_scale()[:, None, :]                # [M, 1, D_s]
            prior = distributions.expert(self.posterior_family, tf.zeros_like(prior_scale), prior_scale)
        else:
            prior = distributions.standard_prior(self.posterior_family, self.private_dim)
        kl = tf.reduce_sum(tfd.kl_divergence(experts, prior), axis=-1)
        if mask is not None:
            kl = tf.where(tf.transpose(mask), kl, tf.zeros_like(kl))
        return kl

    def shared_kl(self, q: tfd.Distribution) -> tf.Tensor:
        """KL(q(c) || p(c)) for a factorised q with batch [B, D_c]: [B]."""
        return tf.reduce_sum(tfd.kl_divergence(q, self.shared_prior()), axis=-1)

    def shared_posterior(self, loc: tf.Tensor, scale: tf.Tensor, present: tf.Tensor) -> tfd.Distribution:
        raise NotImplementedError

    def posterior(self, inputs, present) -> tfd.Distribution:
        """q(c | x_S) prod_{m in S} q(s_m | x_m) prod_{m not in S} p(s_m): batch [B], event [D]."""
        present = tf.convert_to_tensor(present, tf.bool)
        (c_loc, c_scale), (s_loc, s_scale) = self.split_experts(*self.encode(inputs, present))
        if self.learn_prior:  # an absent modality's s_m comes from its (learned) prior
            s_scale = tf.where(aggregation.expert_mask(present), s_scale,
                               self.private_prior_scale()[:, None, :])
        return tfd.Blockwise([self.shared_posterior(c_loc, c_scale, present),
                              self.private_posterior(s_loc, s_scale)])
