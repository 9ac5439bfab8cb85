"""Products of Gaussian experts and the PoE models: MVAE, mmJSD, BMVAE_P and its uniform ablation."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation
from bmvae_tf.models.bmvae_p import BMVAEP
from bmvae_tf.models.mmjsd import MMJSD
from bmvae_tf.models.mvae import MVAE
from bmvae_tf.noise import Noise
from tests import synthetic

tfd = tfp.distributions

SMALL = dict(synthetic.TINY_NETWORKS, posterior="gaussian")
LATENT = 4
MODELS = {
    "mvae": (MVAE, {}),
    "mmjsd": (MMJSD, {}),
    "bmvae_p": (BMVAEP, {}),
    "bmvae_p_uniform": (BMVAEP, {"learn_weights": False}),
}




def _normal_kl(mu1, s1, mu2, s2):
    """KL(N(mu1, s1^2) || N(mu2, s2^2)) elementwise, in numpy."""
    return np.log(s2 / s1) + (s1 ** 2 + (mu1 - mu2) ** 2) / (2 * s2 ** 2) - 0.5


def _zero_reconstruction(model):
    """Replaces the decoders' log-likelihoods by 0 so a loss is its KL terms alone."""
    model.reconstruction_log_prob = lambda inputs, z, present=None: tf.zeros(tf.shape(z)[:-1])
    model.modality_log_prob = lambda index, x, z: tf.zeros(tf.shape(z)[:-1])


# ---------------------------------------------------------------- product of Gaussians

GRID = np.linspace(-12.0, 12.0, 48001)


def _grid_product(locs, scales, weights, prior_weight=0.0):
    """The normalised product of weighted Gaussian densities on GRID: density, mean, variance."""
    log_density = sum(w * tfd.Normal(np.float64(m), np.float64(s)).log_prob(GRID).numpy()
                      for m, s, w in zip(locs, scales, weights))
    log_density = log_density + prior_weight * tfd.Normal(np.float64(0), np.float64(1)).log_prob(GRID).numpy()
    density = np.exp(log_density - log_density.max())
    density /= np.trapezoid(density, GRID)
    mean = np.trapezoid(GRID * density, GRID)
    return density, mean, np.trapezoid((GRID - mean) ** 2 * density, GRID)


@pytest.mark.parametrize("present,prior_weight", [
    ([True, True, True], 0.0),
    ([True, False, True], 0.0),
    ([True, True, True], 0.4),
    ([False, True, True], 1.0),
])
def test_product_of_gaussians_is_the_normalised_product_of_weighted_densities(present, prior_weight):
    locs, scales, weights = [-1.0, 0.5, 2.0], [0.7, 1.5, 0.4], [0.2, 0.5, 0.3]
    # An absent expert is computed from garbage: NaN location, zero scale, NaN weight.
    given = [(m, s, w) if p else (np.nan, 0.0, np.nan) for m, s, w, p in zip(locs, scales, weights, present)]
    loc = tf.constant([[[g[0]]] for g in given], tf.float32)       # [M=3, B=1, D=1]
    scale = tf.constant([[[g[1]]] for g in given], tf.float32)
    w = tf.constant([[[g[2]]] for g in given], tf.float32)
    product = aggregation.product_of_gaussians(loc, scale, w, tf.constant(present),
                                               prior_weight=prior_weight)
    assert product.batch_shape == (1, 1)

    kept = [(m, s, wt) for m, s, wt, p in zip(locs, scales, weights, present) if p]
    density, mean, variance = _grid_product(*zip(*kept), prior_weight=prior_weight)
    np.testing.assert_allclose(float(product.mean()[0, 0]), mean, atol=1e-4)
    np.testing.assert_allclose(float(product.variance()[0, 0]), variance, rtol=1e-4)
    pdf = product.prob(tf.constant(GRID[::100, None, None], tf.float32)).numpy()[:, 0, 0]
    np.testing.assert_allclose(pdf, density[::100], atol=1e-3)


def test_product_of_gaussians_gradients_ignore_a_garbage_absent_expert():
    loc = tf.Variable([[[0.3, -1.0]], [[np.nan, np.inf]], [[1.0, 2.0]]])     # [3, 1, 2]
    scale = tf.Variable([[[0.5, 1.0]], [[0.0, np.nan]], [[2.0, 0.3]]])
    with tf.GradientTape() as tape:
        product = aggregation.product_of_gaussians(loc, scale, 1.0, tf.constant([True, False, True]))
        loss = tf.reduce_sum(product.mean() + product.stddev())
    grads = tape.gradient(loss, [loc, scale])
    for g in grads:
        assert np.all(np.isfinite(g.numpy()))
        np.testing.assert_array_equal(g.numpy()[1], 0.0)


def test_product_of_gaussians_broadcasts_weights_over_the_batch():
    rng = np.random.default_rng(1)
    loc = rng.normal(size=(3, 5, 4)).astype(np.float32)
    scale = rng.uniform(0.3, 2.0, size=(3, 5, 4)).astype(np.float32)
    weights = rng.dirichlet(np.ones(3), size=4).T[:, None, :].astype(np.float32)   # [M, 1, D]
    product = aggregation.product_of_gaussians(loc, scale, weights, tf.constant([True] * 3))
    precision = (weights / scale ** 2).sum(0)
    np.testing.assert_allclose(product.variance().numpy(), 1 / precision, rtol=1e-5)
    np.testing.assert_allclose(product.mean().numpy(), (weights * loc / scale ** 2).sum(0) / precision,
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- closed-form KLs and Dirichlet gradients

def _assert_kl_matches_monte_carlo(q, p, n, seed):
    x = q.sample(n, seed=seed)
    log_ratio = (q.log_prob(x) - p.log_prob(x)).numpy()
    estimate, stderr = log_ratio.mean(), log_ratio.std() / np.sqrt(n)
    closed = float(tfd.kl_divergence(q, p))
    assert abs(closed - estimate) < 3 * stderr, (closed, estimate, stderr)


def test_dirichlet_kl_matches_monte_carlo():
    q = tfd.Dirichlet(tf.constant([0.7, 2.0, 1.3], tf.float64))
    p = tfd.Dirichlet(tf.constant([0.5, 0.5, 0.5], tf.float64))
    _assert_kl_matches_monte_carlo(q, p, 200_000, tf.constant([4, 2]))


def test_gaussian_kl_matches_monte_carlo():
    q = tfd.Normal(tf.constant(0.8, tf.float64), tf.constant(0.6, tf.float64))
    p = tfd.Normal(tf.constant(-0.3, tf.float64), tf.constant(1.4, tf.float64))
    _assert_kl_matches_monte_carlo(q, p, 200_000, tf.constant([7, 1]))


def _expected_weighted_square(beta, c):
    """E_{pi ~ Dir(beta)}[sum_m c_m pi_m^2] = sum_m c_m beta_m (beta_m + 1) / (b0 (b0 + 1))."""
    b0 = beta.sum()
    return float((c * beta * (beta + 1)).sum() / (b0 * (b0 + 1)))


def test_dirichlet_reparameterised_gradient_matches_finite_differences():
    beta0 = np.array([0.4, 1.5, 3.0])
    c = np.array([1.0, -2.0, 3.0])
    groups, per_group = 40, 5000
    # One copy of beta per group gives `groups` independent gradient estimates in one tape call.
    beta = tf.Variable(np.tile(beta0, (groups, 1)))
    with tf.GradientTape() as tape:
        pi = Noise(tf.constant([3, 9])).dirichlet(per_group, beta)               # [n, G, M]
        value = tf.reduce_sum(tf.reduce_mean(tf.reduce_sum(c * pi ** 2, -1), 0))
    estimates = tape.gradient(value, beta).numpy()                               # [G, M]
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(groups)

    h = 1e-5
    exact = np.array([(_expected_weighted_square(beta0 + h * e, c)
                       - _expected_weighted_square(beta0 - h * e, c)) / (2 * h) for e in np.eye(3)])
    assert np.all(np.abs(mean - exact) < 4 * stderr + 1e-6), (mean, exact, stderr)
    assert np.all(stderr < 0.1 * np.abs(exact)), "the test has no power"


# ---------------------------------------------------------------- the four models

def _build(name, specs, **kwargs):
    cls, fixed = MODELS[name]
    return cls(specs, LATENT, **SMALL, **fixed, **kwargs)


@pytest.mark.parametrize("num_modalities", [3, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_and_ignores_absent_modalities(name, num_modalities):
    specs = synthetic.digits_like_modalities(num_modalities)
    model = _build(name, specs)
    batch = 6
    x = synthetic.random_inputs(specs, batch)
    seed = tf.constant([5, 6])

    with tf.GradientTape() as tape:
        terms = model.loss_terms(x, seed)
        loss = tf.reduce_mean(terms.per_example) + terms.global_term
    assert terms.per_example.shape == (batch,)
    assert np.all(np.isfinite(terms.per_example.numpy()))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    assert not [v.path for v, g in zip(variables, grads) if g is None]
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    beta_paths = [v.path for v in variables if "concentration_logits" in v.path]
    if name == "bmvae_p":
        assert len(beta_paths) == 1
        assert np.abs(grads[[v.path for v in variables].index(beta_paths[0])].numpy()).sum() > 0
    else:
        assert not beta_paths

    # The absent modality is fed NaN (or other tokens): the posterior mean must not change.
    present = tf.constant([i != 1 for i in range(num_modalities)])
    mean = model.posterior(x, present).mean().numpy()
    garbage = dict(x, street=tf.fill(x["street"].shape, np.nan))
    np.testing.assert_allclose(model.posterior(garbage, present).mean().numpy(), mean, rtol=1e-6)
    assert np.all(np.isfinite(mean))

    optimizer = tf.keras.optimizers.Adam(3e-3)
    losses = []
    for _ in range(4):
        with tf.GradientTape() as tape:
            terms = model.loss_terms(x, seed)
            loss = tf.reduce_mean(terms.per_example) + terms.global_term
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", list(MODELS))
def test_only_gaussian_posteriors(name):
    cls, fixed = MODELS[name]
    with pytest.raises(ValueError, match="Gaussian"):
        cls(synthetic.digits_like_modalities(2), LATENT, **dict(SMALL, posterior="laplace"), **fixed)


# ---------------------------------------------------------------- each model's maths

def test_mvae_single_expert_with_the_prior_has_precision_one_over_s2_plus_one():
    specs = synthetic.digits_like_modalities(3)
    model = _build("mvae", specs)
    x = synthetic.random_inputs(specs, 5)
    loc, scale = (t.numpy() for t in model.encode(x))
    for m in range(3):
        posterior = model.posterior(x, tf.constant([i == m for i in range(3)]))
        precision = 1 / scale[m] ** 2 + 1
        np.testing.assert_allclose(posterior.variance().numpy(), 1 / precision, rtol=1e-5)
        np.testing.assert_allclose(posterior.mean().numpy(), loc[m] / scale[m] ** 2 / precision,
                                   rtol=1e-4, atol=1e-6)


def test_mvae_loss_is_the_joint_plus_single_modality_kls_without_reconstruction():
    specs = synthetic.digits_like_modalities(3)
    model = _build("mvae", specs)
    x = synthetic.random_inputs(specs, 5)
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    _zero_reconstruction(model)
    terms = model.loss_terms(x, tf.constant([1, 2]))

    def kl_poe_to_prior(indices):
        precision = 1 + sum(1 / scale[i] ** 2 for i in indices)
        mean = sum(loc[i] / scale[i] ** 2 for i in indices) / precision
        return _normal_kl(mean, precision ** -0.5, 0.0, 1.0).sum(-1)

    expected = kl_poe_to_prior([0, 1, 2]) + sum(kl_poe_to_prior([m]) for m in range(3))
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)


def test_mmjsd_dynamic_prior_weights_prior_and_experts_equally():
    specs = synthetic.digits_like_modalities(3)
    model = _build("mmjsd", specs)
    x = synthetic.random_inputs(specs, 5)
    loc_t, scale_t = model.encode(x)
    loc, scale = loc_t.numpy().astype(np.float64), scale_t.numpy().astype(np.float64)
    for present in ([True, True, True], [True, False, True]):
        idx = [i for i, p in enumerate(present) if p]
        w = 1 / (len(idx) + 1)
        precision = w * (1 + sum(1 / scale[i] ** 2 for i in idx))
        mean = w * sum(loc[i] / scale[i] ** 2 for i in idx) / precision
        f_m = model.dynamic_prior(loc_t, scale_t, tf.constant(present))
        np.testing.assert_allclose(f_m.variance().numpy(), 1 / precision, rtol=1e-5)
        np.testing.assert_allclose(f_m.mean().numpy(), mean, rtol=1e-4, atol=1e-6)


def test_mmjsd_loss_is_the_js_divergence_without_reconstruction():
    specs = synthetic.digits_like_modalities(3)
    model = _build("mmjsd", specs)
    x = synthetic.random_inputs(specs, 5)
    f = model.dynamic_prior(*model.encode(x), model.all_present())
    f_mean, f_std = f.mean().numpy().astype(np.float64), f.stddev().numpy().astype(np.float64)
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    _zero_reconstruction(model)
    terms = model.loss_terms(x, tf.constant([1, 2]))
    js = (sum(_normal_kl(loc[m], scale[m], f_mean, f_std).sum(-1) for m in range(3))
          + _normal_kl(0.0, 1.0, f_mean, f_std).sum(-1)) / 4
    np.testing.assert_allclose(terms.per_example.numpy(), js, rtol=1e-4)


def test_bmvae_p_uniform_loss_is_eq15_with_fixed_weights_and_no_dirichlet_kl():
    specs = synthetic.digits_like_modalities(3)
    model = _build("bmvae_p_uniform", specs, lambda_zq=0.7, lambda_mq=0.2)
    x = synthetic.random_inputs(specs, 5)
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    _zero_reconstruction(model)
    terms = model.loss_terms(x, tf.constant([1, 2]))
    assert float(terms.global_term) == 0.0
    np.testing.assert_allclose(model.mixture_weights().numpy(), 1 / 3)

    precision = (1 / 3) * sum(1 / scale[m] ** 2 for m in range(3))
    mean = (1 / 3) * sum(loc[m] / scale[m] ** 2 for m in range(3)) / precision
    std = precision ** -0.5
    expected = (0.7 * _normal_kl(mean, std, 0.0, 1.0).sum(-1)
                + 0.2 * sum(_normal_kl(loc[m], scale[m], mean, std).sum(-1) for m in range(3))
                + (1 / 3) * sum(_normal_kl(loc[m], scale[m], 0.0, 1.0).sum(-1) for m in range(3)))
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)


def test_bmvae_p_loss_with_sampled_weights_is_eq15_at_the_paper_defaults():
    """Learned BMVAE_P at lambda_zq = 1, lambda_mq = lambda_mz = 1/M: q_bar is built from the pi
    each example draws, and that same pi enters KL(q_m || q_bar)."""
    from bmvae_tf.noise import Noise

    specs = synthetic.digits_like_modalities(3)
    model = _build("bmvae_p", specs)
    x = synthetic.random_inputs(specs, 5)
    seed = tf.constant([3, 4])
    beta = np.random.default_rng(5).uniform(0.2, 3.0, size=(LATENT, 3))
    model.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))         # [M, B, D]
    _zero_reconstruction(model)
    terms = model.loss_terms(x, seed)

    pi_noise, _ = Noise.of(seed).split(2)
    pi = pi_noise.dirichlet(5, tf.constant(model.concentration())).numpy().astype(np.float64)
    pi = np.transpose(pi, [2, 0, 1])                                               # [M, B, D]
    assert np.allclose(pi.sum(0), 1.0) and pi.std() > 0.05   # a real, non-uniform draw
    precision = sum(pi[m] / scale[m] ** 2 for m in range(3))
    mean = sum(pi[m] * loc[m] / scale[m] ** 2 for m in range(3)) / precision
    std = precision ** -0.5
    expected = (_normal_kl(mean, std, 0.0, 1.0).sum(-1)
                + sum(_normal_kl(loc[m], scale[m], mean, std).sum(-1) for m in range(3)) / 3
                + sum(_normal_kl(loc[m], scale[m], 0.0, 1.0).sum(-1) for m in range(3)) / 3)
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)


def test_bmvae_p_dirichlet_kl_is_the_global_term():
    specs = synthetic.digits_like_modalities(2)
    model = _build("bmvae_p", specs, eta=0.3, beta_prior=0.5)
    x = synthetic.random_inputs(specs, 3)
    beta = np.array([[0.2, 2.0], [1.0, 1.0], [5.0, 0.5], [0.7, 0.9]])
    model.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    terms = model.loss_terms(x, tf.constant([1, 2]))
    kl = tfd.kl_divergence(tfd.Dirichlet(beta), tfd.Dirichlet(np.full_like(beta, 0.5))).numpy()
    expected = 0.3 * kl.sum()
    np.testing.assert_allclose(float(terms.global_term), expected, rtol=1e-4)
    np.testing.assert_allclose(model.mixture_weights().numpy(), beta / beta.sum(-1, keepdims=True), rtol=1e-5)


def test_bmvae_p_posterior_uses_mean_weights_renormalised_over_the_present_experts():
    specs = synthetic.digits_like_modalities(3)
    model = _build("bmvae_p", specs, subset_weights="mean")
    x = synthetic.random_inputs(specs, 5)
    beta = np.random.default_rng(2).uniform(0.1, 3.0, size=(LATENT, 3))
    model.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    present = tf.constant([True, False, True])
    w = beta[:, [0, 2]] / beta[:, [0, 2]].sum(-1, keepdims=True)                  # [D, 2]
    precision = w[:, 0] / scale[0] ** 2 + w[:, 1] / scale[2] ** 2
    mean = (w[:, 0] * loc[0] / scale[0] ** 2 + w[:, 1] * loc[2] / scale[2] ** 2) / precision
    posterior = model.posterior(x, present)
    np.testing.assert_allclose(posterior.variance().numpy(), 1 / precision, rtol=1e-5)
    np.testing.assert_allclose(posterior.mean().numpy(), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.posterior(x, present).mean().numpy(), posterior.mean().numpy())


def test_bmvae_p_subset_posterior_samples_dirichlet_weights_renormalised_over_the_given():
    """`subset_weights: sample` (the paper's Sect. 6.3.1): each example draws pi_d ~ Dir(beta_d);
    over the given experts {0, 2} that is pi_{0,d} ~ Beta(beta_{0,d}, beta_{2,d})."""
    specs = synthetic.digits_like_modalities(3)
    model = _build("bmvae_p", specs)
    assert model.subset_weights == "sample"
    beta = np.array([[0.3, 2.0, 0.6], [1.0, 0.5, 1.0], [4.0, 1.0, 0.5], [0.2, 0.2, 0.2]])
    model.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    n = 20000
    weights = model.subset_posterior_weights(tf.constant([True, False, True]), n).numpy()  # [M, n, D]
    np.testing.assert_array_equal(weights[1], 0.0)
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-5)
    a, b = beta[:, 0], beta[:, 2]
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert np.all(np.abs(weights[0].mean(0) - mean) < 4 * np.sqrt(var / n)), (weights[0].mean(0), mean)
    np.testing.assert_allclose(weights[0].var(0), var, rtol=0.06)


def test_bmvae_p_sampled_and_mean_subset_posteriors_differ_and_both_are_deterministic():
    specs = synthetic.digits_like_modalities(3)
    sampled = _build("bmvae_p", specs)
    mean_weights = _build("bmvae_p", specs, subset_weights="mean")
    x = synthetic.random_inputs(specs, 6)
    mean_weights(x), sampled(x)
    mean_weights.set_weights(sampled.get_weights())
    beta = np.random.default_rng(4).uniform(0.1, 0.6, size=(LATENT, 3))        # beta < 1: near one-hot pi
    sampled.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    mean_weights.concentration_logits.assign(np.log(np.expm1(beta - 1e-3)))
    present = tf.constant([True, True, False])

    posterior = sampled.posterior(x, present)
    np.testing.assert_array_equal(sampled.posterior(x, present).mean().numpy(), posterior.mean().numpy())
    assert np.abs(posterior.mean().numpy() - mean_weights.posterior(x, present).mean().numpy()).max() > 1e-3

    # The sampled posterior is the product with the drawn weights, by hand.
    loc, scale = (t.numpy().astype(np.float64) for t in sampled.encode(x))
    w = sampled.subset_posterior_weights(present, 6).numpy().astype(np.float64)     # [M, B, D]
    precision = w[0] / scale[0] ** 2 + w[1] / scale[1] ** 2
    expected = (w[0] * loc[0] / scale[0] ** 2 + w[1] * loc[1] / scale[1] ** 2) / precision
    np.testing.assert_allclose(posterior.mean().numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(posterior.variance().numpy(), 1 / precision, rtol=1e-4)
    assert np.all(w[:2].std(axis=1) > 0.05)                  # a per-example draw, not a constant
