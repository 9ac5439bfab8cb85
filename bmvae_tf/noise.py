"""Stateless randomness keyed by each example's row in the global batch.

Under tf.distribute every replica holds a slice of the global batch. Were each replica to draw
from a seed of its own, a step on two replicas would use other random numbers than the same
step on one device, and the two could not be compared. So every draw here is made for the whole
global batch from the step's seed, and each replica keeps the rows of its own examples: example
g of the global batch sees the same noise however the batch is split. The price is that each
replica generates R times the noise it uses; noise is a few numbers per latent dimension, small
next to the networks' activations.

Everything is reparameterised: samples are deterministic, differentiable functions of the
parameters and of this noise (Gamma draws through TFP's implicit gradient). Normal, Laplace and
Gumbel noise are inversions of uniforms built from Philox integers (`_open_uniform`), so an
XLA-compiled step draws the same numbers as a plain one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

Shape = Sequence["int | tf.Tensor"]


class Noise:
    """A stream of keyed noise.

    Args:
      seed: int32 [2], a stateless seed.
      offset: the global row of this replica's first example (0 on one device).
      global_batch: the rows of the global batch; None means this batch is the global batch.
    """

    def __init__(self, seed, *, offset: "int | tf.Tensor" = 0, global_batch: int | None = None):
        self.seed = tf.cast(seed, tf.int32)
        self.offset = offset
        self.global_batch = global_batch

    @classmethod
    def of(cls, seed_or_noise: "Noise | tf.Tensor") -> "Noise":
        """A Noise as it is, or a one-device Noise from a plain seed."""
        return seed_or_noise if isinstance(seed_or_noise, Noise) else cls(seed_or_noise)

    def split(self, n: int) -> list["Noise"]:
        """n independent streams with the same keying."""
        # stateless_split's default algorithm differs under XLA; name Philox so it does not.
        seeds = tf.random.stateless_uniform([n, 2], self.seed, minval=None, maxval=None,
                                            dtype=tf.int32, alg="philox")
        return [Noise(seeds[i], offset=self.offset, global_batch=self.global_batch) for i in range(n)]

    # ---------------------------------------------------------------- draws
    def _rows(self, draw, sample_shape: Shape, batch: "int | tf.Tensor", event_shape: Shape) -> tf.Tensor:
        """draw(shape, seed) for all global rows, cut to this replica's: [*sample_shape, batch, *event]."""
        rows = batch if self.global_batch is None else self.global_batch
        sample_shape, event_shape = list(sample_shape), list(event_shape)
        full = draw(tf.stack([rows, *sample_shape, *event_shape]), self.seed)
        mine = full[self.offset:self.offset + batch] if self.global_batch is not None else full
        n = len(sample_shape)
        if n == 0:
            return mine
        rank = 1 + n + len(event_shape)
        return tf.transpose(mine, [*range(1, n + 1), 0, *range(n + 1, rank)])

    def uniform(self, sample_shape: Shape, batch, event_shape: Shape = ()) -> tf.Tensor:
        """Uniform noise on the open interval (0, 1)."""
        return self._rows(_open_uniform, sample_shape, batch, event_shape)

    def normal(self, sample_shape: Shape, batch, event_shape: Shape = ()) -> tf.Tensor:
        """N(0, 1) noise by inversion, [*sample_shape, batch, *event_shape]."""
        return self._rows(lambda shape, seed: tf.math.ndtri(_open_uniform(shape, seed)),
                          sample_shape, batch, event_shape)

    def laplace(self, sample_shape: Shape, batch, event_shape: Shape = ()) -> tf.Tensor:
        """Laplace(0, 1) noise by inversion of a uniform on (-1, 1), as TFP draws it."""
        def draw(shape, seed):
            u = 2.0 * _open_uniform(shape, seed) - 1.0
            return -tf.sign(u) * tf.math.log1p(-tf.abs(u))
        return self._rows(draw, sample_shape, batch, event_shape)

    def standard(self, family: str, sample_shape: Shape, batch, event_shape: Shape = ()) -> tf.Tensor:
        """Standard noise of an expert family: gaussian -> N(0, 1), laplace -> Laplace(0, 1)."""
        if family == "gaussian":
            return self.normal(sample_shape, batch, event_shape)
        if family == "laplace":
            return self.laplace(sample_shape, batch, event_shape)
        raise ValueError(f"unknown family {family!r}")

    def gumbel(self, sample_shape: Shape, batch, event_shape: Shape = ()) -> tf.Tensor:
        """Gumbel(0, 1) noise, -log(-log u) with u uniform on (0, 1)."""
        return self._rows(lambda shape, seed: -tf.math.log(-tf.math.log(_open_uniform(shape, seed))),
                          sample_shape, batch, event_shape)

    def dirichlet(self, batch, concentration: tf.Tensor) -> tf.Tensor:
        """One Dirichlet(concentration) draw per example, [batch, *concentration.shape].

        The concentration is shared by all examples (a global parameter), so the whole global
        batch can be drawn from it. Normalised Gamma draws from TFP's sampler, whose gradient
        with respect to the concentration is an implicit reparameterisation and which, unlike
        tf.random.stateless_gamma, compiles under XLA. Under XLA it draws other numbers than
        without (its uniform algorithm is chosen per device); the distribution is the same.
        """
        concentration = tf.convert_to_tensor(concentration)
        dtype = concentration.dtype
        gamma = self._rows(
            lambda shape, seed: tfd.Gamma(concentration, tf.ones([], dtype)).sample(shape[:1], seed=seed),
            [], batch, concentration.shape)
        # Tiny concentrations can underflow every Gamma to 0; keep the simplex finite.
        gamma = tf.maximum(gamma, np.finfo(dtype.as_numpy_dtype).tiny)
        return gamma / tf.reduce_sum(gamma, axis=-1, keepdims=True)


def _open_uniform(shape, seed: tf.Tensor) -> tf.Tensor:
    """float32 uniform on the open interval (0, 1), from Philox integers.

    Philox integers are the one stateless draw that XLA and the TensorFlow kernels produce alike
    when the seed is a runtime value (as a step's seed is); their float and normal draws differ.
    """
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int32,
                                       alg="philox")
    return open_uniform_from_bits(bits)


def open_uniform_from_bits(bits: tf.Tensor) -> tf.Tensor:
    """(k + 1/2) / 2^23 for the top 23 bits k of each int32: exact in float32, so every value
    lies in [2^-24, 1 - 2^-24]. With 24 bits, k + 1/2 would round, k = 2^24 - 1 would give
    exactly 1.0, and the Gumbel and normal inversions of it are infinite. The grid bounds
    normal noise to |z| < 5.3, far in the tails for a VAE's reparameterisation."""
    k = tf.bitwise.right_shift(tf.bitcast(bits, tf.uint32), 9)
    return (tf.cast(k, tf.float32) + 0.5) * (1.0 / (1 << 23))


def reparameterized_sample(family: str, loc: tf.Tensor, scale: tf.Tensor, noise: Noise,
                           sample_shape: Shape = (), batch_axis: int = 0) -> tf.Tensor:
    """loc + scale * eps, eps keyed by example: [*sample_shape, *loc.shape].

    batch_axis: which axis of loc is the example axis ([M, B, D] experts have it at 1).
    """
    lead = [loc.shape[i] for i in range(batch_axis)]
    event = [loc.shape[i] for i in range(batch_axis + 1, loc.shape.rank)]
    eps = noise.standard(family, [*sample_shape, *lead], tf.shape(loc)[batch_axis], event)
    return loc + scale * eps
