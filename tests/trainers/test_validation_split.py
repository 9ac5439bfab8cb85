"""Train / validation / test: training and selection read train and validation only, never test;
`bmvae evaluate --split` scores test (default) or validation and says which; a dataset without
a validation split gets a one-line error naming the command that rebuilds it."""

from __future__ import annotations

import json
import os

import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.trainers import cli
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.training import inputs
from tests import synthetic

SMALL_MODEL = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}
TINY_EVAL = ["--set", "eval.classifier_epochs=1", "--set", "eval.random_samples=16",
             "--set", "eval.log_likelihood_samples=2", "--set", "eval.log_likelihood_examples=8",
             "--set", "eval.max_examples=64", "--set", "eval.robustness_noise_levels=[0,1]",
             "--set", "eval.robustness_baseline_examples=64"]


def _without_test_shards(directory: str) -> None:
    """Removes every test shard the manifest lists, so any read of one fails."""
    manifest = schema.read_manifest(directory)
    for path in manifest.split_paths(schema.TEST):
        os.remove(path)


@pytest.mark.slow  # ~40 s on 2 cores: three short epochs and a small evaluation
def test_training_and_selection_never_open_a_test_shard(tmp_path, capsys):
    data, workdir = str(tmp_path / "data"), str(tmp_path / "run")
    synthetic.write_dataset(data, num_train=128, num_test=32, num_validation=32)
    _without_test_shards(data)
    # No epoch after the first improves by 1e12: early stopping (patience 1) selects epoch 1.
    config = config_lib.from_dict({
        "data": {"dir": data}, "model": SMALL_MODEL,
        "train": {"epochs": 4, "batch_size": 16, "log_every_steps": 1000,
                  "early_stopping_patience": 1, "early_stopping_min_delta": 1e12}})
    history = train.train(config, workdir)
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["stopped_early"]
    assert all(h["val_loss"] is not None for h in history)
    best = os.path.join(workdir, "checkpoints", run_dir.BEST)
    assert tf.train.latest_checkpoint(best).endswith("-8")  # epoch 1: 128 // 16 steps
    # Scoring the validation split (as a search would) does not need the test shards either.
    assert cli.main(["evaluate", "--workdir", workdir, "--split", "validation", *TINY_EVAL]) == 0
    metrics = json.load(open(os.path.join(workdir, "metrics-validation.json")))
    assert metrics["split"] == "validation"
    # The validation scores have their own file: a run's metrics.json (what reports and
    # `bmvae compare` read) only ever holds test scores.
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    assert not os.path.exists(os.path.join(workdir, "report.html"))
    assert metrics["num_examples"]["latent_accuracy"]["test"] == 32  # the 32 validation examples
    # ... while scoring test does open them: the missing shard is named.
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", workdir]) == 2
    assert "test-00000-of-00002.tfrecord.gz" in capsys.readouterr().err


def test_a_dataset_without_validation_names_the_rebuild_command(tmp_path, capsys):
    data, workdir = str(tmp_path / "old"), str(tmp_path / "run")
    synthetic.write_dataset(data, num_train=32, num_test=16, num_validation=0)
    code = cli.main(["train", "--data", data, "--workdir", workdir, "--epochs", "1",
                     *[a for k, v in SMALL_MODEL.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]])
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("bmvae:")]
    assert code == 2 and len(errors) == 1, errors
    assert "has no validation split" in errors[0]
    assert f"bmvae data build arrays --input FILE.npz --output {data} --overwrite" in errors[0]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_rebuild_command_names_the_dataset_job():
    for name in ("digits", "mnist-svhn", "mnist-svhn-text", "cub"):
        manifest = schema.Manifest(name=name, modalities=(), splits={}, directory="/d")
        assert inputs.rebuild_command(manifest) == f"bmvae data build {name} --output /d --overwrite"


def test_choose_validation_prefers_the_split_then_a_held_out_fraction(tmp_path):
    data = str(tmp_path / "data")
    manifest = synthetic.write_dataset(data, num_train=16, num_test=8, num_validation=8)
    assert list(manifest.splits) == ["train", "validation", "test"]
    t = config_lib.from_dict({"data": {"dir": data}, "train": {"validation_fraction": 0.2}}).train
    assert inputs.choose_validation(manifest, t) == inputs.Validation("validation")
    assert inputs.splits_read(inputs.Validation("validation")) == ("train", "validation")
    old = synthetic.write_dataset(str(tmp_path / "old"), num_train=16, num_test=8, num_validation=0)
    assert inputs.choose_validation(old, t) == inputs.Validation("train", 0.2)
    assert inputs.splits_read(inputs.Validation("train", 0.2)) == ("train",)


def test_evaluate_split_option_and_metrics_record(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--workdir", str(tmp_path), "--split", "train"])
    assert "invalid choice: 'train'" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["evaluate", "--workdir", "w"])
    assert args.split == "test"
    # metrics.json files written before the split was recorded scored test.
    old = Metrics(model="m", dataset="d", modalities=["a"], epochs=1, seconds_per_epoch=None).to_json()
    assert old["split"] == "test"
    del old["split"]
    assert Metrics.from_json(old).split == "test"
