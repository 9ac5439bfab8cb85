"""The MS variants (Eq. 5): z = [c, s_1..s_M], decoder m reads [c, s_m], s_m is inferred from x_m
alone and drawn from its prior when x_m is not given."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf.models import MODELS
from bmvae_tf.models.mmvae_ms import MMVAEMS
from bmvae_tf.noise import Noise
from tests import synthetic

tfd = tfp.distributions

SHARED, PRIVATE = 4, 3
MS_MODELS = ["mvae_ms", "mmvae_ms", "mmjsd_ms"]


def _build(name, num_modalities=3, **kwargs):
    cls, fixed = MODELS[name]
    specs = synthetic.digits_like_modalities(num_modalities)
    kwargs = {**synthetic.TINY_NETWORKS, "posterior": "gaussian", "private_dim": PRIVATE, **fixed, **kwargs}
    model = cls(specs, SHARED, **kwargs)
    return model, specs


def _numpy_experts(model, x):
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    return loc[..., :SHARED], scale[..., :SHARED], loc[..., SHARED:], scale[..., SHARED:]


def _normal_kl(mu1, s1, mu2=0.0, s2=1.0):
    return np.log(s2 / s1) + (s1 ** 2 + (mu1 - mu2) ** 2) / (2 * s2 ** 2) - 0.5


def _zero_reconstruction(model):
    model.reconstruction_log_prob = lambda inputs, z, present=None: tf.zeros(tf.shape(z)[:-1])
    model.modality_log_prob = lambda index, x, z: tf.zeros(tf.shape(z)[:-1])


@pytest.mark.parametrize("name", MS_MODELS)
def test_latent_layout_and_each_decoder_reads_only_c_and_its_own_s(name):
    model, specs = _build(name)
    x = synthetic.random_inputs(specs, 4)
    model.loss_terms(x, tf.constant([1, 2]))                                     # builds the layers
    assert model.latent_dim == SHARED + 3 * PRIVATE
    z = tf.random.stateless_normal([4, model.latent_dim], seed=[3, 4])
    for m in range(3):
        base = model.decode_params(m, z).numpy()
        for block in range(3):
            start = SHARED + block * PRIVATE
            moved = tf.concat([z[:, :start], z[:, start:start + PRIVATE] + 3.0, z[:, start + PRIVATE:]], -1)
            changed = model.decode_params(m, moved).numpy()
            if block == m:
                assert np.abs(changed - base).max() > 1e-4
            else:
                np.testing.assert_array_equal(changed, base)
        moved_c = tf.concat([z[:, :SHARED] + 3.0, z[:, SHARED:]], -1)
        assert np.abs(model.decode_params(m, moved_c).numpy() - base).max() > 1e-4


@pytest.mark.parametrize("name", MS_MODELS)
@pytest.mark.parametrize("given", [(0,), (1, 2), (0, 1, 2)])
def test_subset_posterior_is_shared_aggregate_times_private_experts_or_priors(name, given):
    model, specs = _build(name)
    x = synthetic.random_inputs(specs, 5)
    c_loc, c_scale, s_loc, s_scale = _numpy_experts(model, x)
    present = tf.constant([m in given for m in range(3)])
    # Whatever an absent modality holds must not matter.
    garbage = dict(x, **{specs[m].name: tf.fill(x[specs[m].name].shape, np.nan)
                         for m in range(3) if m not in given and specs[m].kind != "sequence"})
    posterior = model.posterior(garbage, present)
    mean = posterior.mean().numpy()
    # tfd.Blockwise has no stddev of its own; its blocks do.
    stddev = np.concatenate([d.stddev().numpy() for d in posterior.distributions], -1)

    for m in range(3):
        block = slice(SHARED + m * PRIVATE, SHARED + (m + 1) * PRIVATE)
        if m in given:
            np.testing.assert_allclose(mean[:, block], s_loc[m], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stddev[:, block], s_scale[m], rtol=1e-5)
        else:
            np.testing.assert_array_equal(mean[:, block], 0.0)
            np.testing.assert_allclose(stddev[:, block], 1.0, rtol=1e-6)

    idx = list(given)
    if name in ("mmvae_ms", "mmjsd_ms"):         # uniform mixture of the given shared experts
        expected = c_loc[idx].mean(0)
    else:                                        # MVAE: product with the prior, weights 1
        w = 1.0
        precision = w + sum(w / c_scale[m] ** 2 for m in idx)
        expected = sum(w * c_loc[m] / c_scale[m] ** 2 for m in idx) / precision
        np.testing.assert_allclose(stddev[:, :SHARED], precision ** -0.5, rtol=1e-4)
    np.testing.assert_allclose(mean[:, :SHARED], expected, rtol=1e-4, atol=1e-6)


def test_mvae_ms_loss_is_its_closed_form_kls_without_reconstruction():
    model, specs = _build("mvae_ms")
    x = synthetic.random_inputs(specs, 5)
    c_loc, c_scale, s_loc, s_scale = _numpy_experts(model, x)
    _zero_reconstruction(model)
    terms = model.loss_terms(x, tf.constant([1, 2]))

    def kl_poe(indices):
        precision = 1 + sum(1 / c_scale[i] ** 2 for i in indices)
        mean = sum(c_loc[i] / c_scale[i] ** 2 for i in indices) / precision
        return _normal_kl(mean, precision ** -0.5).sum(-1)

    kl_private = _normal_kl(s_loc, s_scale).sum(-1)                              # [M, B]
    expected = (kl_poe([0, 1, 2]) + kl_private.sum(0)
                + sum(kl_poe([m]) + kl_private[m] for m in range(3)))
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)


def test_mmjsd_ms_loss_is_js_of_shared_experts_plus_private_kls_without_reconstruction():
    model, specs = _build("mmjsd_ms")
    x = synthetic.random_inputs(specs, 5)
    c_loc, c_scale, s_loc, s_scale = _numpy_experts(model, x)
    _zero_reconstruction(model)
    terms = model.loss_terms(x, tf.constant([1, 2]))

    w = 1.0 / 4
    precision = w + sum(w / c_scale[m] ** 2 for m in range(3))
    f_mean = sum(w * c_loc[m] / c_scale[m] ** 2 for m in range(3)) / precision
    f_std = precision ** -0.5
    js = (sum(_normal_kl(c_loc[m], c_scale[m], f_mean, f_std).sum(-1) for m in range(3))
          + _normal_kl(0.0, 1.0, f_mean, f_std).sum(-1)) / 4
    expected = js + _normal_kl(s_loc, s_scale).sum(-1).sum(0)
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_mmvae_ms_weights_samples_by_the_density_of_its_joint_posterior(family):
    """The importance weights' q must be the posterior evaluate and export sample from, and stratum
    m must draw c from expert m and each s_m' from q(s_m' | x_m')."""
    model, specs = _build("mmvae_ms", K=4000, posterior=family)
    x = synthetic.random_inputs(specs, 2)
    loc, scale = model.encode(x)
    z = model.sample_strata(loc, scale, Noise(tf.constant([7, 8])))                   # [K, M, B, D]
    assert z.shape == (4000, 3, 2, model.latent_dim)
    np.testing.assert_allclose(model.joint_log_prob(z, loc, scale).numpy(),
                               model.posterior(x, model.all_present()).log_prob(z).numpy(),
                               rtol=1e-4, atol=1e-3)

    c_loc, c_scale, s_loc, s_scale = _numpy_experts(model, x)
    samples = z.numpy().astype(np.float64)
    stderr = samples.std(0) / np.sqrt(4000)                                      # [M, B, D]
    for m in range(3):
        np.testing.assert_array_less(np.abs(samples[:, m, :, :SHARED].mean(0) - c_loc[m]),
                                     4 * stderr[m, :, :SHARED] + 1e-6)
        for j in range(3):                        # every stratum draws every private block
            block = slice(SHARED + j * PRIVATE, SHARED + (j + 1) * PRIVATE)
            np.testing.assert_array_less(np.abs(samples[:, m, :, block].mean(0) - s_loc[j]),
                                         4 * stderr[m, :, block] + 1e-6)


def test_mmvae_ms_tight_bound_dominates_and_decodes_m_squared_k_rows():
    K, batch = 3, 5
    looser, specs = _build("mmvae_ms", K=K)
    tight = MMVAEMS(specs, SHARED, K=K, bound="tight", private_dim=PRIVATE, posterior="gaussian",
                    **synthetic.TINY_NETWORKS)
    x = synthetic.random_inputs(specs, batch)
    looser.loss_terms(x, tf.constant([1, 2]))
    tight.loss_terms(x, tf.constant([1, 2]))
    tight.set_weights(looser.get_weights())
    calls = synthetic.record_decoder_calls(looser)
    l_m = -looser.loss_terms(x, tf.constant([3, 4])).per_example.numpy()
    l_t = -tight.loss_terms(x, tf.constant([3, 4])).per_example.numpy()
    assert np.all(l_t >= l_m - 1e-6 * np.abs(l_m)), (l_t, l_m)
    assert sorted(i for i, _ in calls) == [0, 1, 2]
    assert sum(int(z.shape[0]) for _, z in calls) == 3 * 3 * K * batch
    assert all(int(z.shape[-1]) == SHARED + PRIVATE for _, z in calls)


@pytest.mark.parametrize("name", MS_MODELS)
def test_ms_model_trains_on_four_modalities(name):
    model, specs = _build(name, num_modalities=4, **({"K": 2, "dreg": True} if name == "mmvae_ms" else {}))
    x = synthetic.random_inputs(specs, 6)
    seed = tf.constant([5, 6])
    model.loss_terms(x, seed)
    variables = model.trainable_variables
    optimizer = tf.keras.optimizers.Adam(3e-3)
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            terms = model.loss_terms(x, seed)
            loss = tf.reduce_mean(terms.per_example) + terms.global_term
        grads = tape.gradient(loss, variables)
        assert not [v.path for v, g in zip(variables, grads) if g is None]
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)
        optimizer.apply_gradients(zip(grads, variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["mvae_ms", "mmjsd_ms"])
def test_product_ms_models_need_gaussian_experts(name):
    with pytest.raises(ValueError, match="Gaussian"):
        _build(name, posterior="laplace")


def test_config_sets_the_private_dimensions_and_rejects_none():
    from bmvae_tf.errors import UserError
    from bmvae_tf.trainers import config as config_lib

    specs = synthetic.digits_like_modalities(3)
    data = config_lib.apply_overrides({}, ["model.name=mmvae_ms", "model.latent_dim=6",
                                           "model.ms.private_dim=2", "model.mmvae.dreg=true"])
    config = config_lib.from_dict(data)                                          # validates
    model = config_lib.build_model(config.model, specs)
    assert (model.shared_dim, model.private_dim, model.latent_dim) == (6, 2, 6 + 3 * 2)
    assert model.dreg and model.posterior_family == "laplace"

    with pytest.raises(UserError, match="model.ms.private_dim"):
        config_lib.from_dict(config_lib.apply_overrides(data, ["model.ms.private_dim=0"]))
