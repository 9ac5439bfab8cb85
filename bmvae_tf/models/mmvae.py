"""MMVAE: the uniform mixture of unimodal experts of Shi et al. (2019) (Sect. 2.4; SPEC 4)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, distributions, missing, objectives
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.schema import ModalitySpec
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions

BOUNDS = ("looser", "tight")


@dataclasses.dataclass(frozen=True)
class MMVAEHyperParameters:
    """MMVAE's gradient estimator, `model.mmvae` in the trainer config (also read by mmvae_ms).

    dreg: the doubly reparameterised gradient estimator (Tucker et al. 2018), which Shi et al.
      train with (K = 30, looser bound); see MMVAE and bmvae_tf/objectives.py for its bias when
      M, K > 1.
    """

    dreg: bool = False


_DEFAULTS = MMVAEHyperParameters()


class MMVAE(MultimodalVAE):
    """Joint posterior q(z | x_{1:M}) = (1/M) sum_m q_m(z | x_m), mixing whole latent vectors.

    Training is stratified: each expert m draws K samples z_m^k ~ q_m, and every one of the M*K
    samples is decoded by all M decoders (M*M*K decoder passes, against BMVAE_M's M*K). The
    importance weights use the mixture density (lambda_m' = modality m''s likelihood weight),
        log w_m^k = sum_m' lambda_m' log p(x_m' | z_m^k) + log p(z_m^k) - log q(z_m^k | x_{1:M}),
    and the bound is either
        "looser": L_M = (1/M) sum_m log (1/K) sum_k w_m^k                         (Eq. 2), or
        "tight":  L_T = log (1/(M K)) sum_m sum_k w_m^k                           (Eq. 3).
    Eq. 3 takes L = K/M samples per expert to match Eq. 2's sample count; we take L = K, so that
    both bounds use the same draws and decoder passes and L_T >= L_M holds sample by sample
    (Jensen's inequality on the outer log).

    Args:
      K: importance samples per expert (K = 1 with "looser" is the stratified ELBO).
      bound: "looser" (L_M, as Shi et al. train) or "tight" (L_T, the mmvae_tight model).
      dreg: use the DReG gradient estimator (Tucker et al. 2018) as Shi et al.'s code does: q is
        scored with its parameters held fixed, and the encoders get the squared normalised
        weights through the samples (per stratum for L_M, over all M*K samples for L_T); the
        decoders keep the plain IWAE gradient, and the reported loss keeps the bound's value.
        It is exactly unbiased for M = 1 (IWAE's DReG) and for L_M with K = 1. Otherwise it is
        Shi et al.'s estimator, not an unbiased one: the mixture density in the weights carries
        every expert's parameters, but a stratum's samples reparameterise only their own expert,
        so DReG's score-to-pathwise identity does not hold term by term. Its default is in
        MMVAEHyperParameters.
    """

    HYPER_PARAMETERS = {"mmvae": MMVAEHyperParameters}
    IMPORTANCE_SAMPLED = True

    def __init__(self, modalities: Sequence[ModalitySpec], latent_dim: int, *, K: int = 1,
                 bound: str = "looser", dreg: bool = _DEFAULTS.dreg, **kwargs):
        checked = MMVAEHyperParameters(dreg)
        super().__init__(modalities, latent_dim, **kwargs)
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        if bound not in BOUNDS:
            raise ValueError(f"bound {bound!r} is not one of {BOUNDS}")
        self.K = int(K)
        self.bound = bound
        self.dreg = bool(checked.dreg)

    def get_config(self) -> dict:
        return {**super().get_config(), "K": self.K, "bound": self.bound, "dreg": self.dreg}

    def mixture_log_prob(self, z: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor,
                         mask: tf.Tensor | None = None) -> tf.Tensor:
        """log q(z | x_{1:M}) = log (1/M) sum_m q_m(z | x_m): z [..., B, D], loc/scale [M, B, D]
        -> [..., B]. Every expert is evaluated at every sample, whichever expert drew it. With a
        [B, M] mask, the uniform mixture of each example's observed experts, log (1/|S|) sum_S."""
        experts = distributions.expert(self.posterior_family, loc, scale)
        per_expert = tf.reduce_sum(experts.log_prob(z[..., None, :, :]), axis=-1)       # [..., M, B]
        if mask is None:
            return distributions.log_mean_exp(per_expert, axis=-2)
        per_expert = tf.where(tf.transpose(mask), per_expert, tf.constant(-float("inf"), per_expert.dtype))
        # log mean over M, plus log(M / |S|): exactly 0 when every expert is observed.
        return distributions.log_mean_exp(per_expert, axis=-2) + missing.log_share(mask)

    def sample_strata(self, loc: tf.Tensor, scale: tf.Tensor, noise: Noise) -> tf.Tensor:
        """K reparameterised samples from each expert: [K, M, B, D], z[k, m] ~ q_m."""
        return reparameterized_sample(self.posterior_family, loc, scale, noise, [self.K], batch_axis=1)

    def joint_log_prob(self, z: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor,
                       mask: tf.Tensor | None = None) -> tf.Tensor:
        """log q(z | x_S) of the joint posterior the samples are weighted against."""
        return self.mixture_log_prob(z, loc, scale, mask)

    def experts(self, inputs: Mapping[str, tf.Tensor], mask: tf.Tensor | None):
        """The experts [M, B, D] the strata draw from; absent ones as `encode` leaves them."""
        return self.encode(inputs, mask)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, each example's bound is over its observed modalities S: the strata of
        S, weighted against the mixture of S, reconstructing S (L_M averages |S| strata; L_T
        pools their K |S| samples)."""
        mask = self.example_mask(inputs, present)                                  # None | [B, M]
        loc, scale = self.experts(inputs, mask)                                    # [M, B, D]
        z = self.sample_strata(loc, scale, Noise.of(noise))                        # [K, M, B, D]
        if self.bound == "tight":
            # L_T pools the M*K samples of all experts into one importance-weighted average.
            z = tf.reshape(z, tf.concat([[-1], tf.shape(z)[2:]], axis=0))        # [K*M, B, D]
        if self.dreg:
            z, dreg_bound = objectives.dreg_latents(z)
            # DReG removes the score term: q is scored with its parameters held fixed, so the
            # encoders learn only through the reparameterised samples.
            loc, scale = tf.stop_gradient(loc), tf.stop_gradient(scale)

        log_lik = self.reconstruction_log_prob(inputs, z, mask)      # one call per decoder
        log_prior = tf.reduce_sum(self.prior().log_prob(z), axis=-1)
        log_w = log_lik + log_prior - self.joint_log_prob(z, loc, scale, mask)   # [K, M, B] | [K*M, B]
        if mask is not None and self.bound == "tight":
            # The samples of absent strata get weight zero (a finite floor: DReG multiplies).
            strata = tf.transpose(mask)                                            # [M, B]
            strata = tf.broadcast_to(strata[None], tf.concat([[self.K], tf.shape(strata)], 0))
            log_w = tf.where(tf.reshape(strata, tf.shape(log_w)), log_w, log_w.dtype.min)
        bound = dreg_bound(log_w) if self.dreg else distributions.log_mean_exp(log_w, axis=0)
        if self.bound == "looser":
            bound = missing.stratum_mean(bound, mask)       # L_M averages the strata; [M, B] -> [B]
        elif mask is not None:
            bound = bound + missing.log_share(mask)        # the mean over K |S| samples, not K M
        return LossTerms(
            per_example=-bound,
            global_term=tf.constant(0.0),
            metrics={"bound": tf.reduce_mean(bound), "reconstruction": tf.reduce_mean(log_lik)})

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        """Uniform mixture of the present experts; batch [B], event [D]. At least one present."""
        present = tf.convert_to_tensor(present, tf.bool)
        loc, scale = self.encode(inputs, present)                                  # [M, B, D]
        return self.uniform_mixture(loc, scale, present)

    def uniform_mixture(self, loc: tf.Tensor, scale: tf.Tensor, present: tf.Tensor) -> tfd.Distribution:
        """(1/|S|) sum_{m in S} q_m of the present experts [M, B, D]: batch [B], event [D]."""
        return aggregation.uniform_mixture(self.posterior_family, loc, scale, present)

