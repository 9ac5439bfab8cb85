"""Per-example missing modalities in every model's objective (issue 16 item 4, bmvae_tf/missing.py).

All present gives bit for bit the unmasked loss; an absent modality's encoder gets exactly zero
gradient from that example and its likelihood is not scored; BMVAE_M renormalises alpha over
each example's experts; products and mixtures use the present experts only.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import aggregation, missing
from bmvae_tf.models import MODELS
from bmvae_tf.noise import Noise
from bmvae_tf.trainers import config as config_lib
from tests import synthetic

tfd = tfp.distributions

BATCH = 4
SEED = tf.constant([3, 5], tf.int32)
SPECS = synthetic.digits_like_modalities(3)
# Example 1 lacks `street`, example 2 has `text` only; 0 and 3 have everything.
MASK = np.array([[True, True, True], [True, False, True], [False, False, True], [True, True, True]])


def _model(name: str, **model):
    keras.utils.set_random_seed(0)
    config = config_lib.ModelConfig(name=name, latent_dim=4, hidden_units=[16], channels=[8, 8, 8],
                                    sequence_width=8, K=2, **model)
    if name == "mmvae_tight":
        config.mmvae = dataclasses.replace(config.mmvae, dreg=True)
    m = config_lib.build_model(config, SPECS)
    m.build_variables()
    return m


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def inputs():
    return synthetic.random_inputs(SPECS, BATCH, seed=1)


def _loss(model, inputs, present, seed=SEED):
    terms = model.loss_terms(inputs, seed, present=present)
    return (tf.reduce_sum(terms.per_example) + terms.global_term).numpy(), terms.per_example.numpy()


def test_all_present_is_bit_for_bit_the_unmasked_loss(model, inputs):
    expected = _loss(model, inputs, None)
    for present in (np.ones([BATCH, 3], bool), np.ones([3], bool)):
        actual = _loss(model, inputs, tf.constant(present))
        np.testing.assert_array_equal(actual[1], expected[1])
        assert actual[0] == expected[0]
    # Traced, as the training step runs it: Grappler's arithmetic optimiser rewrites each graph
    # its own way (for MVAE without a mask it regroups a sum: 1 ulp from the eager loss, which
    # the masked graph keeps), so the two traced losses agree to the last bit or within 1 ulp.
    masked = tf.function(lambda x, p: model.loss_terms(x, SEED, present=p).per_example)
    plain = tf.function(lambda x: model.loss_terms(x, SEED).per_example)
    np.testing.assert_array_max_ulp(masked(inputs, tf.ones([BATCH, 3], tf.bool)).numpy(),
                                    plain(inputs).numpy(), maxulp=1)


def _per_example_gradients(model, inputs, present):
    """d per_example[b] / d (encoder and decoder weights), for every example b."""
    variables = {i: model.encoders[i].trainable_variables for i in range(3)}
    variables.update({3 + i: model.decoders[i].trainable_variables for i in range(3)})
    flat = [v for i in sorted(variables) for v in variables[i]]
    with tf.GradientTape(persistent=True) as tape:
        per_example = model.loss_terms(inputs, SEED, present=tf.constant(present)).per_example
        rows = [per_example[b] for b in range(BATCH)]
    grads = [tape.gradient(row, flat, unconnected_gradients="zero") for row in rows]
    sizes = [len(variables[i]) for i in sorted(variables)]
    bounds = np.cumsum([0, *sizes])
    return [[g[bounds[i]:bounds[i + 1]] for i in range(6)] for g in grads], per_example.numpy()


def test_absent_encoder_and_decoder_get_exactly_zero_gradient(model, inputs):
    grads, per_example = _per_example_gradients(model, inputs, MASK)
    assert np.all(np.isfinite(per_example))
    learns = np.zeros(3, bool)  # (BMVAE_M's draws may pick no dimension of an expert in one row)
    for b in range(BATCH):
        for m in range(3):
            encoder = np.concatenate([g.numpy().ravel() for g in grads[b][m]])
            decoder = np.concatenate([g.numpy().ravel() for g in grads[b][3 + m]])
            assert np.all(np.isfinite(encoder)) and np.all(np.isfinite(decoder))
            if MASK[b, m]:
                learns[m] |= np.any(encoder != 0.0) and np.any(decoder != 0.0)
            else:
                assert np.all(encoder == 0.0), f"example {b}: absent modality {m}'s encoder"
                assert np.all(decoder == 0.0), f"example {b}: absent modality {m}'s decoder"
    assert learns.all(), learns


def test_absent_inputs_do_not_matter(model, inputs):
    """Whatever an absent modality holds (here junk, not zeros), the loss is the same."""
    junk = dict(inputs)
    street = inputs["street"].numpy().copy()
    street[[1, 2]] = 1e3
    junk["street"] = tf.constant(street)
    np.testing.assert_array_equal(_loss(model, junk, MASK)[1], _loss(model, inputs, MASK)[1])


def test_per_example_mask_matches_the_batch_mask_row_by_row(model, inputs):
    """Example b of a [B, M] mask has the loss it has under its own row given as a [M] mask."""
    per_row = _loss(model, inputs, MASK)[1]
    for b in range(BATCH):
        alone = _loss(model, inputs, MASK[b])[1][b]
        np.testing.assert_allclose(per_row[b], alone, rtol=1e-6, err_msg=str(b))


def test_row_without_modality_is_an_error(inputs):
    model = _model("mvae")
    bad = MASK.copy()
    bad[2] = False
    with pytest.raises(tf.errors.InvalidArgumentError, match=missing.NO_MODALITY):
        model.loss_terms(inputs, SEED, present=tf.constant(bad))
    with pytest.raises(ValueError, match="present must be bool"):
        model.loss_terms(inputs, SEED, present=tf.ones([BATCH, 2], tf.bool))
    with pytest.raises(tf.errors.InvalidArgumentError, match="present: its rows differ"):
        model.loss_terms(inputs, SEED, present=tf.ones([BATCH + 1, 3], tf.bool))


# ---------------------------------------------------------------- the maths, on tiny cases

def test_bmvae_m_renormalises_alpha_per_example():
    logits = tf.constant([[0.0, 1.0, 2.0], [1.5, -1.0, 0.5]])               # [D=2, M=3]
    mask = tf.constant([[True, False, True], [False, True, True]])
    weights = tf.exp(aggregation.masked_log_weights(logits, mask)).numpy()  # [B, D, M]
    alpha = np.exp(logits.numpy())
    for b, row in enumerate(mask.numpy()):
        expected = np.where(row, alpha, 0.0) / np.where(row, alpha, 0.0).sum(-1, keepdims=True)
        np.testing.assert_allclose(weights[b], expected, rtol=1e-6)
    # e.g. example 0, dimension 0: alpha over {0, 2} is (1, e^2) / (1 + e^2).
    np.testing.assert_allclose(weights[0, 0], [1 / (1 + np.e ** 2), 0.0, np.e ** 2 / (1 + np.e ** 2)], rtol=1e-6)


def test_bmvae_m_never_selects_an_absent_expert(inputs):
    model = _model("bmvae_m")
    model.mixture_logits.assign(tf.fill(model.mixture_logits.shape, 0.0) + [[5.0, 5.0, -5.0]])
    calls = synthetic.record_decoder_calls(model)
    _loss(model, inputs, MASK)
    assert calls  # the decoders ran; the selection itself is checked through the encoders' gradients
    noise = Noise(SEED)
    gumbel = noise.gumbel([64], BATCH, model.mixture_logits.shape)
    choice = aggregation.masked_logits(tf.convert_to_tensor(model.mixture_logits), tf.constant(MASK))
    onehot = aggregation.straight_through_selection(choice, model.temperatures(), gumbel).numpy()
    chosen = onehot.sum(axis=(0, 2))                                        # [B, M]
    assert np.all(chosen[~MASK] == 0.0)
    assert chosen[2, 2] == 64 * 4  # example 2 has only `text`: every dimension picks it


def test_product_with_absent_expert_is_product_of_the_rest():
    rng = np.random.default_rng(0)
    loc = tf.constant(rng.normal(size=(3, 2, 4)), tf.float32)
    scale = tf.constant(rng.uniform(0.5, 2.0, size=(3, 2, 4)), tf.float32)
    mask = tf.constant([[True, False, True], [True, True, True]])
    q = aggregation.product_of_gaussians(loc, scale, 1.0, mask, prior_weight=1.0)
    precision = 1.0 + (1.0 / scale.numpy() ** 2 * mask.numpy().T[:, :, None]).sum(0)
    mean = (loc.numpy() / scale.numpy() ** 2 * mask.numpy().T[:, :, None]).sum(0) / precision
    np.testing.assert_allclose(q.loc.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(q.scale.numpy(), precision ** -0.5, rtol=1e-5)
    # Example 0 equals the product of experts 0 and 2 alone.
    rest = aggregation.product_of_gaussians(tf.gather(loc, [0, 2]), tf.gather(scale, [0, 2]), 1.0,
                                            [True, True], prior_weight=1.0)
    np.testing.assert_allclose(q.loc.numpy()[0], rest.loc.numpy()[0], rtol=1e-6)


def test_mixture_of_present_experts_per_example():
    rng = np.random.default_rng(1)
    loc = tf.constant(rng.normal(size=(3, 2, 2)), tf.float32)
    scale = tf.constant(rng.uniform(0.5, 2.0, size=(3, 2, 2)), tf.float32)
    mask = np.array([[True, False, True], [False, True, False]])
    q = aggregation.uniform_mixture("gaussian", loc, scale, tf.constant(mask))
    z = tf.constant(rng.normal(size=(2, 2)), tf.float32)
    experts = tfd.Independent(tfd.Normal(loc, scale), 1).log_prob(z[None]).numpy()   # [M, B]
    for b in range(2):
        expected = np.log(np.mean(np.exp(experts[mask[b], b])))
        np.testing.assert_allclose(q.log_prob(z).numpy()[b], expected, rtol=1e-5)


def test_mmvae_mixture_log_prob_per_example():
    model = _model("mmvae")
    rng = np.random.default_rng(2)
    loc = tf.constant(rng.normal(size=(3, 4, 4)), tf.float32)
    scale = tf.constant(rng.uniform(0.5, 2.0, size=(3, 4, 4)), tf.float32)
    z = tf.constant(rng.normal(size=(2, 4, 4)), tf.float32)
    mixture = model.mixture_log_prob(z, loc, scale, tf.constant(MASK)).numpy()      # [2, B]
    for b in range(BATCH):
        present = MASK[b]
        q = aggregation.uniform_mixture("laplace", tf.boolean_mask(loc, present)[:, b:b + 1],
                                        tf.boolean_mask(scale, present)[:, b:b + 1],
                                        [True] * present.sum())
        np.testing.assert_allclose(mixture[:, b], q.log_prob(z[:, b:b + 1]).numpy()[:, 0], rtol=1e-5)


def test_mmjsd_js_runs_over_present_experts():
    model = _model("mmjsd")
    rng = np.random.default_rng(3)
    loc = tf.constant(rng.normal(size=(3, 2, 4)), tf.float32)
    scale = tf.constant(rng.uniform(0.5, 2.0, size=(3, 2, 4)), tf.float32)
    mask = tf.constant([[True, False, True], [True, True, True]])
    js = model.js_divergence(loc, scale, model.prior(), mask).numpy()
    # Example 0: the JS of experts 0, 2 and the prior, each weight 1/3, to their product.
    two = model.js_divergence(tf.gather(loc, [0, 2]), tf.gather(scale, [0, 2]), model.prior(),
                              tf.constant([[True, True]] * 2))
    np.testing.assert_allclose(js[0], two.numpy()[0], rtol=1e-5)
    np.testing.assert_allclose(js[1], model.js_divergence(loc, scale, model.prior()).numpy()[1], rtol=1e-6)
