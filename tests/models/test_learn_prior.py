"""model.learn_prior: Shi et al.'s learnable prior scale (`--learn-prior`), for every model.

Their code keeps the prior's loc at 0 and gives it the scale softmax(l) * D per latent dimension,
l a trainable vector starting at 0. Off (the default), the models must compute exactly what they
computed before the option existed.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf.models import MODELS
from bmvae_tf.trainers import run_dir
from tests import synthetic

# Per-example losses and global terms (float32, hex bytes) of every model at the setup of
# `_tiny_model` with the fixed prior, recorded from the implementation before learn_prior existed
# (commit 65e420f). mmjsd and mmjsd_ms were recorded after their reconstruction moved to the
# mixture of experts (issue 14), which changed their losses by design. The values are those of
# one CPU build of TensorFlow; `python -m tests.models.test_learn_prior` prints them for this one.
GOLDEN = os.path.join(os.path.dirname(__file__), "losses_fixed_prior.json")


def _tiny_model(name, **kwargs):
    cls, fixed = MODELS[name]
    keras.utils.set_random_seed(0)
    specs = synthetic.digits_like_modalities(3)
    kwargs = dict(synthetic.TINY_NETWORKS, **fixed, **kwargs)
    if cls.IMPORTANCE_SAMPLED:
        kwargs["K"] = 3
    return cls(specs, 4, **kwargs), synthetic.random_inputs(specs, 4)


def _loss_bytes(model, x) -> dict:
    terms = model.loss_terms(x, tf.constant([5, 6]))
    return {"per_example": terms.per_example.numpy().astype(np.float32).tobytes().hex(),
            "global_term": np.float32(terms.global_term.numpy()).tobytes().hex()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_bit_for_bit_unchanged_without_a_learned_prior(name):
    with open(GOLDEN) as f:
        golden = json.load(f)[name]
    model, x = _tiny_model(name)
    assert model.prior_scale_logits is None
    assert not [v for v in model.weights if "prior_scale" in v.path]
    loss = _loss_bytes(model, x)
    if loss != golden:  # another CPU's oneDNN kernels may round differently: then a few ulp
        for key in ("per_example", "global_term"):
            np.testing.assert_allclose(np.frombuffer(bytes.fromhex(loss[key]), np.float32),
                                       np.frombuffer(bytes.fromhex(golden[key]), np.float32),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_prior_scale_gets_a_gradient_and_changes_with_training(name):
    model, x = _tiny_model(name, learn_prior=True)
    seed = tf.constant([5, 6])
    model.loss_terms(x, seed)                                                       # builds the layers
    logits = model.prior_scale_logits
    assert logits.trainable and logits.shape == (model.latent_dim,)
    assert any(v is logits for v in model.trainable_variables)
    np.testing.assert_allclose(model.prior().scale.numpy(), 1.0, rtol=1e-6)        # starts at scale 1

    optimizer = keras.optimizers.Adam(0.05)
    for _ in range(3):
        with tf.GradientTape() as tape:
            terms = model.loss_terms(x, seed)
            loss = tf.reduce_mean(terms.per_example) + terms.global_term
        grads = tape.gradient(loss, model.trainable_variables)
        grad = grads[[v is logits for v in model.trainable_variables].index(True)]
        assert grad is not None and np.abs(grad.numpy()).max() > 0
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    scale = model.prior_scale().numpy()
    assert np.abs(scale - 1.0).max() > 1e-3
    np.testing.assert_allclose(scale.sum(), model.latent_dim, rtol=1e-5)           # softmax(l) * D
    np.testing.assert_allclose(model.prior().scale.numpy(), scale, rtol=1e-6)


def _set_prior_scale(model, scale):
    """Sets l so that softmax(l) * D = scale (scale must sum to D)."""
    model.prior_scale_logits.assign(np.log(scale))
    np.testing.assert_allclose(model.prior_scale().numpy(), scale, rtol=1e-5)


def _normal_kl(mu1, s1, mu2, s2):
    return np.log(s2 / s1) + (s1 ** 2 + (mu1 - mu2) ** 2) / (2 * s2 ** 2) - 0.5


def test_mvae_uses_the_learned_prior_as_its_prior_expert_and_in_its_kls():
    model, x = _tiny_model("mvae", learn_prior=True)
    scale_p = np.array([0.5, 1.5, 0.8, 1.2])
    _set_prior_scale(model, scale_p)
    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    model.reconstruction_log_prob = lambda inputs, z, present=None: tf.zeros(tf.shape(z)[:-1])
    model.modality_log_prob = lambda index, x, z: tf.zeros(tf.shape(z)[:-1])
    terms = model.loss_terms(x, tf.constant([1, 2]))

    def kl_poe_to_prior(indices):
        precision = 1 / scale_p ** 2 + sum(1 / scale[i] ** 2 for i in indices)
        mean = sum(loc[i] / scale[i] ** 2 for i in indices) / precision
        return _normal_kl(mean, precision ** -0.5, 0.0, scale_p).sum(-1)

    expected = kl_poe_to_prior([0, 1, 2]) + sum(kl_poe_to_prior([m]) for m in range(3))
    np.testing.assert_allclose(terms.per_example.numpy(), expected, rtol=1e-4)
    single = model.posterior(x, tf.constant([True, False, False]))
    np.testing.assert_allclose(single.stddev().numpy(), (1 / scale_p ** 2 + 1 / scale[0] ** 2) ** -0.5,
                               rtol=1e-5)


def test_ms_models_take_private_priors_from_the_learned_prior():
    """z = [c, s_1..s_M] has one learned scale per dimension: KL(q(s_m) || p(s_m)) uses s_m's
    block, and an absent modality's private factors come from that block."""
    model, x = _tiny_model("mmjsd_ms", learn_prior=True, private_dim=2)
    assert model.prior_scale_logits.shape == (4 + 3 * 2,)
    scale_p = np.linspace(0.4, 1.6, 10)
    _set_prior_scale(model, scale_p)
    posterior = model.posterior(x, tf.constant([True, False, True]))
    private = posterior.distributions[1]
    np.testing.assert_allclose(private.stddev().numpy()[:, 2:4], np.broadcast_to(scale_p[6:8], (4, 2)),
                               rtol=1e-6)
    np.testing.assert_array_equal(private.mean().numpy()[:, 2:4], 0.0)

    loc, scale = (t.numpy().astype(np.float64) for t in model.encode(x))
    kl = model.private_kl(*(tf.constant(t[..., 4:], tf.float32) for t in (loc, scale))).numpy()
    expected = np.stack([_normal_kl(loc[m, :, 4:], scale[m, :, 4:], 0.0, scale_p[4 + 2 * m:6 + 2 * m]).sum(-1)
                         for m in range(3)])
    np.testing.assert_allclose(kl, expected, rtol=1e-4)
    np.testing.assert_allclose(model.shared_prior().stddev().numpy(), scale_p[:4], rtol=1e-6)


def test_the_learned_prior_is_checkpointed_and_exported(tmp_path):
    """A saved weight: restored from a run checkpoint, and a SavedModel's prior samples use it."""
    from bmvae_tf import schema
    from bmvae_tf.trainers import export

    model, x = _tiny_model("bmvae_m", learn_prior=True)
    manifest = schema.Manifest(name="tiny", modalities=tuple(model.modalities), splits={})
    run_dir.build_variables(model, manifest)
    scale_p = np.array([0.25, 0.25, 0.5, 3.0])
    _set_prior_scale(model, scale_p)
    checkpoint = run_dir.model_checkpoint(model)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    model.prior_scale_logits.assign(np.zeros(4))
    checkpoint.read(path).assert_consumed()
    np.testing.assert_allclose(model.prior_scale().numpy(), scale_p, rtol=1e-5)

    module = export.ServingModule(model, manifest)
    tf.saved_model.save(module, str(tmp_path / "saved"), signatures=module.signatures())
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    exported = loaded.signatures["sample"](num=tf.constant(6), seed=tf.constant(3))
    z = model.prior().sample(6, seed=tf.constant([3, 0]))
    name = model.modality_names[0]
    np.testing.assert_allclose(exported[name].numpy(), model.generate(z)[name].numpy(), rtol=1e-5, atol=1e-6)
    model.prior_scale_logits.assign(np.zeros(4))                                    # a unit prior
    unit = model.generate(model.prior().sample(6, seed=tf.constant([3, 0])))[name].numpy()
    assert np.abs(exported[name].numpy() - unit).max() > 1e-3


if __name__ == "__main__":
    print(json.dumps({name: _loss_bytes(*_tiny_model(name)) for name in sorted(MODELS)}, indent=1,
                     sort_keys=True))
