"""Tests of trainers.evaluation.robustness: MultiBench's summaries on hand-computed toy curves, the noise, and
the noisy-accuracy pass on a stand-in model whose numbers are known."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import schema
from bmvae_tf.trainers.evaluation import robustness
from bmvae_tf.trainers.reporting.compare import minmax_normalise

tfd = tfp.distributions

NUM_CLASSES = 4


# ------------------------------------------------------------------------------------ summaries


def test_relative_robustness_is_the_trapezoid_area_by_hand():
    # (1.0 + 0.8) * 0.1 / 2 + (0.8 + 0.5) * 0.1 / 2 = 0.09 + 0.065
    assert robustness.relative_robustness([0.0, 0.1, 0.2], [1.0, 0.8, 0.5]) == pytest.approx(0.155)
    # MultiBench's helper: sum (f_i + f_{i+1}) * 0.1 / 2 over 11 levels of step 0.1.
    curve = np.linspace(0.9, 0.2, 11)
    multibench = sum((curve[i] + curve[i + 1]) * 0.1 / 2 for i in range(10))
    assert robustness.relative_robustness(robustness.DEFAULT_NOISE_LEVELS, curve) == pytest.approx(multibench)
    # uneven levels weight each segment by its width: 0.5 * (1 + 1) / 2 + 1.5 * (1 + 0) / 2
    assert robustness.relative_robustness([0.0, 0.5, 2.0], [1.0, 1.0, 0.0]) == pytest.approx(1.25)


def test_effective_robustness_by_hand():
    # baseline shifted to the model's clean accuracy: [0.9, 0.6, 0.3] + 0.1 = [1.0, 0.7, 0.4];
    # model minus shifted baseline: [0, 0.1, 0.1].
    assert robustness.effective_robustness([1.0, 0.8, 0.5], [0.9, 0.6, 0.3]) == pytest.approx(0.2)
    # the same curve as the baseline, or the baseline moved up or down, keeps nothing extra
    assert robustness.effective_robustness([0.7, 0.5, 0.1], [0.7, 0.5, 0.1]) == 0.0
    assert robustness.effective_robustness([0.9, 0.7, 0.3], [0.7, 0.5, 0.1]) == pytest.approx(0.0)
    # a model that falls faster than the baseline is negative: [0.9, 0.4] vs [0.9, 0.8]
    assert robustness.effective_robustness([0.9, 0.4], [0.5, 0.4]) == pytest.approx(-0.4)


def test_summaries_reject_curves_they_cannot_read():
    with pytest.raises(ValueError, match="increase"):
        robustness.relative_robustness([0.0, 0.2, 0.1], [1.0, 0.9, 0.8])
    with pytest.raises(ValueError, match="at least two"):
        robustness.relative_robustness([0.0], [1.0])
    with pytest.raises(ValueError, match="equal-length"):
        robustness.effective_robustness([1.0, 0.5], [1.0])


def test_minmax_normalise_as_multibench():
    out = minmax_normalise({"a": 0.2, "b": 0.6, "c": 0.4, "d": None})
    assert out["a"] == 0.0 and out["b"] == 1.0 and out["c"] == pytest.approx(0.5) and out["d"] is None
    assert minmax_normalise({"a": 0.3, "b": 0.3}) == {"a": None, "b": None}
    assert minmax_normalise({"a": 0.3}) == {"a": None}


# ------------------------------------------------------------------------------------ noise


SPECS = (schema.ModalitySpec("img", "image", (4, 4, 1)),
         schema.ModalitySpec("vec", "vector", (50,), likelihood="gaussian"),
         schema.ModalitySpec("seq", "sequence", (40,), dtype="int64", likelihood="categorical",
                             vocab=("<pad>", " ", "a", "b", "c")))


def _batch(n: int = 500, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"img": tf.constant(rng.uniform(size=(n, 4, 4, 1)), tf.float32),
            "vec": tf.constant(rng.normal(0, 3.0, size=(n, 50)), tf.float32),
            "seq": tf.constant(rng.integers(0, 5, size=(n, 40)), tf.int64)}


def test_noise_scales_are_one_for_images_and_the_data_std_for_vectors():
    batch = _batch()
    scales = robustness.noise_scales(SPECS, [batch, batch])
    assert scales["img"] == 1.0 and "seq" not in scales
    assert scales["vec"] == pytest.approx(float(np.std(batch["vec"].numpy())), rel=1e-6)


def test_add_noise_at_level_zero_is_the_identity_and_its_spread_follows_the_level():
    batch = _batch()
    scales = {"img": 1.0, "vec": 3.0}
    seed = tf.constant([1, 2], tf.int32)
    clean = robustness.add_noise(SPECS, batch, 0.0, scales, seed)
    for name in batch:
        np.testing.assert_array_equal(clean[name], batch[name])

    noisy = robustness.add_noise(SPECS, batch, 0.5, scales, seed)
    img_noise = (noisy["img"] - batch["img"]).numpy()
    vec_noise = (noisy["vec"] - batch["vec"]).numpy()
    assert abs(img_noise.mean()) < 0.02 and img_noise.std() == pytest.approx(0.5, rel=0.05)
    assert vec_noise.std() == pytest.approx(0.5 * 3.0, rel=0.05)
    # A replaced token is uniform over the 5 symbols, so it equals the old one 1/5 of the time:
    # P(changed) = 0.5 * 4/5.
    changed = np.mean(noisy["seq"].numpy() != batch["seq"].numpy())
    assert changed == pytest.approx(0.4, abs=0.02)
    assert noisy["seq"].dtype == tf.int64 and 0 <= int(tf.reduce_min(noisy["seq"]))
    assert int(tf.reduce_max(noisy["seq"])) < 5
    again = robustness.add_noise(SPECS, batch, 0.5, scales, seed)
    np.testing.assert_array_equal(again["vec"], noisy["vec"])


def test_input_features_flatten_values_and_count_tokens():
    inputs = {"img": np.arange(32, dtype=np.float32).reshape(2, 4, 4, 1),
              "vec": np.ones((2, 50), np.float32),
              "seq": np.array([[2] * 38 + [0, 4], [1] * 40])}
    features = robustness.input_features(SPECS, inputs)
    np.testing.assert_array_equal(features["img"][1], np.arange(16, 32))
    np.testing.assert_array_equal(features["seq"], [[1, 0, 38, 0, 1], [0, 40, 0, 0, 0]])
    assert features["vec"].shape == (2, 50)


# ------------------------------------------------------------------------------------ the pass


class _IdentityModel:
    """Posterior mean = the mean of the given one-hot-code vectors "a" and "b"."""

    def __init__(self):
        self.modalities = tuple(schema.ModalitySpec(n, "vector", (NUM_CLASSES,), likelihood="gaussian")
                                for n in ("a", "b"))
        self.latent_dim = NUM_CLASSES

    def posterior(self, inputs, present):
        weights = tf.cast(present, tf.float32)
        loc = tf.tensordot(weights, tf.stack([inputs["a"], inputs["b"]]), axes=1) / tf.reduce_sum(weights)
        return tfd.Independent(tfd.Normal(loc, 1e-3), reinterpreted_batch_ndims=1)


class _ArgmaxProbe:
    """Predicts the largest feature: on one-hot codes (or sums of them) the class."""

    def __init__(self, columns: int = NUM_CLASSES):
        self.columns = columns

    def predict(self, features):
        features = np.asarray(features)
        total = sum(features[:, i:i + self.columns] for i in range(0, features.shape[1], self.columns))
        return np.argmax(total, axis=1)

    def score(self, features, labels):
        return float(np.mean(self.predict(features) == labels))


def _code_batches(num: int = 400):
    labels = np.arange(num) % NUM_CLASSES
    codes = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    return tf.data.Dataset.from_tensor_slices({"a": codes, "b": codes, "label": labels}).batch(64)


def test_noisy_accuracy_of_a_model_that_sees_what_the_baseline_sees():
    model = _IdentityModel()
    keys = ["a", "b", "a+b"]
    probes = {k: _ArgmaxProbe() for k in keys}
    levels = [0.0, 0.5, 2.0, 8.0]
    result = robustness.noisy_accuracy(model, _code_batches(), probes, probes, levels=levels,
                                       scales={"a": 1.0, "b": 1.0}, seed=0)
    assert result.num_test == 400 and result.levels == levels
    for key in keys:
        curve = result.latent_accuracy[key]
        assert curve[0] == 1.0  # clean one-hot codes are read perfectly
        assert curve[-1] < 0.5  # at noise 8x the code the argmax is close to chance (0.25)
        # The latent is the (mean of the) noisy inputs the baseline reads, so the curves match
        # and the model keeps nothing beyond the baseline.
        np.testing.assert_allclose(curve, result.baseline_accuracy[key])
    out = result.to_json()
    assert out["effective"] == {k: pytest.approx(0.0) for k in keys}
    assert out["relative"]["a"] == pytest.approx(robustness.relative_robustness(levels, result.latent_accuracy["a"]))
    # two noisy views average out part of the noise, so the pair is at least as robust
    assert out["relative"]["a+b"] >= out["relative"]["a"]


def test_noisy_accuracy_without_a_baseline_reports_no_effective_robustness():
    model = _IdentityModel()
    probes = {k: _ArgmaxProbe() for k in ("a", "b", "a+b")}
    result = robustness.noisy_accuracy(model, _code_batches(64), probes, {}, levels=[0.0, 1.0],
                                       scales={"a": 1.0, "b": 1.0}, seed=0)
    out = result.to_json()
    assert out["baseline_accuracy"] == {} and out["effective"] == {"a": None, "b": None, "a+b": None}
    assert out["latent_accuracy"]["a"][0] == 1.0
