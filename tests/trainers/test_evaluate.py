"""Tests of trainers.evaluation (the maths of each metric family, and `evaluate` end to end) and
trainers.reporting.plots.

The maths is checked on inputs with known answers (a perfect model scores 1.0, one that ignores
its input scores chance); `evaluate` runs end to end on a tiny synthetic dataset with a small
untrained BMVAE_M.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from tests import synthetic
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.evaluation import coherence, encodings, probes, random_coherence, subsets
from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
from bmvae_tf.trainers.reporting import plots

tfd = tfp.distributions

NUM_CLASSES = 5


def _chance_tolerance(num_examples: int, num_classes: int, num_se: float = 4.0) -> float:
    p = 1.0 / num_classes
    return num_se * np.sqrt(p * (1 - p) / num_examples)


# ------------------------------------------------------------------------------------ latent probe


def test_latent_accuracy_is_one_on_separable_latents():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (NUM_CLASSES, 4))
    y_train, y_test = rng.integers(NUM_CLASSES, size=300), rng.integers(NUM_CLASSES, size=200)
    z_train = centres[y_train] + rng.normal(0, 0.1, (300, 4))
    z_test = centres[y_test] + rng.normal(0, 0.1, (200, 4))
    assert probes.latent_accuracy(z_train, y_train, z_test, y_test) == 1.0


def test_latent_accuracy_is_chance_on_latents_independent_of_labels():
    rng = np.random.default_rng(1)
    n_train, n_test = 1000, 2000
    z_train, z_test = rng.normal(size=(n_train, 4)), rng.normal(size=(n_test, 4))
    y_train, y_test = rng.integers(NUM_CLASSES, size=n_train), rng.integers(NUM_CLASSES, size=n_test)
    accuracy = probes.latent_accuracy(z_train, y_train, z_test, y_test)
    assert abs(accuracy - 1 / NUM_CLASSES) < _chance_tolerance(n_test, NUM_CLASSES)


# ------------------------------------------------------------------------------------ coherence


class _OneHotModel:
    """A stand-in MultimodalVAE on two vector modalities that hold a noisy one-hot class code.

    The posterior is a near-deterministic Normal at the average of the present modalities; with
    `ignore_input`, `generate` returns class 0 whatever the latent.
    """

    def __init__(self, ignore_input: bool = False):
        self.modalities = (schema.ModalitySpec("a", "vector", (NUM_CLASSES,), likelihood="gaussian"),
                           schema.ModalitySpec("b", "vector", (NUM_CLASSES,), likelihood="gaussian"))
        self.latent_dim = NUM_CLASSES
        self.ignore_input = ignore_input

    def posterior(self, inputs, present):
        weights = tf.cast(present, tf.float32)
        stacked = tf.stack([inputs["a"], inputs["b"]])                      # [M, B, D]
        loc = tf.tensordot(weights, stacked, axes=1) / tf.reduce_sum(weights)
        return tfd.Independent(tfd.Normal(loc, 1e-3), reinterpreted_batch_ndims=1)

    def generate(self, z):
        if self.ignore_input:
            z = tf.one_hot(tf.zeros(tf.shape(z)[:-1], tf.int32), NUM_CLASSES)
        return {"a": z, "b": z}


def _one_hot_batches(num: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(NUM_CLASSES, size=num)
    codes = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    data = {"a": codes + rng.normal(0, 0.05, codes.shape).astype(np.float32),
            "b": codes + rng.normal(0, 0.05, codes.shape).astype(np.float32),
            "label": labels.astype(np.int64)}
    return tf.data.Dataset.from_tensor_slices(data).batch(64)


def _identity_classifiers():
    # The vectors are class codes, so they are their own logits.
    return {"a": lambda x, training=False: x, "b": lambda x, training=False: x}


def test_cross_coherence_of_a_perfect_generator_is_one():
    split = encodings.encode_split(_OneHotModel(), _one_hot_batches(300, 0),
                                      classifiers=_identity_classifiers())
    assert sorted(split.cross_predictions) == ["a|b", "b|a"]
    for predicted in split.cross_predictions.values():
        assert coherence.cross_coherence(predicted, split.labels) == 1.0
    assert sorted(split.means) == ["a", "a+b", "b"]
    assert split.means["a+b"].shape == (300, NUM_CLASSES)


def test_cross_coherence_of_a_generator_that_ignores_its_input_is_chance():
    num = 2000
    split = encodings.encode_split(_OneHotModel(ignore_input=True), _one_hot_batches(num, 1),
                                      classifiers=_identity_classifiers())
    for predicted in split.cross_predictions.values():
        score = coherence.cross_coherence(predicted, split.labels)
        assert abs(score - 1 / NUM_CLASSES) < _chance_tolerance(num, NUM_CLASSES)


def test_cross_coherence_needs_every_generated_modality_right():
    labels = np.array([0, 1, 2, 3])
    predictions = np.array([[0, 1, 2, 0], [0, 0, 2, 3]])
    assert coherence.cross_coherence(predictions, labels) == 0.5
    assert coherence.cross_coherence(predictions[1], labels) == 0.75


def test_joint_coherence_counts_samples_where_all_classifiers_agree():
    agree = np.tile(np.arange(8), (3, 1))
    assert coherence.joint_coherence(agree) == 1.0
    disagree = np.stack([np.arange(8), np.arange(8) + 1, np.arange(8)])
    assert coherence.joint_coherence(disagree) == 0.0
    half = agree.copy()
    half[2, :4] = 9
    assert coherence.joint_coherence(half) == 0.5


def test_random_coherence_of_consistent_decoders_is_one():
    z = np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(50) % NUM_CLASSES]
    predictions = random_coherence.generated_predictions(_OneHotModel(), _identity_classifiers(), z, 16)
    assert predictions.shape == (2, 50)
    np.testing.assert_array_equal(predictions[0], np.arange(50) % NUM_CLASSES)
    assert coherence.joint_coherence(predictions) == 1.0


def test_mask_inputs_zeroes_exactly_the_absent_modalities():
    inputs = {"a": tf.ones([2, 3]), "b": tf.fill([2, 4], 2.0)}
    masked = subsets.mask_inputs(inputs, tf.constant([True, False]), ["a", "b"])
    np.testing.assert_array_equal(masked["a"], inputs["a"])
    np.testing.assert_array_equal(masked["b"], np.zeros([2, 4]))


def test_run_subsets_masks_each_subset_and_folds_the_seeds_it_names():
    specs = [schema.ModalitySpec(name="a", kind="vector", shape=(2,)),
             schema.ModalitySpec(name="b", kind="vector", shape=(3,))]
    step = subsets.masked_step(specs, lambda inputs, present, seed: {"sum": tf.reduce_sum(inputs["b"]),
                                                                     "seed": seed})
    batches = [{"a": tf.ones([2, 2]), "b": tf.ones([2, 3]), "label": tf.constant([0, 1], tf.int64)}] * 2
    base = tf.constant([7, 1], tf.int32)
    fold = tf.random.experimental.stateless_fold_in
    expected = {subsets.SeedScheme.BATCH_THEN_SUBSET: lambda b, k: fold(fold(base, b), k),
                subsets.SeedScheme.BATCH: lambda b, k: fold(base, b),
                subsets.SeedScheme.SUBSET: lambda b, k: fold(base, k),
                subsets.SeedScheme.NONE: lambda b, k: tf.zeros([2], tf.int32)}
    for scheme, seed_of in expected.items():
        runs = list(subsets.run_subsets(step, batches, ["a", "b"], [("a",), ("b",), ("a", "b")],
                                        seed=base, scheme=scheme))
        assert len(runs) == 2 and "label" in runs[0][0]
        for b, (_, outputs) in enumerate(runs):
            assert list(outputs) == ["a", "b", "a+b"]
            assert [float(o["sum"]) for o in outputs.values()] == [0.0, 6.0, 6.0]  # b absent: zeros
            for k, out in enumerate(outputs.values()):
                np.testing.assert_array_equal(out["seed"], seed_of(b, k))


# ------------------------------------------------------------------------------------ GMM sampler


def test_gmm_samples_match_the_moments_of_the_fitted_latents():
    rng = np.random.default_rng(2)
    z = np.concatenate([rng.normal(-3, 0.5, (1500, 3)), rng.normal(2, 1.5, (500, 3))])
    z[:, 2] *= 4.0
    gmm = random_coherence.fit_latent_gmm(z, seed=0)
    samples = random_coherence.sample_gmm(gmm, 20000, seed=1)
    assert samples.shape == (20000, 3)
    assert np.all(np.abs(samples.mean(0) - z.mean(0)) < 0.05 * z.std(0))
    np.testing.assert_allclose(samples.var(0), z.var(0), rtol=0.1)
    np.testing.assert_array_equal(samples, random_coherence.sample_gmm(gmm, 20000, seed=1))


# ------------------------------------------------------------------------------------ plots


def test_decode_tokens_reads_characters_and_words():
    chars = ("<pad>", " ", "a", "b")
    assert plots.decode_tokens([2, 3, 1, 2, 0, 0], chars) == "ab a"
    words = ("<exc>", "<pad>", "<eos>", "red", "bird")
    assert plots.decode_tokens([3, 4, 2, 3, 1], words) == "red bird"


# ------------------------------------------------------------------------------------ end to end


TINY_MODEL = {"name": "bmvae_m", "latent_dim": 4, "hidden_units": [16], "channels": [8, 16],
              "sequence_width": 16}
TINY_EVAL = {"batch_size": 32, "classifier_epochs": 20, "random_samples": 64,
             "log_likelihood_samples": 8, "log_likelihood_examples": 16, "max_examples": 96,
             "robustness_noise_levels": [0.0, 0.5, 1.0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset and a run of an untrained tiny BMVAE_M with a two-epoch history."""
    root = tmp_path_factory.mktemp("evaluate")
    data_dir, workdir = str(root / "data"), str(root / "run")
    manifest = synthetic.write_dataset(data_dir, num_train=128, num_test=64)
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": TINY_MODEL, "eval": TINY_EVAL})
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    paths = run_dir.RunPaths(workdir)
    run_dir.model_checkpoint(model).save(os.path.join(paths.checkpoints, "ckpt"))
    with open(paths.config, "w") as f:
        f.write(config_lib.dump_yaml(config))
    with open(paths.history, "w") as f:
        for epoch in (1, 2):
            f.write(json.dumps({"epoch": epoch, "step": 4 * epoch, "loss": 10.0 / epoch,
                                "val_loss": 11.0 / epoch, "seconds": 0.5 * epoch}) + "\n")
    return manifest, paths


def _mtimes(directory: str) -> dict:
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}


def test_evaluate_writes_metrics_and_plots_and_reuses_classifiers(run):
    _, paths = run
    metrics = evaluate_lib.evaluate(paths.root)

    with open(paths.metrics) as f:
        assert json.load(f) == metrics
    names = ["digit", "street", "text"]
    assert metrics["modalities"] == names and metrics["dataset"] == "synthetic"
    assert metrics["epochs"] == 2 and metrics["seconds_per_epoch"] == pytest.approx(0.75)
    assert metrics["split"] == "test"  # the default of `bmvae evaluate --split`
    assert list(metrics["latent_accuracy"]) == [
        "digit", "street", "text", "digit+street", "digit+text", "street+text", "digit+street+text"]
    assert set(metrics["coherence"]) == {
        "street|digit", "text|digit", "digit|street", "text|street", "digit|text", "street|text",
        "text|digit+street", "street|digit+text", "digit|street+text"}
    scores = [*metrics["latent_accuracy"].values(), *metrics["coherence"].values(),
              *metrics["classifier_accuracy"].values(), metrics["random_coherence"],
              metrics["random_coherence_gmm"]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    # The synthetic modalities reveal the class, so a few steps of classifier training and a
    # linear probe on an untrained encoder's features must beat chance (0.1) clearly.
    assert min(metrics["classifier_accuracy"].values()) > 0.5
    assert metrics["latent_accuracy"]["digit+street+text"] > 0.3
    weights = np.array(metrics["mixture_weights"])
    assert weights.shape == (TINY_MODEL["latent_dim"], 3)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert set(metrics["log_likelihood"]) == set(metrics["latent_accuracy"])
    assert all(np.isfinite(v) and v < 0 for v in metrics["log_likelihood"].values())
    assert metrics["num_examples"]["latent_accuracy"] == {"train": 96, "test": 64}
    assert metrics["num_examples"]["log_likelihood"] == 16
    plot_names = ["mixture_weights.png", "training_curve.png", "prior_samples.png", "latent_embedding.png",
                  *[f"cross_generation_{n}.png" for n in names]]
    for name in plot_names:
        with open(os.path.join(paths.plots, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(paths.plots) if ".tmp-" in n]

    robustness = metrics["robustness"]
    assert robustness["noise_levels"] == [0.0, 0.5, 1.0]
    for table in ("latent_accuracy", "baseline_accuracy"):
        assert list(robustness[table]) == list(metrics["latent_accuracy"])
        assert all(len(curve) == 3 for curve in robustness[table].values())
    # level 0 is the clean test split: the same probe on the same latents as latent_accuracy
    assert {k: v[0] for k, v in robustness["latent_accuracy"].items()} == metrics["latent_accuracy"]
    assert set(robustness["relative"]) == set(robustness["effective"]) == set(metrics["latent_accuracy"])
    assert metrics["num_examples"]["robustness"] == {"train": 96, "test": 64, "baseline_train": 96,
                                                     "levels": 3}
    with open(os.path.join(paths.root, "report.html")) as f:
        page = f.read()
    assert "Robustness (MultiBench)" in page and "Latent accuracy (linear probe" in page
    # the loss curves, mixture weights, coherence matrix, cross generation from each of the three
    # modalities, prior samples, the latent embedding and robustness
    assert page.count("data:image/png;base64,") == 9
    assert page.index("Training curve") < page.index("Mixture weights") < page.index("target x given") \
        < page.index("Cross generation from digit") < page.index("Joint generation from the prior") \
        < page.index("embedded together in 2-D") < page.index("against input noise") < page.index("<h2>Tables</h2>")

    cached = _mtimes(paths.classifiers)
    assert sorted(cached) == sorted(f"{n}.{ext}" for n in names for ext in ("keras", "json"))
    again = evaluate_lib.evaluate(paths.root)
    assert _mtimes(paths.classifiers) == cached
    assert again["classifier_accuracy"] == metrics["classifier_accuracy"]
    assert again == metrics  # every random draw comes from the run's seed


def test_eval_overrides_apply_to_eval_keys_only():
    config = config_lib.from_dict({"eval": {"log_likelihood_samples": 10}})
    changed = evaluate_lib.with_eval_overrides(config, ["eval.log_likelihood_samples=1000",
                                                        "eval.robustness_noise_levels=[0, 0.5]"])
    assert changed.eval.log_likelihood_samples == 1000
    assert changed.eval.robustness_noise_levels == [0.0, 0.5]
    assert config.eval.log_likelihood_samples == 10
    with pytest.raises(UserError, match="only eval"):
        evaluate_lib.with_eval_overrides(config, ["model.latent_dim=3"])
    with pytest.raises(UserError, match="robustness_noise_levels"):
        evaluate_lib.with_eval_overrides(config, ["eval.robustness_noise_levels=[0.5, 0.1]"])


def test_evaluate_without_labels_skips_label_metrics(run, tmp_path):
    manifest, paths = run
    # Shard entries are plain names inside the dataset directory (issue 20): copy the shards.
    for info in manifest.splits.values():
        for f in info.files:
            shutil.copy(os.path.join(manifest.directory, f), tmp_path / f)
    unlabelled = schema.Manifest(
        name=manifest.name, modalities=manifest.modalities, label=None, splits=manifest.splits,
        directory=str(tmp_path))
    schema.write_manifest(str(tmp_path), unlabelled)

    metrics = evaluate_lib.evaluate(paths.root, data_dir=str(tmp_path))
    for key in ("latent_accuracy", "coherence", "random_coherence", "random_coherence_gmm",
                "classifier_accuracy", "robustness"):
        assert metrics[key] is None and key in metrics["skipped"]
    assert len(metrics["log_likelihood"]) == 7
    assert np.array(metrics["mixture_weights"]).shape == (TINY_MODEL["latent_dim"], 3)
