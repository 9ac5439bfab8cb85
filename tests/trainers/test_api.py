"""The Python API (bmvae_tf/api.py): build_model, load_dataset, load_run, evaluate."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import bmvae_tf
from bmvae_tf.errors import UserError
from bmvae_tf.models import BMVAEM, MVAEMS
from tests import synthetic

TINY = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("api"))
    synthetic.write_dataset(directory, num_train=40, num_test=24)
    return directory


def test_import_bmvae_tf_stays_free_of_tensorflow():
    code = "import sys, bmvae_tf; assert 'tensorflow' not in sys.modules; print(sorted(bmvae_tf.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "build_model" in out and "load_run" in out


def test_build_model_from_a_dataset_or_from_specs_by_hand(dataset):
    from_data = bmvae_tf.build_model("bmvae_m", dataset, lambda_c=12, seed=0, **TINY)
    assert isinstance(from_data, BMVAEM) and from_data.lambda_c == 12 and from_data.built
    by_hand = bmvae_tf.build_model("mvae_ms", [
        {"name": "a", "kind": "vector", "shape": [6], "likelihood": "gaussian"},
        {"name": "b", "kind": "image", "shape": [8, 8, 1], "likelihood": "laplace"}],
        ms={"private_dim": 3}, **TINY)
    assert isinstance(by_hand, MVAEMS) and by_hand.private_dim == 3 and by_hand.modality_names == ["a", "b"]
    assert by_hand.posterior_family == "gaussian"  # `posterior: auto` resolved as a config would
    assert by_hand(synthetic.random_inputs(by_hand.modalities, 3)).shape == [3, by_hand.latent_dim]


@pytest.mark.parametrize("args, kwargs, message", [
    (("nope", None), {}, "build_model: unknown model 'nope'"),
    (("mvae", None), {"lambda_c": 3}, "build_model: mvae takes no hyper-parameter 'lambda_c'; known: channels"),
    (("mvae", None), {"latent_dim": 0}, "model.latent_dim must be >= 1"),
    (("mvae", [{"name": "a", "kind": "vector"}]), {}, "modalities\\[0\\]: missing key 'shape'"),
    (("mvae", [{"name": "a", "kind": "voxel", "shape": [2]}]), {}, "modality 'a': kind 'voxel' is not one of"),
    (("mvae", {"name": "a"}), {}, "modalities: give a dataset directory"),
])
def test_bad_arguments_are_one_line_errors_naming_them(dataset, args, kwargs, message):
    name, modalities = args
    with pytest.raises(ValueError, match=message) as error:
        bmvae_tf.build_model(name, dataset if modalities is None else modalities, **kwargs)
    assert "\n" not in str(error.value)


def test_load_dataset_is_the_trainers_pipeline_with_a_known_length(dataset):
    train = bmvae_tf.load_dataset(dataset, "train", 16)
    assert int(train.cardinality()) == 3  # 16 + 16 + 8
    batches = list(train)
    assert [int(b["digit"].shape[0]) for b in batches] == [16, 16, 8]
    assert set(batches[0]) >= {"digit", "street", "text", "label"}
    assert int(bmvae_tf.load_dataset(dataset, "train", 16, drop_remainder=True).cardinality()) == 2
    shuffled = bmvae_tf.load_dataset(dataset, "train", 40, shuffle=True, seed=1)
    first, second = (next(iter(shuffled))["noise_seed"].numpy().ravel() for _ in range(2))
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)  # a new order each pass
    assert int(bmvae_tf.load_dataset(dataset, "validation", 16).cardinality()) == 4  # 64 examples
    with pytest.raises(UserError, match="no split 'calibration'; the dataset has \\['test', 'train', 'validation'\\]"):
        bmvae_tf.load_dataset(dataset, "calibration", 16)


def test_load_run_returns_the_checkpoints_model_and_config(dataset, tmp_path):
    workdir = str(tmp_path / "run")
    _, saved = synthetic.write_untrained_run(dataset, workdir, model={"name": "mmvae", **TINY})
    run = bmvae_tf.load_run(workdir)
    assert run.config.model.name == "mmvae" and run.manifest.modality_names == ["digit", "street", "text"]
    for a, b in zip(run.model.weights, saved.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_evaluate_runs_the_chosen_stages_on_a_model_in_memory(dataset, tmp_path):
    model = bmvae_tf.build_model("mvae", dataset, seed=0, **TINY)
    metrics = bmvae_tf.evaluate(model, dataset, metrics=["log_likelihood"], log_likelihood_samples=3,
                                log_likelihood_examples=8)
    assert set(metrics["log_likelihood"]) == {"digit", "street", "text", "digit+street", "digit+text",
                                              "street+text", "digit+street+text"}
    assert all(np.isfinite(v) for v in metrics["log_likelihood"].values())
    assert metrics["latent_accuracy"] is None and metrics["model"] == "mvae"  # not asked for
    assert "latent_accuracy" in bmvae_tf.metric_names()
    with pytest.raises(UserError, match="evaluate: unknown metric 'accuracy'; choose from classifier_accuracy"):
        bmvae_tf.evaluate(model, dataset, metrics=["accuracy"])
    with pytest.raises(UserError, match="eval.max_examples must be >= 0"):
        bmvae_tf.evaluate(model, dataset, metrics=["log_likelihood"], max_examples=-1)


def test_predict_gives_posterior_means(dataset):
    model = bmvae_tf.build_model("bmvae_p", dataset, seed=0, **TINY)
    means = model.predict(bmvae_tf.load_dataset(dataset, "test", 8), verbose=0)
    assert means.shape == (24, 4) and np.all(np.isfinite(means))
    assert tf.is_tensor(model(next(iter(bmvae_tf.load_dataset(dataset, "test", 8)))))
