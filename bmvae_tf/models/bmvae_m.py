"""BMVAE_M: the mixture-of-experts Bayesian mixture VAE (Sect. 3, Eqs. 6-11; SPEC 4)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, distributions
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.models.hyper_parameters import require
from bmvae_tf.noise import Noise, reparameterized_sample

tfd = tfp.distributions


@dataclasses.dataclass(frozen=True)
class BMVAEMHyperParameters:
    """BMVAE_M's objective (Eq. 11), `model.bmvae_m` in the trainer config.

    lambda_c: weight of the KL of the mixture weights to the uniform categorical; the paper
      reports lambda_c in [10, 15] working.
    tau_low, tau_high: the per-dimension Gumbel-Softmax temperature range l, u. The paper does
      not give it; l = 0.5 and u = 2 are ours.
    """

    lambda_c: float = 10.0
    tau_low: float = 0.5
    tau_high: float = 2.0

    def __post_init__(self):
        require(self.lambda_c >= 0, "lambda_c", "must be >= 0", self.lambda_c)
        require(self.tau_low > 0, "tau_low", "must be > 0", self.tau_low)
        require(self.tau_high >= self.tau_low, "tau_high", f"must be >= tau_low ({self.tau_low})",
                self.tau_high)


_DEFAULTS = BMVAEMHyperParameters()


class BMVAEM(MultimodalVAE):
    """Every latent dimension d picks one expert m ~ Cat(alpha_d) per sample (Eq. 7).

    alpha = softmax over modalities of global learnable logits [D, M]. Training maximises
        L_B = F - lambda_c * sum_d KL(Cat(alpha_d) || Uniform(M))        (Eq. 11)
    with F the IWAE bound over K samples (Eq. 10), where z^k takes dimension d from the expert
    chosen by a straight-through Gumbel-Softmax draw at temperature
        tau_d = tau_low + (tau_high - tau_low) (d - 1) / (D - 1),
    and q(z | x, m) is the product of the chosen experts' densities. Each of the M decoders runs
    once per latent sample (M*K passes), against M*M*K for MMVAE.

    Args:
      K: importance samples (K = 1 is the ELBO).
      lambda_c, tau_low, tau_high: see BMVAEMHyperParameters, which holds their defaults.
      learn_weights: False gives the uniform ablation BMVAE_M^u (alpha = 1/M, no KL term).
    """

    MIXTURE_WEIGHTS_NAME = "alpha"
    HYPER_PARAMETERS = {"bmvae_m": BMVAEMHyperParameters}
    IMPORTANCE_SAMPLED = True

    def __init__(self, modalities, latent_dim: int, *, K: int = 1,
                 lambda_c: float = _DEFAULTS.lambda_c, tau_low: float = _DEFAULTS.tau_low,
                 tau_high: float = _DEFAULTS.tau_high, learn_weights: bool = True, **kwargs):
        checked = BMVAEMHyperParameters(lambda_c, tau_low, tau_high)
        super().__init__(modalities, latent_dim, **kwargs)
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        self.K = int(K)
        self.lambda_c = float(checked.lambda_c)
        self.tau_low, self.tau_high = float(checked.tau_low), float(checked.tau_high)
        self.learn_weights = bool(learn_weights)
        # Zero logits start every dimension at the uniform alpha_d = 1/M.
        self.mixture_logits = self.add_weight(
            shape=(self.latent_dim, self.num_modalities), initializer="zeros",
            trainable=self.learn_weights, name="mixture_logits")

    def get_config(self) -> dict:
        return {**super().get_config(), "K": self.K, "lambda_c": self.lambda_c,
                "tau_low": self.tau_low, "tau_high": self.tau_high,
                "learn_weights": self.learn_weights}

    def temperatures(self) -> tf.Tensor:
        """tau_d for d = 1..D, [D]."""
        if self.latent_dim == 1:
            return tf.constant([self.tau_low])
        steps = tf.range(self.latent_dim, dtype=tf.float32) / float(self.latent_dim - 1)
        return self.tau_low + (self.tau_high - self.tau_low) * steps

    def mixture_weights(self) -> tf.Tensor:
        return tf.nn.softmax(tf.convert_to_tensor(self.mixture_logits), axis=-1)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, each example's bound is that of its observed modalities S: every
        dimension picks its expert from alpha_d renormalised over S (absent experts get logit
        -inf), and only S is reconstructed."""
        mask = self.example_mask(inputs, present)                          # None | [B, M]
        z_noise, select_noise = Noise.of(noise).split(2)
        loc, scale = self.encode(inputs, mask)                             # [M, B, D]
        experts = distributions.expert(self.posterior_family, loc, scale)
        z_all = reparameterized_sample(self.posterior_family, loc, scale, z_noise,
                                       [self.K], batch_axis=1)             # [K, M, B, D]
        log_q_all = experts.log_prob(z_all)                                # [K, M, B, D]

        batch = tf.shape(loc)[1]
        logits = tf.convert_to_tensor(self.mixture_logits)
        gumbel = select_noise.gumbel([self.K], batch, logits.shape)        # [K, B, D, M]
        choice = logits if mask is None else aggregation.masked_logits(logits, mask)  # [B, D, M]
        onehot = aggregation.straight_through_selection(choice, self.temperatures(), gumbel)
        selection = tf.transpose(onehot, [0, 3, 1, 2])                     # [K, M, B, D]

        z = tf.reduce_sum(selection * z_all, axis=1)                       # [K, B, D]
        log_q = tf.reduce_sum(selection * log_q_all, axis=[1, 3])          # [K, B]
        log_prior = tf.reduce_sum(self.prior().log_prob(z), axis=-1)       # [K, B]
        log_lik = self.reconstruction_log_prob(inputs, z, mask)            # [K, B]
        bound = distributions.log_mean_exp(log_lik + log_prior - log_q, axis=0)  # F, [B]

        if self.learn_weights:
            kl_weights = tf.reduce_sum(distributions.kl_categorical_uniform(logits))
        else:
            kl_weights = tf.constant(0.0)
        return LossTerms(
            per_example=-bound,
            global_term=self.lambda_c * kl_weights,
            metrics={"bound": tf.reduce_mean(bound), "kl_mixture": kl_weights,
                     "reconstruction": tf.reduce_mean(log_lik)})

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        loc, scale = self.encode(inputs, present)
        log_weights = aggregation.masked_log_weights(tf.convert_to_tensor(self.mixture_logits), present)
        return aggregation.dimensionwise_mixture(self.posterior_family, loc, scale, log_weights)
