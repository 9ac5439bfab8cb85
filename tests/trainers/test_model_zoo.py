"""Every model trains and evaluates through the CLI on four modalities (15 subsets)."""

import json

import pytest

from bmvae_tf.models import MODELS
from bmvae_tf.schema import subset_key, subset_names
from tests import synthetic
from trainers import cli

TINY = ["--set", "model.latent_dim=4", "--set", "model.hidden_units=[16]",
        "--set", "model.channels=[8,8,8]", "--set", "model.sequence_width=8",
        "--set", "train.batch_size=32", "--set", "model.K=2",
        "--set", "eval.max_examples=64", "--set", "eval.classifier_epochs=1",
        "--set", "eval.random_samples=50", "--set", "eval.log_likelihood_samples=8",
        "--set", "eval.log_likelihood_examples=16", "--set", "eval.robustness_noise_levels=[0,1]"]


@pytest.fixture(scope="module")
def four_modalities(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("four"))
    manifest = synthetic.write_dataset(directory, num_train=96, num_test=64, num_modalities=4)
    assert len(manifest.modalities) == 4
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_then_evaluate_every_model_on_four_modalities(name, four_modalities, tmp_path):
    run = str(tmp_path / name)
    assert cli.main(["train", "--data", four_modalities, "--workdir", run, "--model", name,
                     "--epochs", "1", *TINY]) == 0
    assert cli.main(["evaluate", "--workdir", run]) == 0
    with open(f"{run}/metrics.json") as f:
        metrics = json.load(f)
    names = metrics["modalities"]
    expected = [subset_key(s) for s in subset_names(names)]
    assert len(expected) == 15
    assert list(metrics["latent_accuracy"]) == expected
    assert list(metrics["log_likelihood"]) == expected
    assert all(0.0 <= v <= 1.0 for v in metrics["latent_accuracy"].values())
    # every target given every non-empty subset of the other three: 4 * 7
    assert len(metrics["coherence"]) == 28
    assert all(v is None or v < 0 for v in metrics["log_likelihood"].values())
    weights = metrics["mixture_weights"]
    if name.startswith("bmvae"):
        assert len(weights) == 4 and all(len(row) == 4 for row in weights)
        assert all(abs(sum(row) - 1.0) < 1e-5 for row in weights)
    assert metrics["model"] == name
    assert list(metrics["robustness"]["relative"]) == expected
