"""BMVAE_P: the product-of-experts Bayesian mixture VAE (Sect. 4, Eqs. 14-15; SPEC 4)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation
from bmvae_tf.models.base import LossTerms, MultimodalVAE
from bmvae_tf.models.hyper_parameters import require
from bmvae_tf.noise import Noise, reparameterized_sample
from bmvae_tf.random_streams import ModelStream

tfd = tfp.distributions

_CONCENTRATION_FLOOR = 1e-3
SUBSET_WEIGHTS = ("sample", "mean")
# The fixed seed of the pi that `posterior` draws (see bmvae_tf.random_streams.ModelStream).
SUBSET_WEIGHTS_SEED = (int(ModelStream.SUBSET_WEIGHTS), 0)


@dataclasses.dataclass(frozen=True)
class BMVAEPHyperParameters:
    """BMVAE_P's objective (Eq. 15), `model.bmvae_p` in the trainer config.

    lambda_zq: weight of KL(q_bar || p).
    lambda_mq, lambda_mz: weights of KL(q_m || q_bar) and KL(q_m || p); None means 1/M, as in
      the paper.
    eta: weight of the Dirichlet KL. The paper picks it from {0.01h, 0.1h, 0.5h} with h the mean
      data size; 1.0 is our default.
    beta_prior: the concentration of the symmetric Dirichlet prior on every pi_d.
    subset_weights: the weights of the subset posterior used in evaluation and export: "sample"
      draws pi ~ Dir(beta) for each example, as the paper does (Sect. 6.3.1); "mean" takes E[pi].
    """

    lambda_zq: float = 1.0
    lambda_mq: float | None = None
    lambda_mz: float | None = None
    eta: float = 1.0
    beta_prior: float = 0.5
    subset_weights: str = "sample"

    def __post_init__(self):
        for field in ("lambda_zq", "lambda_mq", "lambda_mz", "eta"):
            value = getattr(self, field)
            require(value is None or value >= 0, field, "must be >= 0", value)
        require(self.beta_prior > 0, "beta_prior", "must be positive", self.beta_prior)
        require(self.subset_weights in SUBSET_WEIGHTS, "subset_weights",
                f"must be one of {', '.join(SUBSET_WEIGHTS)}", self.subset_weights)


_DEFAULTS = BMVAEPHyperParameters()


class BMVAEP(MultimodalVAE):
    """Every latent dimension d weights the Gaussian experts by pi_d ~ Dir(beta_d) (Eq. 14):
        q_bar_d(z_d | x) = prod_m q_{m,d}(z_d | x_m)^{pi_{m,d}} / normaliser,
    a Gaussian with precision sum_m pi_{m,d} / s_{m,d}^2 and mean
    (sum_m pi_{m,d} mu_{m,d} / s_{m,d}^2) / precision. There is no prior expert.

    beta = softplus(global learnable [D, M]) + 1e-3. Training maximises (Eq. 15)
        L_P = E_pi[ E_{z ~ q_bar} log p(x | z) - lambda_zq KL(q_bar || p)
                    - sum_m lambda_mq KL(q_m || q_bar) ]
              - sum_m lambda_mz KL(q_m || p) - eta sum_d KL(Dir(beta_d) || Dir(beta_prior)).
    Per step each example draws one pi [D, M], reparameterised through TFP's implicit Dirichlet
    gradients (Figurnov et al., 2018), and one z from the q_bar built with that pi; the same pi
    enters KL(q_m || q_bar). The Gaussian KLs are closed form; the Dirichlet KL is a global term
    (it does not depend on the batch). M decoder passes per step.

    The posterior of a subset S (evaluation, export) is q_bar over the experts in S with pi
    renormalised over S: drawn per example from Dir(beta) as the paper does (Sect. 6.3.1,
    `subset_weights: sample`, the default) or E[pi] (`subset_weights: mean`); see
    `subset_posterior_weights`.

    Args:
      lambda_zq, lambda_mq, lambda_mz, eta, beta_prior, subset_weights: see
        BMVAEPHyperParameters, which holds their defaults. The model keeps lambda_mq and
        lambda_mz with None resolved to 1/M.
      learn_weights: False gives the uniform ablation BMVAE_P^u: pi fixed at 1/M, no beta, no
        Dirichlet KL.
      posterior: must be "gaussian"; q_bar is a product of Gaussians.
    """

    POSTERIOR_FAMILIES = ("gaussian",)  # products of Gaussians are Gaussian in closed form
    MIXTURE_WEIGHTS_NAME = "E[pi]"
    HYPER_PARAMETERS = {"bmvae_p": BMVAEPHyperParameters}

    def __init__(self, modalities, latent_dim: int, *, lambda_zq: float = _DEFAULTS.lambda_zq,
                 lambda_mq: float | None = _DEFAULTS.lambda_mq,
                 lambda_mz: float | None = _DEFAULTS.lambda_mz, eta: float = _DEFAULTS.eta,
                 beta_prior: float = _DEFAULTS.beta_prior,
                 subset_weights: str = _DEFAULTS.subset_weights, learn_weights: bool = True,
                 posterior: str = "gaussian", **kwargs):
        if posterior != "gaussian":
            raise ValueError(f"BMVAE_P needs Gaussian experts for its product; got posterior={posterior!r}")
        checked = BMVAEPHyperParameters(lambda_zq, lambda_mq, lambda_mz, eta, beta_prior, subset_weights)
        super().__init__(modalities, latent_dim, posterior=posterior, **kwargs)
        uniform = 1.0 / self.num_modalities
        self.lambda_zq = float(checked.lambda_zq)
        self.lambda_mq = uniform if checked.lambda_mq is None else float(checked.lambda_mq)
        self.lambda_mz = uniform if checked.lambda_mz is None else float(checked.lambda_mz)
        self.eta = float(checked.eta)
        self.beta_prior = float(checked.beta_prior)
        self.subset_weights = checked.subset_weights
        self.learn_weights = bool(learn_weights)
        # beta starts at 1 everywhere: the flat Dirichlet, E[pi_d] = 1/M, as BMVAE_M starts at the
        # uniform alpha.
        start = float(np.log(np.expm1(1.0 - _CONCENTRATION_FLOOR)))
        self.concentration_logits = self.add_weight(
            shape=(self.latent_dim, self.num_modalities),
            initializer=keras.initializers.Constant(start),
            name="concentration_logits") if self.learn_weights else None

    def get_config(self) -> dict:
        return {**super().get_config(), "lambda_zq": self.lambda_zq, "lambda_mq": self.lambda_mq,
                "lambda_mz": self.lambda_mz, "eta": self.eta, "beta_prior": self.beta_prior,
                "subset_weights": self.subset_weights, "learn_weights": self.learn_weights}

    def concentration(self) -> tf.Tensor:
        """beta = softplus(logits) + 1e-3, [D, M]. Only with learn_weights."""
        return tf.nn.softplus(tf.convert_to_tensor(self.concentration_logits)) + _CONCENTRATION_FLOOR

    def mixture_weights(self) -> tf.Tensor:
        """E[pi_d] = beta_d / sum_m beta_{m,d}, [D, M]; 1/M for the uniform ablation."""
        if not self.learn_weights:
            return tf.fill([self.latent_dim, self.num_modalities], 1.0 / self.num_modalities)
        beta = self.concentration()
        return beta / tf.reduce_sum(beta, axis=-1, keepdims=True)

    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """With `present`, each example's q_bar is the product of its observed experts S with pi
        renormalised over S (a draw of Dir(beta_S), as the subset posterior's); the KLs of the
        experts run over S, and only S is reconstructed. lambda_mq and lambda_mz keep their
        values."""
        mask = self.example_mask(inputs, present)                          # None | [B, M]
        pi_noise, z_noise = Noise.of(noise).split(2)
        loc, scale = self.encode(inputs, mask)                             # [M, B, D]

        if self.learn_weights:
            beta = self.concentration()
            pi = pi_noise.dirichlet(tf.shape(loc)[1], beta)                # [B, D, M]
            weights = tf.transpose(self._renormalised(pi, mask), [2, 0, 1])  # [M, B, D]
            kl_dirichlet = tf.reduce_sum(tfd.kl_divergence(
                tfd.Dirichlet(beta), tfd.Dirichlet(tf.fill(tf.shape(beta), self.beta_prior))))
        else:
            weights = self._uniform_weights(mask)
            kl_dirichlet = tf.constant(0.0)

        q_bar = aggregation.product_of_gaussians(
            loc, scale, weights, self.all_present() if mask is None else mask)         # [B, D]
        z = reparameterized_sample("gaussian", q_bar.loc, q_bar.scale, z_noise)       # [B, D]
        reconstruction = self.reconstruction_log_prob(inputs, z, mask)                  # [B]

        prior = self.prior()
        experts = tfd.Normal(loc, scale)
        kl_zq = tf.reduce_sum(tfd.kl_divergence(q_bar, prior), axis=-1)                 # [B]
        kl_mq = _sum_present(tfd.kl_divergence(experts, q_bar), mask)                   # [B]
        kl_mz = _sum_present(tfd.kl_divergence(experts, prior), mask)                   # [B]
        objective = (reconstruction - self.lambda_zq * kl_zq - self.lambda_mq * kl_mq
                     - self.lambda_mz * kl_mz)

        return LossTerms(
            per_example=-objective,
            global_term=self.eta * kl_dirichlet,
            metrics={"objective": tf.reduce_mean(objective),
                     "reconstruction": tf.reduce_mean(reconstruction),
                     "kl_zq": tf.reduce_mean(kl_zq), "kl_mq": tf.reduce_mean(kl_mq),
                     "kl_mz": tf.reduce_mean(kl_mz), "kl_dirichlet": kl_dirichlet})

    def _renormalised(self, pi: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
        """pi [B, D, M] renormalised over each example's observed modalities; rows with every
        modality observed keep pi as drawn (bit for bit)."""
        if mask is None:
            return pi
        observed = mask[:, None, :]
        kept = tf.where(observed, pi, tf.zeros_like(pi))
        renormalised = kept / tf.reduce_sum(kept, axis=-1, keepdims=True)
        return tf.where(tf.reduce_all(mask, axis=1)[:, None, None], pi, renormalised)

    def _uniform_weights(self, mask: tf.Tensor | None):
        """The uniform ablation's weights: 1/M, or 1/|S| over each example's observed S, [M, B, 1]."""
        uniform = 1.0 / self.num_modalities
        if mask is None:
            return uniform
        count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)                        # [B]
        per_example = tf.where(tf.reduce_all(mask, axis=1), uniform, 1.0 / count)
        return tf.where(tf.transpose(mask), per_example[None], 0.0)[:, :, None]

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        """The weighted product q_bar over the present experts, with the weights of
        `subset_posterior_weights`: batch [B], event [D]. No prior expert, as in training."""
        loc, scale = self.encode(inputs)
        weights = self.subset_posterior_weights(present, tf.shape(loc)[1])
        q_bar = aggregation.product_of_gaussians(loc, scale, weights, present)
        return tfd.Independent(q_bar, reinterpreted_batch_ndims=1)

    def subset_posterior_weights(self, present: tf.Tensor, batch: tf.Tensor,
                                 seed: tf.Tensor | None = None) -> tf.Tensor:
        """The weights of the subset posterior's experts, renormalised over the present ones.

        "sample" (the paper's Sect. 6.3.1): one pi_d ~ Dir(beta_d) per example and dimension,
        [M, B, D]; renormalised over the present experts it is a draw of Dir(beta_{S,d}). The draw
        comes from the fixed stateless seed SUBSET_WEIGHTS_SEED (or `seed`), keyed by the
        example's row, so posterior(...).mean() is deterministic: the same batch always gets the
        same pi (example g of every batch of one size gets the same draw).
        "mean": E[pi_d] = beta_d / sum_m beta_{m,d}, [M, 1, D]. The uniform ablation has 1/|S|.
        """
        present = tf.convert_to_tensor(present, tf.bool)
        per_example = present.shape.rank == 2                                         # [B, M]
        if self.learn_weights and self.subset_weights == "sample":
            seed = tf.constant(SUBSET_WEIGHTS_SEED, tf.int32) if seed is None else seed
            pi = Noise(seed).dirichlet(batch, self.concentration())                   # [B, D, M]
            pi = tf.where(present[:, None, :] if per_example else present, pi, tf.zeros_like(pi))
            return tf.transpose(pi / tf.reduce_sum(pi, axis=-1, keepdims=True), [2, 0, 1])
        log_weights = aggregation.masked_log_weights(tf.math.log(self.mixture_weights()), present)
        if per_example:
            return tf.exp(tf.transpose(log_weights, [2, 0, 1]))                       # [M, B, D]
        return tf.exp(tf.transpose(log_weights))[:, None, :]                          # [M, 1, D]


def _sum_present(kl: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """A per-expert KL [M, B, D] summed over the experts and dimensions: [B]; with a [B, M]
    mask, over each example's observed experts only."""
    if mask is not None:
        kl = tf.where(aggregation.expert_mask(mask), kl, tf.zeros_like(kl))
    return tf.reduce_sum(kl, axis=[0, 2])
