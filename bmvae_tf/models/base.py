"""The shared frame of every multimodal VAE: one encoder and decoder per modality, the prior,
the weighted reconstruction term and the importance-sampled log-likelihood estimator.

A model is a pure function of tensors: it never reads files or flags. Subclasses define
`loss_terms` (the training objective) and `posterior` (the joint posterior of any subset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import distributions, missing
from bmvae_tf import networks as networks_lib
from bmvae_tf.keras_fit import KerasFit
from bmvae_tf.schema import ModalitySpec

if TYPE_CHECKING:
    from bmvae_tf.noise import Noise

tfd = tfp.distributions


class LossTerms(NamedTuple):
    """What one training step needs from a model.

    per_example: [B], the negative objective of each example; the loop sums it and divides by the
        global batch size. global_term: a scalar counted once per step (regularisers on global
        parameters such as BMVAE_M's mixture logits); the loop divides it by the replica count.
    metrics: scalar batch means for logging.
    """

    per_example: tf.Tensor
    global_term: tf.Tensor
    metrics: Mapping[str, tf.Tensor]


class MultimodalVAE(KerasFit, keras.Model):
    """Encoders, decoders and shared maths for M >= 1 modalities.

    Args:
      modalities: the manifest's modality specs, in manifest order.
      latent_dim: D.
      posterior: "gaussian" or "laplace": the family of experts and prior.
      likelihood_scale: the fixed scale of Laplace/Gaussian likelihoods (0.75 in Shi et al.).
      networks: per-modality network choice ("auto", "mlp", "cnn"); missing names mean "auto".
      hidden_units, channels, sequence_width: network sizes (Tables 3 and 8 by default).
      learn_prior: learn the prior's scale, as Shi et al.'s `--learn-prior` (their recipe for
        MNIST-SVHN and CUB): p(z) keeps loc 0 and takes the scale softmax(l) * D per latent
        dimension, l a trainable [D] weight `prior_scale_logits` starting at 0 (scale 1). The
        scales sum to D, exactly as in their `pz_params`. False (the default) keeps the fixed
        N(0, 1) or Laplace(0, 1) prior and creates no weight.
      prior_dim: the dimension of z when it differs from the experts' (the MS variants pass
        D_c + M D_s); None means latent_dim. Not a config field.

    A subclass adds its own keyword arguments and lists them in `get_config()`; those that are
    hyper-parameters of the objective come from a frozen dataclass declared beside the class,
    named in `HYPER_PARAMETERS`, which gives the constructor its defaults and checks the values.
    """

    # Expert families this model supports; the first is the default of `posterior: auto`.
    POSTERIOR_FAMILIES: tuple[str, ...] = ("laplace", "gaussian")
    # The hyper-parameter dataclasses this class (or mixin) adds to its bases', keyed by their
    # section of the trainer config (`model.<section>`). `hyper_parameter_sections()` collects
    # them over the class hierarchy.
    HYPER_PARAMETERS: Mapping[str, type] = {}
    # True if the objective importance-weights K samples per example: the constructor takes K.
    IMPORTANCE_SAMPLED: bool = False

    def __init__(self, modalities: Sequence[ModalitySpec], latent_dim: int, *,
                 posterior: str = "laplace", likelihood_scale: float = 0.75,
                 networks: Mapping[str, str] | None = None, hidden_units: Sequence[int] = (400,),
                 channels: Sequence[int] = (32, 64, 128), sequence_width: int = 128,
                 learn_prior: bool = False, prior_dim: int | None = None, **kwargs):
        # The model's own maths (distributions, mixture weights) is float32 under any global dtype
        # policy; only its networks, which take the global policy, compute in float16 under
        # mixed_float16.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if posterior not in self.POSTERIOR_FAMILIES:
            raise ValueError(f"{type(self).__name__} supports posterior families "
                             f"{self.POSTERIOR_FAMILIES}, got {posterior!r}")
        self.modalities = tuple(modalities)
        self.latent_dim = int(latent_dim)
        self.posterior_family = posterior
        self.likelihood_scale = float(likelihood_scale)
        networks = dict(networks or {})
        self.networks = networks
        self.hidden_units, self.channels = tuple(hidden_units), tuple(channels)
        self.sequence_width = int(sequence_width)
        sizes = dict(hidden_units=self.hidden_units, channels=self.channels,
                     sequence_width=self.sequence_width)
        self.encoders = [networks_lib.build_encoder(m, latent_dim, networks.get(m.name, "auto"), **sizes)
                         for m in self.modalities]
        self.decoders = [networks_lib.build_decoder(m, networks.get(m.name, "auto"), **sizes)
                         for m in self.modalities]
        self.likelihood_weights = [float(m.likelihood_weight) for m in self.modalities]
        self.learn_prior = bool(learn_prior)
        # Only a learned prior adds a weight, so runs without it keep their checkpoint layout.
        self.prior_scale_logits = self.add_weight(
            shape=(int(prior_dim or latent_dim),), initializer="zeros", name="prior_scale_logits",
        ) if self.learn_prior else None

    @classmethod
    def hyper_parameter_sections(cls) -> dict[str, type]:
        """Every hyper-parameter dataclass the model's constructor reads, by config section: the
        class's own and its bases' (MMVAEMS: `ms` from its mixin and `mmvae` from MMVAE)."""
        sections: dict[str, type] = {}
        for klass in reversed(cls.__mro__):
            sections.update(vars(klass).get("HYPER_PARAMETERS", {}))
        return sections

    def get_config(self) -> dict:
        """The constructor's arguments, JSON-serialisable (modalities as manifest dicts).

        Subclasses add theirs, so `type(model).from_config(model.get_config())` builds the same
        model with fresh weights.
        """
        config = super().get_config()  # name, trainable, dtype
        config.update({
            "modalities": [m.to_json() for m in self.modalities],
            "latent_dim": self.latent_dim,
            "posterior": self.posterior_family,
            "likelihood_scale": self.likelihood_scale,
            "networks": dict(self.networks),
            "hidden_units": list(self.hidden_units),
            "channels": list(self.channels),
            "sequence_width": self.sequence_width,
            "learn_prior": self.learn_prior,
        })
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> "MultimodalVAE":
        config = dict(config)
        config["modalities"] = [ModalitySpec.from_json(m, f"{cls.__name__} config modality {i}")
                                for i, m in enumerate(config["modalities"])]
        return cls(**config)

    # ---------------------------------------------------------------- shared pieces
    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def all_present(self) -> tf.Tensor:
        return tf.ones([self.num_modalities], tf.bool)

    def encode(self, inputs: Mapping[str, tf.Tensor],
               present: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Every expert's parameters: loc and scale, each [M, B, D].

        With `present` (bool [M], or [B, M] per example), absent experts get loc 0 and scale 1.
        They carry zero weight downstream, but 0 * NaN is NaN: whatever was fed for an absent
        modality must not reach the posterior. The replacement also gives an absent expert's
        encoder exactly zero gradient from that example.
        """
        locs, scales = [], []
        for spec, encoder in zip(self.modalities, self.encoders):
            loc, raw_scale = encoder(inputs[spec.name])
            # Under mixed_float16 the networks compute in float16; distributions stay float32.
            loc, raw_scale = tf.cast(loc, tf.float32), tf.cast(raw_scale, tf.float32)
            locs.append(loc)
            scales.append(distributions.posterior_scale(self.posterior_family, raw_scale))
        loc, scale = tf.stack(locs), tf.stack(scales)
        if present is not None:
            present = tf.convert_to_tensor(present, tf.bool)
            given = present[:, None, None] if present.shape.rank == 1 else tf.transpose(present)[:, :, None]
            loc = tf.where(given, loc, tf.zeros_like(loc))
            scale = tf.where(given, scale, tf.ones_like(scale))
        return loc, scale

    def prior_scale(self) -> tf.Tensor:
        """The prior's scale over every dimension of z, [D]: softmax(l) * D with learn_prior
        (Shi et al.'s parameterisation), else ones."""
        if not self.learn_prior:
            return tf.ones([self.latent_dim], tf.float32)
        logits = tf.convert_to_tensor(self.prior_scale_logits)
        return tf.nn.softmax(logits) * float(logits.shape[0])

    def prior(self) -> tfd.Distribution:
        """p(z), batch shape [D]: loc 0 and scale `prior_scale()`. Every term that names the
        prior (KLs, log p(z), the prior expert of a product, prior samples) goes through it."""
        if not self.learn_prior:
            return distributions.standard_prior(self.posterior_family, self.latent_dim)
        scale = self.prior_scale()
        return distributions.expert(self.posterior_family, tf.zeros_like(scale), scale)

    def expert_prior_scale(self) -> tf.Tensor:
        """The prior's scale over the dimensions the experts are aggregated on, [D] (the shared
        D_c of the MS variants): the prior expert of MVAE's and mmJSD's products."""
        return self.prior_scale()

    def decoder_latents(self, index: int, z: tf.Tensor) -> tf.Tensor:
        """The part of z [..., D] that decoder `index` reads: all of it, unless a model splits z."""
        del index
        return z

    def decode_params(self, index: int, z: tf.Tensor) -> tf.Tensor:
        """Decoder `index` on latents [..., D] -> likelihood parameters [..., *param_shape]."""
        z = self.decoder_latents(index, z)
        lead = tf.shape(z)[:-1]
        params = tf.cast(self.decoders[index](tf.reshape(z, [-1, z.shape[-1]])), tf.float32)
        return tf.reshape(params, tf.concat([lead, tf.shape(params)[1:]], 0))

    def reconstruction_log_prob(self, inputs: Mapping[str, tf.Tensor], z: tf.Tensor,
                                present: tf.Tensor | None = None) -> tf.Tensor:
        """sum_m w_m log p(x_m | z) over the present modalities: z [..., B, D] -> [..., B].

        present: None (all), bool [M], or bool [B, M] (per example: an absent modality's term
        is zero for that example, and its decoder gets no gradient from it).

        The TRAINING term: w_m is the modality's likelihood weight (the manifest's, or the config's
        model.likelihood_weights). A reported likelihood never uses it: see `modality_log_probs`.
        One decoder pass per modality for all leading sample dimensions at once.
        """
        total = 0.0
        for index, spec in enumerate(self.modalities):
            log_prob = self.modality_log_prob(index, inputs[spec.name], z)
            if present is not None:
                log_prob = tf.where(present[..., index], log_prob, tf.zeros_like(log_prob))
            total += self.likelihood_weights[index] * log_prob
        return total

    def modality_log_probs(self, inputs: Mapping[str, tf.Tensor], z: tf.Tensor) -> tf.Tensor:
        """Unweighted log p(x_m | z) of every modality, stacked: z [..., B, D] -> [M, ..., B].

        What every reported likelihood (`log_marginals`) scores; one decoder pass per modality.
        """
        return tf.stack([self.modality_log_prob(index, inputs[spec.name], z)
                         for index, spec in enumerate(self.modalities)])

    def modality_log_prob(self, index: int, x: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """log p(x_m | z) for modality `index`: x [B, *shape], z [..., B, D] -> [..., B]."""
        spec = self.modalities[index]
        params = self.decode_params(index, z)
        x = tf.cast(x, tf.int64 if spec.likelihood == "categorical" else params.dtype)
        return distributions.likelihood(spec, params, self.likelihood_scale).log_prob(x)

    def generate(self, z: tf.Tensor) -> dict[str, tf.Tensor]:
        """Decoded means (argmax tokens for sequences) of every modality from latents [..., D]."""
        return {spec.name: distributions.likelihood_mean(spec, self.decode_params(i, z))
                for i, spec in enumerate(self.modalities)}

    # What mixture_weights() returns, as reports name it ("alpha" for BMVAE_M, "E[pi]" for BMVAE_P).
    MIXTURE_WEIGHTS_NAME: str | None = None

    def mixture_weights(self) -> tf.Tensor | None:
        """[D, M] learned per-dimension weights over modalities, for BMVAE models; else None."""
        return None

    # ---------------------------------------------------------------- model-specific
    def loss_terms(self, inputs: Mapping[str, tf.Tensor], noise: Noise | tf.Tensor,
                   present: tf.Tensor | None = None) -> LossTerms:
        """The objective of a batch. noise: a bmvae_tf.noise.Noise, keyed by example, or a plain
        int32 [2] seed for a batch that is the whole global batch. present: the observed
        modalities, None (all), bool [M] or bool [B, M] (bmvae_tf.missing): each example's
        objective is the model's own over its observed modalities; all True gives bit for bit
        the objective of None."""
        raise NotImplementedError

    def example_mask(self, inputs: Mapping[str, tf.Tensor], present) -> tf.Tensor | None:
        """`present` as bool [B, M], or None when every modality is observed (bmvae_tf.missing)."""
        batch = tf.shape(inputs[self.modalities[0].name])[0]
        return missing.example_mask(present, batch, self.num_modalities)

    def posterior(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor) -> tfd.Distribution:
        """The joint posterior of the present modalities: batch [B], event [D]."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def build(self, input_shape=None):
        # Sub-layers build themselves on first call; the model's own weights need no shapes.
        self.built = True

    def call(self, inputs, training=False):
        return self.posterior(inputs, self.all_present()).mean()

    def log_marginal(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor, num_samples: int,
                     seed: tf.Tensor, chunk_size: int = 100) -> tf.Tensor:
        """IWAE estimate of log p(x_S) for the present subset S, [B] (Eq. 1, Burda et al.):
        `log_marginals` with S as the only scored subset. Unweighted: the likelihood weights of
        training never enter it."""
        present = tf.convert_to_tensor(present, tf.bool)
        return self.log_marginals(inputs, present, present[None], num_samples, seed, chunk_size)[0]

    def log_marginals(self, inputs: Mapping[str, tf.Tensor], present: tf.Tensor, scored: tf.Tensor,
                      num_samples: int, seed: tf.Tensor, chunk_size: int = 100) -> tf.Tensor:
        """IWAE estimates of log p(x_A) for every row A of `scored`, all from one proposal: [N, B].

            log (1/K) sum_k p(x_A | z_k) p(z_k) / q(z_k | x_S),   z_k ~ q(z | x_S),  S = present,

        with p(x_A | z) = prod_{m in A} p(x_m | z), UNWEIGHTED (the likelihood weights of training
        never enter a likelihood). Every row shares the same K samples, so for A = T u S the
        difference of rows A and S is the conditional estimate of log p(x_T | x_S) (docs/metrics.md).
        For A = S it is the IWAE lower bound of log p(x_S), exact for any K when q is the true
        posterior. The proposal sees only x_S: the absent modalities are zeroed before encoding;
        the scored modalities are read from `inputs` as given.

        Args:
          present: bool [M], the proposal's subset S. scored: bool [N, M], the subsets A.
          num_samples: K. seed: int32 [2]; chunk i of the samples draws from
            fold_in(seed, i * chunk_size), whatever `scored` is.

        The samples are drawn `chunk_size` at a time and folded into a running log-sum-exp. The
        full chunks run in a tf.while_loop with one iteration in flight, so a traced graph holds
        one chunk's decoder activations whatever K is (the paper's K = 1000 and beyond); an
        unrolled Python loop would let TensorFlow run every chunk at once.
        """
        present = tf.convert_to_tensor(present, tf.bool)
        scored = tf.convert_to_tensor(scored, tf.bool)[:, :, None, None]                 # [N, M, 1, 1]
        given = {spec.name: tf.where(present[m], inputs[spec.name], tf.zeros_like(inputs[spec.name]))
                 for m, spec in enumerate(self.modalities)}
        proposal = self.posterior(given, present)
        prior = self.prior()

        def chunk_log_sum(start, k: int) -> tf.Tensor:
            z = proposal.sample(k, seed=tf.random.experimental.stateless_fold_in(seed, start))
            log_lik = self.modality_log_probs(inputs, z)                                 # [M, k, B]
            log_lik = tf.reduce_sum(tf.where(scored, log_lik[None], tf.zeros_like(log_lik[None])), 1)
            log_w = log_lik + tf.reduce_sum(prior.log_prob(z), -1) - proposal.log_prob(z)  # [N, k, B]
            return tf.reduce_logsumexp(log_w, axis=1)                                    # [N, B]

        def accumulate(running: tf.Tensor, chunk: tf.Tensor) -> tf.Tensor:
            return tf.reduce_logsumexp(tf.stack([running, chunk]), axis=0)

        full_chunks, rest = divmod(int(num_samples), int(chunk_size))
        shape = tf.stack([tf.shape(scored)[0], proposal.batch_shape_tensor()[0]])
        running = tf.fill(shape, tf.constant(-float("inf"), tf.float32))
        if full_chunks:
            _, running = tf.while_loop(
                lambda i, _: i < full_chunks,
                lambda i, r: (i + 1, accumulate(r, chunk_log_sum(i * chunk_size, chunk_size))),
                [tf.constant(0), running], parallel_iterations=1)
        if rest:
            running = accumulate(running, chunk_log_sum(full_chunks * chunk_size, rest))
        return running - tf.math.log(tf.cast(num_samples, running.dtype))
