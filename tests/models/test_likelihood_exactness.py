"""The reported likelihoods against closed forms (issue 14): log p(x_S), log p(x_1..M) and
log p(x_T | x_S) of a linear-Gaussian multimodal model.

The model is a real MVAE (three vector modalities, linear encoders and decoders) whose weights
are set so that
    z ~ N(0, I_2),   x_m = W_m z + b_m + N(0, SIGMA^2 I),
and expert m is the likelihood p(x_m | z) read as a density of z. W_m has orthogonal columns, so
that density is a diagonal Gaussian, and MVAE's product of the prior and the experts of S is the
exact posterior p(z | x_S) for every subset S. Every modality carries a likelihood weight far
from 1, so an estimator that weighted the likelihoods would miss the closed form by nats.

Exact: log p(x_A) = log N(x_A; b_A, W_A W_A^T + SIGMA^2 I) for the stacked W_A, b_A, and
log p(x_T | x_S) = log p(x_T, x_S) - log p(x_S).
"""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.models.mvae import MVAE
from bmvae_tf.trainers.evaluation import likelihood

SIGMA = 0.5
NAMES = ("a", "b", "c")
W = {"a": np.array([[1.0, 0.5], [-0.5, 1.0], [0.5, 0.0]]),
     "b": np.array([[0.8, 0.6], [0.6, -0.8]]) * 1.3,
     "c": np.array([[0.4, 0.0], [0.0, 0.9], [0.3, 0.0], [0.0, -0.2]])}
B = {"a": np.array([0.3, -0.2, 0.1]), "b": np.array([-0.5, 0.4]), "c": np.array([0.0, 0.2, -0.1, 0.3])}
WEIGHTS = {"a": 3.92, "b": 0.25, "c": 384.0}  # training weights: must not enter any likelihood


@pytest.fixture(autouse=True)
def _seeded_initialisers():
    keras.utils.set_random_seed(0)


def _data(num: int, seed: int) -> dict[str, np.ndarray]:
    """`num` draws of the generative model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num, 2))
    return {n: (z @ W[n].T + B[n] + SIGMA * rng.normal(size=(num, len(B[n])))).astype(np.float32)
            for n in NAMES}


def exact_log_marginal(x: dict, subset) -> np.ndarray:
    """log p(x_A) [N] in closed form."""
    w = np.concatenate([W[n] for n in subset])
    b = np.concatenate([B[n] for n in subset])
    cov = w @ w.T + SIGMA**2 * np.eye(len(b))
    return np.atleast_1d(scipy.stats.multivariate_normal(b, cov).logpdf(
        np.concatenate([x[n] for n in subset], axis=1).astype(np.float64)))


def exact_model(shift: float = 0.0, widen: float = 1.0) -> MVAE:
    """The linear-Gaussian MVAE; `shift` moves every expert's mean by `shift` of its sd and
    `widen` scales its sd, for a proposal near (not at) the posterior."""
    specs = [schema.ModalitySpec(n, "vector", (len(B[n]),), likelihood="gaussian",
                                 likelihood_weight=WEIGHTS[n]) for n in NAMES]
    model = MVAE(specs, 2, likelihood_scale=SIGMA, hidden_units=())
    model.loss_terms({k: tf.constant(v) for k, v in _data(2, 0).items()}, tf.constant([0, 0]))  # build
    for n, encoder, decoder in zip(NAMES, model.encoders, model.decoders):
        precision = np.sum(W[n] ** 2, axis=0) / SIGMA**2             # W^T W / sigma^2 is diagonal
        kernel = W[n] / np.sum(W[n] ** 2, axis=0)                     # mean = (x - b) (W^T W)^-1 W
        sd = 1 / np.sqrt(precision)
        encoder.loc_head.kernel.assign(kernel)
        encoder.loc_head.bias.assign(-B[n] @ kernel + shift * sd)
        encoder.scale_head.kernel.assign(np.zeros_like(kernel))
        encoder.scale_head.bias.assign(np.log(np.expm1(widen * sd - 1e-6)))
        decoder.out.kernel.assign(W[n].T)
        decoder.out.bias.assign(B[n])
    return model


def _present(subset) -> tf.Tensor:
    return tf.constant([n in subset for n in NAMES])


def _tensors(x: dict) -> dict:
    return {k: tf.constant(v) for k, v in x.items()}


SUBSETS = schema.subset_names(list(NAMES))


def test_the_experts_make_the_exact_posterior():
    """The premise: MVAE's posterior of every subset is p(z | x_S) in closed form."""
    model, x = exact_model(), _data(3, 1)
    for subset in SUBSETS:
        w = np.concatenate([W[n] for n in subset])
        b = np.concatenate([B[n] for n in subset])
        cov = np.linalg.inv(np.eye(2) + w.T @ w / SIGMA**2)
        mean = (np.concatenate([x[n] for n in subset], 1) - b) @ w @ cov / SIGMA**2
        posterior = model.posterior(_tensors(x), _present(subset))
        np.testing.assert_allclose(posterior.mean().numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(posterior.stddev().numpy()[0], np.sqrt(np.diag(cov)), rtol=1e-4)
        assert abs(cov[0, 1]) < 1e-12


@pytest.mark.parametrize("K,chunk", [(1, 100), (250, 100)])  # 250 = two full chunks and a partial one
def test_log_marginal_of_every_subset_is_exact_and_unweighted(K, chunk):
    """With the exact posterior as proposal every importance weight is p(x_S): exact for any K."""
    model, x = exact_model(), _data(4, 2)
    for subset in SUBSETS:
        estimate = model.log_marginal(_tensors(x), _present(subset), K, tf.constant([K, 3]), chunk)
        np.testing.assert_allclose(estimate.numpy(), exact_log_marginal(x, subset), rtol=2e-5,
                                   err_msg=str(subset))


def test_log_marginals_ignore_the_likelihood_weights_and_the_absent_inputs():
    model, x = exact_model(shift=0.5, widen=1.4), _data(4, 3)
    present, seed = _present(("a",)), tf.constant([1, 2])
    scored = tf.constant([[True, False, False], [True, True, False], [True, True, True]])
    before = model.log_marginals(_tensors(x), present, scored, 20, seed).numpy()
    # The scored modalities are read as given; the proposal sees only x_S (NaN elsewhere is harmless
    # to the rows that do not score it).
    model.likelihood_weights = [1.0, 50.0, 0.01]
    np.testing.assert_array_equal(model.log_marginals(_tensors(x), present, scored, 20, seed).numpy(), before)
    garbage = dict(x, c=np.full_like(x["c"], np.nan))
    np.testing.assert_array_equal(model.log_marginals(_tensors(garbage), present, scored[:2], 20, seed).numpy(),
                                  before[:2])
    np.testing.assert_allclose(model.log_marginal(_tensors(x), present, 20, seed).numpy(), before[0], rtol=1e-6)


def _estimates(model, x: dict, K: int, seed: int = 0) -> likelihood.LikelihoodEstimates:
    """The production estimator of `bmvae evaluate`, on one batch."""
    return likelihood.likelihood_estimates(model, [_tensors(x)], num_samples=K, seed=seed)


def test_conditional_keys_pair_every_target_with_every_subset_of_the_others():
    assert [f"{schema.subset_key(t)}|{schema.subset_key(s)}" for t, s in likelihood.conditional_pairs(list(NAMES))] == [
        "b|a", "c|a", "b+c|a", "a|b", "c|b", "a+c|b", "a|c", "b|c", "a+b|c",
        "c|a+b", "b|a+c", "a|b+c"]


def test_evaluation_estimates_are_exact_for_marginals_and_converge_for_conditionals():
    """log_likelihood and joint_log_likelihood: exact at any K. conditional_log_likelihood: with
    the exact posterior it is log mean_k p(x_T | z_k), z_k ~ p(z | x_S): below the truth in
    expectation (Jensen), rising to it as K grows."""
    x = {n: np.repeat(v, 400, axis=0) for n, v in _data(1, 4).items()}  # 400 independent replicas
    model = exact_model()
    truth = {schema.subset_key(s): exact_log_marginal({n: v[:1] for n, v in x.items()}, s)[0]
             for s in SUBSETS}
    truth_conditional = {
        f"{schema.subset_key(t)}|{schema.subset_key(s)}":
            truth[schema.subset_key(tuple(n for n in NAMES if n in t + s))] - truth[schema.subset_key(s)]
        for t, s in likelihood.conditional_pairs(list(NAMES))}
    means = []
    for K in (1, 10, 100, 2000):
        estimates = _estimates(model, x, K)
        assert estimates.num_examples == 400
        assert estimates.log_likelihood == pytest.approx(truth, rel=2e-5)
        assert estimates.joint_log_likelihood == pytest.approx(truth["a+b+c"], rel=2e-5)
        assert list(estimates.conditional_log_likelihood) == list(truth_conditional)
        means.append(estimates.conditional_log_likelihood)
    gaps = np.array([[truth_conditional[k] - m[k] for k in truth_conditional] for m in means])  # [K, pairs]
    # K = 1, 10: a clear Jensen gap on every pair, shrinking with K (at K = 100 and beyond it is
    # below the Monte Carlo noise of 400 replicas, ~1e-3 nats)
    assert np.all(gaps[0] > 0.2) and np.all(gaps[1] > 0.02), gaps
    assert np.all(np.diff(gaps[:3], axis=0) < 0), gaps
    assert np.all(np.abs(gaps[-1]) < 0.01), gaps[-1]


def test_conditional_is_the_difference_of_two_estimates_sharing_samples():
    """conditional["T|S"] = L_S(T u S) - L_S(S) per example, from log_marginals' rows."""
    model, x = exact_model(shift=0.8, widen=1.5), _data(5, 5)
    K = 30
    estimates = _estimates(model, x, K, seed=7)
    seed = tf.random.experimental.stateless_fold_in(tf.constant([7, 3]), 0)  # stream 3, batch 0
    rows = tf.constant([[True, False, False], [True, False, True]])
    l_s, l_ts = model.log_marginals(_tensors(x), _present(("a",)), rows, K, seed).numpy()
    assert estimates.conditional_log_likelihood["c|a"] == pytest.approx(np.mean(l_ts - l_s), rel=1e-5)
    assert estimates.log_likelihood["a"] == pytest.approx(np.mean(l_s), rel=1e-5)


def test_with_a_near_exact_proposal_iwae_is_a_lower_bound_rising_to_the_truth():
    """log_likelihood with a shifted, too-wide proposal: below log p(x_S) in expectation, rising
    with K, and within 0.03 nats at K = 2000; the conditionals converge too."""
    x = {n: np.repeat(v, 300, axis=0) for n, v in _data(1, 6).items()}
    model = exact_model(shift=0.6, widen=1.3)
    one = {n: v[:1] for n, v in x.items()}
    truth = {schema.subset_key(s): exact_log_marginal(one, s)[0] for s in SUBSETS}
    gaps = []
    for K in (1, 10, 100, 2000):
        estimates = _estimates(model, x, K, seed=1)
        gaps.append([truth[k] - estimates.log_likelihood[k] for k in truth])
    gaps = np.array(gaps)
    assert np.all(gaps[:3] > 0), gaps
    assert np.all(np.diff(gaps, axis=0) < 0), gaps
    assert np.all(gaps[-1] < 0.03), gaps[-1]
    truth_ba = truth["a+b"] - truth["a"]
    assert estimates.conditional_log_likelihood["b|a"] == pytest.approx(truth_ba, abs=0.01)
