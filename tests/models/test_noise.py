"""Keyed noise: an example's draws depend on its row in the global batch, not on the split."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from bmvae_tf.models import MODELS
from bmvae_tf.noise import Noise
from tests import synthetic

SEED = tf.constant([11, 5])


@pytest.mark.parametrize("draw", ["normal", "laplace", "gumbel"])
def test_replica_slices_of_a_global_draw_are_the_one_device_draw(draw):
    whole = getattr(Noise(SEED), draw)([3, 2], 8, [5]).numpy()                    # [3, 2, 8, 5]
    halves = [getattr(Noise(SEED, offset=o, global_batch=8), draw)([3, 2], 4, [5]).numpy()
              for o in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=2), whole)
    # Streams from split() differ from each other and from the parent.
    a, b = Noise(SEED).split(2)
    assert not np.allclose(getattr(a, draw)([], 8).numpy(), getattr(b, draw)([], 8).numpy())


@pytest.mark.parametrize("draw,dist", [("normal", scipy.stats.norm), ("laplace", scipy.stats.laplace),
                                       ("gumbel", scipy.stats.gumbel_r)])
def test_noise_has_its_distribution(draw, dist):
    samples = getattr(Noise(SEED), draw)([], 40_000).numpy()
    assert scipy.stats.kstest(samples, dist.cdf).pvalue > 1e-3
    assert scipy.stats.kstest(samples + 0.05, dist.cdf).pvalue < 1e-6   # the test has power


def test_dirichlet_rows_match_and_have_the_right_mean():
    beta = tf.constant([[0.5, 2.0, 1.5], [3.0, 1.0, 1.0]])
    whole = Noise(SEED).dirichlet(6, beta).numpy()
    halves = [Noise(SEED, offset=o, global_batch=6).dirichlet(3, beta).numpy() for o in (0, 3)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    many = Noise(SEED).dirichlet(20_000, beta).numpy()
    np.testing.assert_allclose(many.sum(-1), 1.0, rtol=1e-5)
    expected = beta.numpy() / beta.numpy().sum(-1, keepdims=True)
    np.testing.assert_allclose(many.mean(0), expected, atol=0.01)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_loss_per_example_is_independent_of_the_batch_split(name):
    """The property that makes a mirrored step equal a one-device step on the same global batch."""
    cls, fixed = MODELS[name]
    specs = synthetic.digits_like_modalities(3)
    kwargs = dict(synthetic.TINY_NETWORKS, posterior=cls.POSTERIOR_FAMILIES[0], **fixed)
    if "K" in cls.__init__.__code__.co_varnames:
        kwargs["K"] = 3
    model = cls(specs, 4, **kwargs)
    x = synthetic.random_inputs(specs, 6)
    whole = model.loss_terms(x, Noise(SEED)).per_example.numpy()
    parts = []
    for offset in (0, 2, 4):
        part = {k: v[offset:offset + 2] for k, v in x.items()}
        parts.append(model.loss_terms(part, Noise(SEED, offset=offset, global_batch=6)).per_example.numpy())
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5)
    # ... and the noise matters: another seed gives other losses.
    assert not np.allclose(model.loss_terms(x, Noise(SEED + 1)).per_example.numpy(), whole, rtol=1e-5)


def test_uniform_never_reaches_0_or_1_so_every_inversion_is_finite():
    """One draw in 2^24 would be exactly 1.0 with a 24-bit grid (k + 1/2 rounds in float32), and
    -log(-log 1) = inf: a training run of millions of draws diverges."""
    from bmvae_tf.noise import open_uniform_from_bits

    extremes = tf.constant([-1, 0, 1, 2**31 - 1, -2**31, -2, 2**31 - 512, -512], tf.int32)
    u = open_uniform_from_bits(extremes).numpy()
    assert np.all(u > 0) and np.all(u < 1), u
    assert u.max() == np.float32(1 - 2.0**-24) and u.min() == np.float32(2.0**-24)
    u = tf.constant(u)
    for inverse in (tf.math.ndtri(u), -tf.math.log(-tf.math.log(u)), tf.math.log1p(-tf.abs(2 * u - 1))):
        assert np.all(np.isfinite(inverse.numpy()))
