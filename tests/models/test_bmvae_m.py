"""BMVAE_M: decoder passes, straight-through selection, subset inference, temperatures."""

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import aggregation
from bmvae_tf.models import BMVAEM
from bmvae_tf.noise import Noise
from tests import synthetic

SMALL = synthetic.TINY_NETWORKS






@pytest.mark.parametrize("num_modalities,K", [(2, 1), (3, 4), (4, 3)])
def test_forward_pass_makes_M_decoder_passes_per_latent_sample(num_modalities, K):
    specs = synthetic.digits_like_modalities(num_modalities)
    model = BMVAEM(specs, 5, K=K, **SMALL)
    batch = 6
    x = synthetic.random_inputs(specs, batch)
    model.loss_terms(x, tf.constant([1, 2]))  # build
    calls = synthetic.record_decoder_calls(model)
    model.loss_terms(x, tf.constant([3, 4]))
    # One call per decoder, each decoding all K*B latent samples once: M passes per sample.
    rows = [(i, int(z.shape[0])) for i, z in calls]
    assert sorted(i for i, _ in rows) == list(range(num_modalities))
    assert all(n == K * batch for _, n in rows)
    assert sum(n for _, n in rows) == num_modalities * K * batch


def test_straight_through_selection_is_one_hot_and_passes_gradients():
    logits = tf.Variable(tf.random.stateless_normal([7, 3], seed=[0, 1]))
    temperature = tf.linspace(0.5, 2.0, 7)
    with tf.GradientTape() as tape:
        gumbel = Noise(tf.constant([3, 4])).gumbel([5], 4, [7, 3])                 # [5, 4, 7, 3]
        onehot = aggregation.straight_through_selection(logits, temperature, gumbel)
        # A loss that depends on which expert is chosen.
        loss = tf.reduce_sum(onehot * tf.constant([1.0, -2.0, 0.5]))
    values = onehot.numpy()
    assert values.shape == (5, 4, 7, 3)
    assert set(np.unique(values)) <= {0.0, 1.0}
    np.testing.assert_array_equal(values.sum(-1), 1.0)
    grad = tape.gradient(loss, logits)
    assert grad is not None and np.all(np.isfinite(grad.numpy()))
    assert np.abs(grad.numpy()).sum() > 0


def test_gradients_reach_mixture_logits_and_every_network():
    specs = synthetic.digits_like_modalities(3)
    model = BMVAEM(specs, 4, K=2, **SMALL)
    x = synthetic.random_inputs(specs, 8)
    with tf.GradientTape() as tape:
        terms = model.loss_terms(x, tf.constant([5, 6]))
        loss = tf.reduce_mean(terms.per_example) + terms.global_term
    grads = tape.gradient(loss, model.trainable_variables)
    missing = [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
    assert not missing
    logits_grad = grads[[v.path for v in model.trainable_variables].index(model.mixture_logits.path)]
    assert np.abs(logits_grad.numpy()).sum() > 0


def test_uniform_ablation_has_fixed_weights_and_no_kl():
    specs = synthetic.digits_like_modalities(3)
    model = BMVAEM(specs, 4, learn_weights=False, **SMALL)
    terms = model.loss_terms(synthetic.random_inputs(specs, 4), tf.constant([1, 1]))
    assert float(terms.global_term) == 0.0
    assert model.mixture_logits.path not in [v.path for v in model.trainable_variables]
    np.testing.assert_allclose(model.mixture_weights().numpy(), 1 / 3)


def test_subset_posterior_renormalises_alpha_over_given_modalities():
    specs = synthetic.digits_like_modalities(3)
    model = BMVAEM(specs, 4, **SMALL)
    x = synthetic.random_inputs(specs, 5)
    model(x)
    logits = np.log(np.array([[0.2, 0.5, 0.3]] * 4, np.float32))
    model.mixture_logits.assign(logits)
    loc, _ = model.encode(x)
    present = tf.constant([True, False, True])
    mean = model.posterior(x, present).mean().numpy()
    w = np.array([0.2, 0.3]) / 0.5
    expected = w[0] * loc[0].numpy() + w[1] * loc[2].numpy()
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    # The absent modality's input does not matter.
    x2 = dict(x, street=tf.random.uniform(x["street"].shape, seed=3))
    np.testing.assert_allclose(model.posterior(x2, present).mean().numpy(), mean, rtol=1e-6)


def test_temperature_schedule_is_linear_from_low_to_high():
    specs = synthetic.digits_like_modalities(2)
    model = BMVAEM(specs, 5, tau_low=0.3, tau_high=1.5, **SMALL)
    np.testing.assert_allclose(model.temperatures().numpy(), [0.3, 0.6, 0.9, 1.2, 1.5], rtol=1e-6)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_loss_with_several_modalities_matches_a_hand_computation(family):
    """L_B (Eq. 11) for M = 3, K = 5, recomputed in numpy/scipy from the same draws: z takes each
    dimension from the expert that argmax(log alpha + g) picks, log q sums the chosen experts'
    log densities, and the global term is lambda_c sum_d KL(Cat(alpha_d) || U(M))."""
    import scipy.special
    import scipy.stats

    from bmvae_tf import schema
    from bmvae_tf.noise import reparameterized_sample

    M, D, K, B, lambda_c, sigma = 3, 4, 5, 3, 2.5, 0.75
    specs = [schema.ModalitySpec(f"v{i}", "vector", (2 + i,), likelihood="gaussian",
                                 likelihood_weight=1.0 + i) for i in range(M)]
    model = BMVAEM(specs, D, K=K, lambda_c=lambda_c, posterior=family, likelihood_scale=sigma,
                   hidden_units=(8,))
    x = synthetic.random_inputs(specs, B, seed=4)
    seed = tf.constant([7, 8])
    model.loss_terms(x, seed)  # build
    logits = np.random.default_rng(1).normal(size=(D, M)).astype(np.float32)
    model.mixture_logits.assign(logits)
    terms = model.loss_terms(x, seed)

    # The same draws the model makes from this seed.
    z_noise, select_noise = Noise.of(seed).split(2)
    loc, scale = (t.numpy() for t in model.encode(x))                               # [M, B, D]
    z_all = reparameterized_sample(family, tf.constant(loc), tf.constant(scale), z_noise, [K],
                                   batch_axis=1).numpy()                             # [K, M, B, D]
    gumbel = select_noise.gumbel([K], B, (D, M)).numpy()                             # [K, B, D, M]
    chosen = np.argmax(logits + gumbel, axis=-1)                                     # [K, B, D]

    k_, b_, d_ = np.meshgrid(np.arange(K), np.arange(B), np.arange(D), indexing="ij")
    z = z_all[k_, chosen, b_, d_]                                                    # [K, B, D]
    density = scipy.stats.norm if family == "gaussian" else scipy.stats.laplace
    log_q = density.logpdf(z, loc[chosen, b_, d_], scale[chosen, b_, d_]).sum(-1)    # [K, B]
    log_prior = density.logpdf(z).sum(-1)
    log_lik = sum(spec.likelihood_weight * scipy.stats.norm.logpdf(
        x[spec.name].numpy(), model.decode_params(i, tf.constant(z, tf.float32)).numpy(), sigma).sum(-1)
        for i, spec in enumerate(specs))
    bound = scipy.special.logsumexp(log_lik + log_prior - log_q, axis=0) - np.log(K)  # [B]
    np.testing.assert_allclose(terms.per_example.numpy(), -bound, rtol=1e-4, atol=1e-4)

    alpha = scipy.special.softmax(logits, axis=-1)
    kl = np.sum(alpha * np.log(alpha * M))
    np.testing.assert_allclose(float(terms.global_term), lambda_c * kl, rtol=1e-5)
    assert len(np.unique(chosen)) == M  # every expert is chosen somewhere: the indexing matters
