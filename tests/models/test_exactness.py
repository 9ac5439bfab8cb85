"""The paper's maths, checked against closed forms and exact answers (Eqs. 1-3, 6-11; SPEC 4).

Each test compares against a truth computed independently (numpy/scipy, or a model whose exact
posterior and marginal likelihood are known) and is written so that a wrong implementation fails.
Randomness is seeded, so a passing statistical test passes every time.
"""

import keras
import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, distributions, objectives, schema
from bmvae_tf.models.bmvae_m import BMVAEM
from bmvae_tf.models.mmvae import MMVAE
from bmvae_tf.noise import Noise
from tests import synthetic

tfd = tfp.distributions

SMALL = synthetic.TINY_NETWORKS

# A linear-Gaussian model x = W z + b + noise, z ~ N(0, I_2), noise ~ N(0, SIGMA^2 I_3). W's
# columns are orthogonal, so the exact posterior is diagonal and lies in the experts' family.
W = np.array([[1.0, 0.5], [-0.5, 1.0], [0.5, 0.0]])
W_FULL = np.array([[1.0, 0.3], [0.4, -0.8], [0.2, 0.6]])  # correlated posterior
B_VEC = np.array([0.3, -0.2, 0.1])
SIGMA = 0.5
X = np.array([[0.8, -1.1, 0.4], [-0.3, 0.2, 1.5], [2.0, 0.5, -0.7]])


@pytest.fixture(autouse=True)
def _seeded_initialisers():
    """Keras initialisers draw from the global seed; fix it so every test sees the same weights."""
    keras.utils.set_random_seed(0)


def exact_log_marginal(x, w):
    """log N(x; b, W W^T + sigma^2 I), [N]."""
    cov = w @ w.T + SIGMA**2 * np.eye(3)
    return np.atleast_1d(scipy.stats.multivariate_normal(B_VEC, cov).logpdf(x))


def exact_posterior(x, w):
    """mean [N, 2] and covariance [2, 2] of p(z | x)."""
    cov = np.linalg.inv(np.eye(2) + w.T @ w / SIGMA**2)
    return (x - B_VEC) @ w @ cov / SIGMA**2, cov


def linear_gaussian_log_joint(x, z, w):
    """log p(x | z) + log p(z): x [N, 3], z [..., N, 2] -> [..., N], in float32."""
    mean = tf.einsum("...d,xd->...x", z, tf.constant(w, tf.float32)) + B_VEC.astype(np.float32)
    log_lik = tf.reduce_sum(tfd.Normal(mean, SIGMA).log_prob(tf.constant(x, tf.float32)), -1)
    return log_lik + tf.reduce_sum(tfd.Normal(0.0, 1.0).log_prob(z), -1)






def _vector_specs(num, size):
    return [schema.ModalitySpec(f"v{i}", "vector", (size,), likelihood="gaussian")
            for i in range(num)]


# ------------------------------------------------------------------ 1. IWAE (Eq. 1) is exact


@pytest.mark.parametrize("K", [1, 7, 100])
def test_iwae_with_the_exact_posterior_equals_log_marginal(K):
    """q = p(z | x) makes every importance weight equal p(x): the estimate is exact for any K."""
    mean, cov = exact_posterior(X, W_FULL)
    q = tfd.MultivariateNormalTriL(mean.astype(np.float32),
                                   np.linalg.cholesky(cov).astype(np.float32))
    z = q.sample(K, seed=[K, 0])                                                    # [K, N, 2]
    log_w = linear_gaussian_log_joint(X, z, W_FULL) - q.log_prob(z)
    estimate = distributions.log_mean_exp(log_w, axis=0).numpy()
    np.testing.assert_allclose(estimate, exact_log_marginal(X, W_FULL), rtol=1e-3)


def test_iwae_with_a_mismatched_proposal_is_a_lower_bound_rising_with_K():
    mean, cov = exact_posterior(X[:1], W)
    std = np.sqrt(np.diag(cov))
    # Shifted by 3 posterior sds and 1.5x too wide: a poor proposal with bounded weights.
    q = tfd.Normal((mean + 3.0 * std).astype(np.float32), (1.5 * std).astype(np.float32))
    truth = exact_log_marginal(X[:1], W)[0]

    def estimates(K, repeats):
        z = q.sample([K, repeats], seed=[K, 1])                                     # [K, R, 1, 2]
        log_w = linear_gaussian_log_joint(X[:1], z, W) - tf.reduce_sum(q.log_prob(z), -1)
        return distributions.log_mean_exp(log_w, axis=0).numpy()[:, 0]              # [R]

    means, errors = [], []
    for K in (1, 10, 100, 1000):
        e = estimates(K, 400)
        means.append(e.mean())
        errors.append(e.std() / np.sqrt(len(e)))
        assert e.mean() + 3 * errors[-1] < truth, f"K={K}: {e.mean():.3f} is not below {truth:.3f}"
    for k in range(3):
        assert means[k + 1] - means[k] > 3 * np.hypot(errors[k], errors[k + 1]), means
    assert abs(estimates(5000, 20).mean() - truth) < 0.5


def _set_exact_linear_gaussian(model):
    """Decoder = the linear-Gaussian likelihood; encoder = its exact posterior (both linear)."""
    _, cov = exact_posterior(X, W)
    posterior_std = np.sqrt(np.diag(cov))
    encoder, decoder = model.encoders[0], model.decoders[0]
    kernel = W @ cov / SIGMA**2                                      # mean = (x - b) @ kernel
    encoder.loc_head.kernel.assign(kernel)
    encoder.loc_head.bias.assign(-B_VEC @ kernel)
    # softplus(bias) + 1e-6 = posterior std, whatever x is.
    encoder.scale_head.kernel.assign(np.zeros((3, 2)))
    encoder.scale_head.bias.assign(np.log(np.expm1(posterior_std - 1e-6)))
    decoder.out.kernel.assign(W.T)
    decoder.out.bias.assign(B_VEC)


@pytest.mark.parametrize("model_class", [BMVAEM, MMVAE])
def test_log_marginal_of_a_model_with_the_exact_posterior_is_exact(model_class):
    """MultimodalVAE.log_marginal (IWAE with the model's posterior as proposal) on one modality."""
    model = model_class(_vector_specs(1, 3), 2, posterior="gaussian", likelihood_scale=SIGMA,
                        hidden_units=())
    x = {"v0": tf.constant(X, tf.float32)}
    model.loss_terms(x, tf.constant([0, 0]))  # build
    _set_exact_linear_gaussian(model)
    truth = exact_log_marginal(X, W)
    for K, chunk in ((1, 100), (250, 100)):  # 250 = two full chunks and a partial one
        estimate = model.log_marginal(x, tf.constant([True]), K, tf.constant([K, 3]), chunk).numpy()
        np.testing.assert_allclose(estimate, truth, rtol=1e-3)


def _mismatched_linear_gaussian_model():
    """The exact model of _set_exact_linear_gaussian with a shifted, too-wide encoder, so the
    importance weights differ from sample to sample."""
    model = BMVAEM(_vector_specs(1, 3), 2, posterior="gaussian", likelihood_scale=SIGMA,
                   hidden_units=())
    x = {"v0": tf.constant(X, tf.float32)}
    model.loss_terms(x, tf.constant([0, 0]))  # build
    _set_exact_linear_gaussian(model)
    encoder = model.encoders[0]
    encoder.loc_head.bias.assign(encoder.loc_head.bias + 0.7)
    encoder.scale_head.bias.assign(encoder.scale_head.bias + 0.5)
    return model, x


def test_log_marginal_merges_its_chunks_into_one_importance_weighted_average():
    """Chunked estimate == log mean exp over all K weights, drawn from the same per-chunk seeds."""
    model, x = _mismatched_linear_gaussian_model()
    present, seed, K, chunk = tf.constant([True]), tf.constant([5, 9]), 250, 100
    estimate = model.log_marginal(x, present, K, seed, chunk).numpy()

    proposal, prior = model.posterior(x, present), model.prior()
    log_w = []
    for start in range(0, K, chunk):
        z = proposal.sample(min(chunk, K - start), seed=tf.random.experimental.stateless_fold_in(seed, start))
        log_w.append(model.reconstruction_log_prob(x, z) + tf.reduce_sum(prior.log_prob(z), -1)
                     - proposal.log_prob(z))
    log_w = tf.concat(log_w, axis=0).numpy()                                     # [K, N]
    assert np.ptp(log_w, axis=0).min() > 1.0   # the weights really differ
    expected = scipy.special.logsumexp(log_w, axis=0) - np.log(K)
    np.testing.assert_allclose(estimate, expected, rtol=1e-5)


def test_log_marginal_graph_does_not_grow_with_K():
    """The full chunks run in one while loop: the traced graph is the same size for K = 1000 and
    K = 3000, so memory is one chunk's, not K's."""
    model, x = _mismatched_linear_gaussian_model()

    def graph_size(K):
        fn = tf.function(lambda: model.log_marginal(x, tf.constant([True]), K, tf.constant([1, 2]), 100))
        return len(fn.get_concrete_function().graph.as_graph_def().node)

    assert graph_size(1000) == graph_size(3000)


# ------------------------------------------------------------------ 2. closed-form KLs


@pytest.mark.parametrize("p,q", [
    (tfd.Normal([0.3, -1.0, 2.0], [0.5, 1.2, 0.9]), tfd.Normal([0.0, 0.5, 1.5], [1.0, 0.7, 2.0])),
    (tfd.Laplace([0.3, -1.0, 2.0], [0.5, 1.2, 0.9]), tfd.Laplace([0.0, 0.5, 1.5], [1.0, 0.7, 2.0])),
    (tfd.Dirichlet([[0.5, 2.0, 1.0], [3.0, 0.7, 0.7]]),
     tfd.Dirichlet([[0.5, 0.5, 0.5], [1.0, 2.0, 0.5]])),
], ids=["normal", "laplace", "dirichlet"])
def test_registered_kl_matches_monte_carlo(p, q):
    n = 200_000
    samples = p.sample(n, seed=[4, 2])
    log_ratio = (p.log_prob(samples) - q.log_prob(samples)).numpy()
    mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    closed = tfd.kl_divergence(p, q).numpy()
    assert np.all(np.abs(closed - mc) < 3 * se), (closed, mc, se)


def test_kl_categorical_uniform_matches_monte_carlo():
    logits = np.log(np.array([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]], np.float32))
    n = 200_000
    m = tfd.Categorical(logits=logits).sample(n, seed=[5, 1]).numpy()               # [n, D]
    log_alpha = np.take_along_axis(logits[None], m[..., None], -1)[..., 0]
    log_ratio = log_alpha - np.log(1 / 3)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(n)
    closed = distributions.kl_categorical_uniform(tf.constant(logits)).numpy()
    assert np.all(np.abs(closed - mc) < 3 * se), (closed, mc, se)
    # The closed form itself: sum_m a_m log(M a_m).
    alpha = np.exp(logits)
    np.testing.assert_allclose(closed, np.sum(alpha * np.log(3 * alpha), -1), rtol=1e-5)


# ------------------------------------------------------------------ 3. BMVAE_M's selections


ALPHA = np.array([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.15, 0.6, 0.25]])


def _chisquare_p(counts, probs):
    return scipy.stats.chisquare(counts, counts.sum() * np.asarray(probs)).pvalue


def test_straight_through_selection_frequencies_match_alpha():
    """argmax of Gumbel-perturbed log alpha is Cat(alpha) at any temperature (Eq. 9)."""
    n = 20_000
    gumbel = Noise(tf.constant([6, 0])).gumbel([], n, ALPHA.shape)                  # [n, D, M]
    onehot = aggregation.straight_through_selection(
        tf.constant(np.log(ALPHA), tf.float32), tf.constant([0.5, 1.25, 2.0]), gumbel).numpy()
    counts = onehot.sum(0)
    wrong = np.roll(ALPHA, 1, axis=1)
    for d in range(3):
        assert _chisquare_p(counts[d], ALPHA[d]) > 1e-3, (d, counts[d])
        assert _chisquare_p(counts[d], wrong[d]) < 1e-6, (d, counts[d])


def test_bmvae_m_subset_posterior_samples_renormalised_alpha():
    """Ancestral sampling of Eq. 7 over the present modalities only (SPEC 4)."""
    model = BMVAEM(_vector_specs(3, 2), 3, posterior="gaussian", hidden_units=())
    x = synthetic.random_inputs(model.modalities, 1)
    model.loss_terms(x, tf.constant([0, 0]))
    # Expert m sits at 10 (m + 1) with a tiny scale, so a sample names the expert it came from.
    for m, encoder in enumerate(model.encoders):
        encoder.loc_head.kernel.assign(np.zeros((2, 3)))
        encoder.loc_head.bias.assign(np.full(3, 10.0 * (m + 1)))
        encoder.scale_head.kernel.assign(np.zeros((2, 3)))
        encoder.scale_head.bias.assign(np.full(3, -10.0))
    model.mixture_logits.assign(np.log(ALPHA))
    present = tf.constant([True, False, True])
    n = 20_000
    z = model.posterior(x, present).sample(n, seed=[7, 0]).numpy()[:, 0]            # [n, D]
    chosen = np.rint(z / 10.0).astype(int) - 1
    given = ALPHA[:, [0, 2]] / ALPHA[:, [0, 2]].sum(1, keepdims=True)
    for d in range(3):
        counts = np.bincount(chosen[:, d], minlength=3)
        assert counts[1] == 0 and counts.sum() == n
        assert _chisquare_p(counts[[0, 2]], given[d]) > 1e-3, (d, counts)
        assert _chisquare_p(counts[[0, 2]], [0.5, 0.5]) < 1e-6, (d, counts)  # alpha is not ignored


# ------------------------------------------------------------------ 4. BMVAE_M with M = 1 is IWAE


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_bmvae_m_with_one_modality_is_iwae(family):
    K, batch = 5, 4
    model = BMVAEM(_vector_specs(1, 3), 2, K=K, posterior=family, likelihood_scale=SIGMA,
                   hidden_units=(8,))
    x = {"v0": tf.constant(np.random.default_rng(1).normal(size=(batch, 3)), tf.float32)}
    model.loss_terms(x, tf.constant([0, 0]))
    calls = synthetic.record_decoder_calls(model)
    terms = model.loss_terms(x, tf.constant([8, 1]))
    (_, z), = calls
    z = z.numpy().reshape(K, batch, 2)

    # The selection is trivially the one expert, exactly.
    onehot = aggregation.straight_through_selection(
        tf.zeros([2, 1]), model.temperatures(), Noise(tf.constant([0, 1])).gumbel([K], batch, [2, 1]))
    np.testing.assert_array_equal(onehot.numpy(), 1.0)

    loc, scale = (t.numpy()[0] for t in model.encode(x))                           # [B, D]
    density = scipy.stats.norm if family == "gaussian" else scipy.stats.laplace
    mean = model.decoders[0](z.reshape(-1, 2)).numpy().reshape(K, batch, 3)
    log_lik = scipy.stats.norm(mean, SIGMA).logpdf(x["v0"].numpy()).sum(-1)
    log_prior = density(0, 1).logpdf(z).sum(-1)
    log_q = density(loc, scale).logpdf(z).sum(-1)
    iwae = scipy.special.logsumexp(log_lik + log_prior - log_q, axis=0) - np.log(K)
    np.testing.assert_allclose(terms.per_example.numpy(), -iwae, rtol=1e-5)
    assert float(terms.global_term) == 0.0


# ------------------------------------------------------------------ 5. L_T >= L_M; decoder passes


@pytest.mark.parametrize("bound,family", [("looser", "gaussian"), ("tight", "laplace")])
def test_mmvae_bounds_match_a_hand_computation(bound, family):
    """Eqs. 2 and 3 by hand (scipy) from the latents the decoders saw, which MMVAE lays out as
    [K, M, B] rows: z[k, m] ~ q_m. The mixture density and the likelihood weights are in play."""
    K, M, batch = 3, 2, 4
    specs = _vector_specs(M, 3)
    specs[1] = schema.ModalitySpec("v1", "vector", (3,), likelihood="gaussian",
                                   likelihood_weight=2.5)
    model = MMVAE(specs, 2, K=K, bound=bound, posterior=family, likelihood_scale=SIGMA,
                  hidden_units=(8,))
    x = synthetic.random_inputs(specs, batch)
    model.loss_terms(x, tf.constant([0, 0]))
    calls = synthetic.record_decoder_calls(model)
    per_example = model.loss_terms(x, tf.constant([2, 7])).per_example.numpy()
    z = calls[0][1].numpy()                                                         # [K*M*B, D]
    np.testing.assert_array_equal(calls[1][1].numpy(), z)  # every decoder sees every sample

    density = scipy.stats.norm if family == "gaussian" else scipy.stats.laplace
    loc, scale = (t.numpy() for t in model.encode(x))                              # [M, B, D]
    log_lik = sum(
        spec.likelihood_weight * scipy.stats.norm(
            model.decoders[i](z).numpy().reshape(K, M, batch, 3), SIGMA
        ).logpdf(x[spec.name].numpy()).sum(-1)
        for i, spec in enumerate(specs))                                            # [K, M, B]
    z = z.reshape(K, M, batch, 2)
    log_prior = density(0, 1).logpdf(z).sum(-1)
    log_q_each = np.stack([density(loc[j], scale[j]).logpdf(z).sum(-1) for j in range(M)])
    log_q = scipy.special.logsumexp(log_q_each, axis=0) - np.log(M)
    log_w = log_lik + log_prior - log_q
    if bound == "looser":
        expected = (scipy.special.logsumexp(log_w, axis=0) - np.log(K)).mean(0)
    else:
        expected = scipy.special.logsumexp(log_w.reshape(K * M, batch), axis=0) - np.log(K * M)
    np.testing.assert_allclose(per_example, -expected, rtol=1e-5)


def test_tight_bound_is_above_looser_bound_on_the_same_samples():
    specs = synthetic.digits_like_modalities(3)
    x = synthetic.random_inputs(specs, 6)
    looser = MMVAE(specs, 4, K=3, bound="looser", **SMALL)
    tight = MMVAE(specs, 4, K=3, bound="tight", **SMALL)
    looser.loss_terms(x, tf.constant([0, 0]))
    tight.loss_terms(x, tf.constant([0, 0]))
    tight.set_weights(looser.get_weights())
    seed = tf.constant([9, 9])
    looser_calls, tight_calls = synthetic.record_decoder_calls(looser), synthetic.record_decoder_calls(tight)
    l_m = -looser.loss_terms(x, seed).per_example.numpy()
    l_t = -tight.loss_terms(x, seed).per_example.numpy()
    # Same draws: the decoders saw the same latents.
    np.testing.assert_array_equal(looser_calls[0][1].numpy(), tight_calls[0][1].numpy())
    assert np.all(l_t >= l_m - 1e-6 * np.abs(l_m)), (l_t, l_m)
    assert np.any(l_t > l_m + 1e-3), "distinct experts should make L_T strictly tighter"


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("model_class,kwargs,passes", [
    (BMVAEM, {}, lambda m, k, b: m * k * b),
    (MMVAE, {"bound": "looser"}, lambda m, k, b: m * m * k * b),
    (MMVAE, {"bound": "tight", "dreg": True}, lambda m, k, b: m * m * k * b),
], ids=["bmvae_m", "mmvae", "mmvae_tight_dreg"])
def test_decoder_rows_per_step(num_modalities, model_class, kwargs, passes):
    """Sect. 5: BMVAE_M decodes M K B rows per step, MMVAE M^2 K B."""
    K, batch = 3, 5
    specs = synthetic.digits_like_modalities(num_modalities)
    model = model_class(specs, 4, K=K, **kwargs, **SMALL)
    x = synthetic.random_inputs(specs, batch)
    model.loss_terms(x, tf.constant([1, 2]))
    calls = synthetic.record_decoder_calls(model)
    model.loss_terms(x, tf.constant([3, 4]))
    assert sorted(i for i, _ in calls) == list(range(num_modalities))  # one call per decoder
    assert sum(int(z.shape[0]) for _, z in calls) == passes(num_modalities, K, batch)


# ------------------------------------------------------------------ 6. DReG


def _gradient_statistics(samples_a, samples_b):
    """Paired differences of gradient samples [R, P]: max |mean / se| and the variance ratio b/a."""
    diff = samples_b - samples_a
    z = diff.mean(0) / (diff.std(0, ddof=1) / np.sqrt(len(diff)))
    return np.abs(z).max(), samples_b.var(0).sum() / samples_a.var(0).sum()


def test_dreg_is_unbiased_with_lower_variance_on_a_linear_gaussian_iwae():
    """objectives.dreg_latents against the plain IWAE gradient, R independent replicas at once.

    Each replica r has its own copy of the proposal's parameters, so one backward pass yields R
    independent gradient samples. The decoder-side parameter (the bias b) must get exactly the
    plain IWAE gradient on the same samples; the encoder side the same expectation, less noise.
    """
    R, K = 2000, 10
    mean, cov = exact_posterior(X[:1], W)
    std = np.sqrt(np.diag(cov))
    x = tf.constant(X[:1], tf.float32)
    init_loc = np.tile(mean + 1.0 * std, [R, 1]).astype(np.float32)              # [R, 2]
    init_raw = np.tile(np.log(np.expm1(1.5 * std)), [R, 1]).astype(np.float32)

    def gradients(dreg):
        loc, raw = tf.Variable(init_loc), tf.Variable(init_raw)
        bias = tf.Variable(np.tile(B_VEC, [R, 1]).astype(np.float32))
        with tf.GradientTape() as tape:
            scale = tf.nn.softplus(raw)
            z = tfd.Normal(loc, scale).sample(K, seed=[11, 0])                    # [K, R, 2]
            if dreg:
                z, bound = objectives.dreg_latents(z)
                q = tfd.Normal(tf.stop_gradient(loc), tf.stop_gradient(scale))
            else:
                q = tfd.Normal(loc, scale)
            means = tf.einsum("krd,xd->krx", z, tf.constant(W, tf.float32)) + bias
            log_w = (tf.reduce_sum(tfd.Normal(means, SIGMA).log_prob(x), -1)
                     + tf.reduce_sum(tfd.Normal(0.0, 1.0).log_prob(z) - q.log_prob(z), -1))
            value = bound(log_w) if dreg else distributions.log_mean_exp(log_w, 0)
        g_loc, g_raw, g_bias = tape.gradient(value, [loc, raw, bias])
        return value.numpy(), np.concatenate([g_loc, g_raw], 1), g_bias.numpy()

    plain_value, plain_encoder, plain_decoder = gradients(dreg=False)
    dreg_value, dreg_encoder, dreg_decoder = gradients(dreg=True)
    np.testing.assert_array_equal(dreg_value, plain_value)  # logging reports the true bound
    np.testing.assert_allclose(dreg_decoder, plain_decoder, rtol=1e-4, atol=1e-5)
    max_z, variance_ratio = _gradient_statistics(plain_encoder, dreg_encoder)
    assert max_z < 4.0, max_z
    assert variance_ratio < 0.2, variance_ratio


def _mmvae_encoder_gradients(model, x, num_seeds=40):
    """[num_seeds, P]: one gradient of the mean loss w.r.t. the encoders per seed."""
    variables = [v for v in model.trainable_variables if "encoder" in v.path]

    @tf.function
    def gradient(seed):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.loss_terms(x, seed).per_example)
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)

    return np.stack([gradient(tf.constant([s, 5])).numpy() for s in range(num_seeds)])


def _plain_and_dreg_mmvae(specs, x, **kwargs):
    models = [MMVAE(specs, 2, dreg=dreg, posterior="gaussian", hidden_units=(), **kwargs)
              for dreg in (False, True)]
    for model in models:
        model.loss_terms(x, tf.constant([0, 0]))
    models[1].set_weights(models[0].get_weights())
    return models


def test_mmvae_dreg_with_one_modality_is_unbiased_with_lower_variance():
    """M = 1: MMVAE is IWAE and its DReG is Tucker et al.'s, on the linear-Gaussian model with an
    encoder near (not at) the exact posterior, where DReG's variance advantage is expected."""
    x = {"v0": tf.constant(np.repeat(X, 64, 0), tf.float32)}
    plain, dreg = _plain_and_dreg_mmvae(_vector_specs(1, 3), x, K=4, likelihood_scale=SIGMA)
    _, cov = exact_posterior(X, W)
    std = np.sqrt(np.diag(cov))
    for model in (plain, dreg):
        _set_exact_linear_gaussian(model)
        model.encoders[0].loc_head.bias.assign_add(0.5 * std)
        model.encoders[0].scale_head.bias.assign(np.log(np.expm1(1.5 * std)))
    max_z, variance_ratio = _gradient_statistics(_mmvae_encoder_gradients(plain, x),
                                                 _mmvae_encoder_gradients(dreg, x))
    assert max_z < 4.5, max_z
    assert variance_ratio < 0.5, variance_ratio


def test_mmvae_dreg_with_one_sample_per_expert_is_unbiased():
    """L_M with K = 1: the score terms of the M strata cancel in expectation, so Shi et al.'s
    estimator is unbiased there. (For M > 1 and K > 1 it is not; see MMVAE's docstring.)"""
    specs = _vector_specs(2, 2)
    rng = np.random.default_rng(2)
    x = {s.name: tf.constant(np.repeat(rng.normal(size=(1, 2)), 256, 0), tf.float32) for s in specs}
    plain, dreg = _plain_and_dreg_mmvae(specs, x, K=1, bound="looser", likelihood_scale=0.7)
    max_z, _ = _gradient_statistics(_mmvae_encoder_gradients(plain, x),
                                    _mmvae_encoder_gradients(dreg, x))
    assert max_z < 4.5, max_z


# ------------------------------------------------------------------ MMVAE


@pytest.mark.parametrize("num_modalities,bound,dreg,family", [
    (2, "looser", False, "laplace"), (3, "tight", False, "gaussian"),
    (4, "looser", True, "gaussian"), (3, "tight", True, "laplace"),
])
def test_mmvae_losses_are_finite_and_gradients_reach_every_variable(num_modalities, bound, dreg,
                                                                    family):
    specs = synthetic.digits_like_modalities(num_modalities)
    model = MMVAE(specs, 4, K=2, bound=bound, dreg=dreg, posterior=family, **SMALL)
    x = synthetic.random_inputs(specs, 5)
    with tf.GradientTape() as tape:
        terms = model.loss_terms(x, tf.constant([1, 2]))
        loss = tf.reduce_mean(terms.per_example) + terms.global_term
    assert terms.per_example.shape == (5,)
    assert np.all(np.isfinite(terms.per_example.numpy()))
    grads = tape.gradient(loss, model.trainable_variables)
    missing = [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
    assert not missing
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    assert all(np.abs(g.numpy()).sum() > 0 for g in grads)


def test_mmvae_dreg_reports_the_plain_bound():
    specs = synthetic.digits_like_modalities(2)
    x = synthetic.random_inputs(specs, 4)
    plain, dreg = (MMVAE(specs, 4, K=3, dreg=d, **SMALL) for d in (False, True))
    plain.loss_terms(x, tf.constant([0, 0]))
    dreg.loss_terms(x, tf.constant([0, 0]))
    dreg.set_weights(plain.get_weights())
    seed = tf.constant([3, 1])
    np.testing.assert_allclose(dreg.loss_terms(x, seed).per_example.numpy(),
                               plain.loss_terms(x, seed).per_example.numpy(), rtol=1e-6)


def test_mmvae_subset_posterior_is_the_mixture_of_present_experts():
    specs = synthetic.digits_like_modalities(3)
    model = MMVAE(specs, 4, posterior="gaussian", **SMALL)
    x = synthetic.random_inputs(specs, 5)
    present = tf.constant([True, False, True])
    posterior = model.posterior(x, present)
    assert posterior.batch_shape == (5,) and posterior.event_shape == (4,)
    loc, _ = model.encode(x)
    mean = posterior.mean().numpy()
    np.testing.assert_allclose(mean, (loc[0].numpy() + loc[2].numpy()) / 2, rtol=1e-5, atol=1e-6)
    z = posterior.sample(3, seed=[1, 2])
    log_prob = posterior.log_prob(z).numpy()
    # Garbage, even NaN, in the absent modality changes nothing.
    garbage = dict(x, street=tf.fill(x["street"].shape, float("nan")))
    np.testing.assert_allclose(model.posterior(garbage, present).mean().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model.posterior(garbage, present).log_prob(z).numpy(), log_prob,
                               rtol=1e-6)
    assert np.all(np.isfinite(log_prob))


def test_mmvae_adam_steps_lower_the_loss():
    specs = synthetic.digits_like_modalities(2)
    model = MMVAE(specs, 4, K=2, **SMALL)
    x = synthetic.random_inputs(specs, 8)
    seed = tf.constant([4, 4])  # the same draws every step: only the weights change the loss
    optimizer = keras.optimizers.Adam(1e-2)
    losses = []
    for _ in range(8):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.loss_terms(x, seed).per_example)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < 0.99 * losses[0], losses


# ------------------------------------------------------------------ 7. mmJSD (Sutter et al.)


def _normal_kl(mu1, s1, mu2, s2):
    return np.log(s2 / s1) + (s1 ** 2 + (mu1 - mu2) ** 2) / (2 * s2 ** 2) - 0.5


def test_mmjsd_loss_matches_a_hand_computation():
    """Eq. 4 by hand: the reconstruction decodes one draw of every expert (stratified mixture,
    each weighted 1/M, every decoder on every draw) and the JS divergence is to the dynamic prior
    f_M = prod_m q_m^{1/(M+1)} p^{1/(M+1)}. Likelihood weights are in play."""
    from bmvae_tf.models.mmjsd import MMJSD

    M, batch, D = 2, 4, 2
    specs = _vector_specs(M, 3)
    specs[1] = schema.ModalitySpec("v1", "vector", (3,), likelihood="gaussian", likelihood_weight=2.5)
    model = MMJSD(specs, D, likelihood_scale=SIGMA, hidden_units=(8,))
    x = synthetic.random_inputs(specs, batch)
    seed = tf.constant([2, 7])
    model.loss_terms(x, tf.constant([0, 0]))
    calls = synthetic.record_decoder_calls(model)
    per_example = model.loss_terms(x, seed).per_example.numpy()
    assert sorted(i for i, _ in calls) == list(range(M))
    z = calls[0][1].numpy()                                                         # [M*B, D]
    np.testing.assert_array_equal(calls[1][1].numpy(), z)  # every decoder sees every draw

    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))            # [M, B, D]
    eps = Noise(seed).normal([M], batch, [D]).numpy()                               # [M, B, D]
    np.testing.assert_allclose(z.reshape(M, batch, D), loc + scale * eps, rtol=1e-5, atol=1e-6)
    log_lik = sum(
        spec.likelihood_weight * scipy.stats.norm(
            model.decoders[i](z).numpy().reshape(M, batch, 3), SIGMA
        ).logpdf(x[spec.name].numpy()).sum(-1)
        for i, spec in enumerate(specs))                                            # [M, B]
    reconstruction = log_lik.mean(0)                                                # [B]

    w = 1.0 / (M + 1)
    precision = w * (1.0 + (1.0 / scale ** 2).sum(0))
    f_mean = w * (loc / scale ** 2).sum(0) / precision
    f_std = precision ** -0.5
    js = (sum(_normal_kl(loc[m], scale[m], f_mean, f_std).sum(-1) for m in range(M))
          + _normal_kl(0.0, 1.0, f_mean, f_std).sum(-1)) / (M + 1)
    np.testing.assert_allclose(per_example, -(reconstruction - js), rtol=1e-5)


@pytest.mark.parametrize("name", ["mmjsd", "mmjsd_ms"])
def test_mmjsd_decodes_m_squared_b_rows_and_its_subset_posterior_is_the_mixture(name):
    """The reconstruction decodes M draws per example with every decoder (M^2 B rows, as
    MMVAE with K = 1). The subset posterior is Sutter et al.'s `moe_fusion`: the uniform mixture
    of the given experts, with no prior component and no product."""
    from bmvae_tf.models import MODELS

    cls, _ = MODELS[name]
    specs = synthetic.digits_like_modalities(3)
    model = cls(specs, 4, **SMALL)
    x = synthetic.random_inputs(specs, 5)
    model.loss_terms(x, tf.constant([1, 2]))
    calls = synthetic.record_decoder_calls(model)
    model.loss_terms(x, tf.constant([3, 4]))
    assert sorted(i for i, _ in calls) == [0, 1, 2]
    assert sum(int(z.shape[0]) for _, z in calls) == 3 * 3 * 5

    present = tf.constant([True, False, True])
    loc, scale = (t.numpy() for t in model.encode(x))
    posterior = model.posterior(x, present)
    shared = posterior.distributions[0] if name == "mmjsd_ms" else posterior
    assert isinstance(shared, tfd.MixtureSameFamily)
    c = slice(0, 4)
    np.testing.assert_allclose(shared.mean().numpy(), (loc[0, :, c] + loc[2, :, c]) / 2, rtol=1e-5, atol=1e-6)
    point = tf.constant(loc[0, :, c])
    expected = scipy.special.logsumexp(
        [scipy.stats.norm(loc[m, :, c], scale[m, :, c]).logpdf(point.numpy()).sum(-1) for m in (0, 2)],
        axis=0) - np.log(2)
    np.testing.assert_allclose(shared.log_prob(point).numpy(), expected, rtol=1e-5)
