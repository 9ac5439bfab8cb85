"""The likelihood metrics of `bmvae evaluate` on a run (issue 14): what metrics.json records, and
that the likelihood weights of training never enter it. Their exactness against closed forms is
tested in tests/models/test_likelihood_exactness.py."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import tensorflow as tf

from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
from bmvae_tf.trainers.evaluation import likelihood
from tests import synthetic

TINY_MODEL = {"name": "bmvae_m", "latent_dim": 4, "hidden_units": [16], "channels": [8, 16],
              "sequence_width": 16}
TINY_EVAL = {"batch_size": 32, "log_likelihood_samples": 6, "log_likelihood_examples": 20, "max_examples": 48}
LIKELIHOODS = ("log_likelihood", "joint_log_likelihood", "conditional_log_likelihood")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dataset (whose manifest weights digit x12 and text x96) and a run of an untrained tiny
    BMVAE_M."""
    root = tmp_path_factory.mktemp("likelihood")
    data_dir, workdir = str(root / "data"), str(root / "run")
    manifest = synthetic.write_dataset(data_dir, num_train=32, num_test=32)
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": TINY_MODEL, "eval": TINY_EVAL})
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    paths = run_dir.RunPaths(workdir)
    run_dir.model_checkpoint(model).save(os.path.join(paths.checkpoints, "ckpt"))
    with open(paths.config, "w") as f:
        f.write(config_lib.dump_yaml(config))
    with open(paths.history, "w") as f:
        f.write(json.dumps({"epoch": 1, "step": 2, "loss": 10.0, "val_loss": 11.0, "seconds": 0.5}) + "\n")
    return paths


@pytest.fixture
def likelihoods_only(monkeypatch):
    """`evaluate` with only the likelihood stage and no plots: the rest is tested in test_evaluate."""
    monkeypatch.setattr(evaluate_lib, "STAGES", [evaluate_lib.Stage(likelihood.log_likelihood_stage)])
    monkeypatch.setattr(evaluate_lib, "_start_plots", lambda context, background: None)


def _set_likelihood_weights(paths, weights: dict) -> None:
    config = run_dir.read_config(paths)
    config.model.likelihood_weights = weights
    with open(paths.config, "w") as f:
        f.write(config_lib.dump_yaml(config))


def test_metrics_json_records_every_likelihood_with_its_estimator_examples_and_samples(run, likelihoods_only):
    metrics = evaluate_lib.evaluate(run.root)
    with open(run.metrics) as f:
        assert json.load(f) == metrics
    subsets = ["digit", "street", "text", "digit+street", "digit+text", "street+text", "digit+street+text"]
    assert list(metrics["log_likelihood"]) == subsets
    assert metrics["joint_log_likelihood"] == metrics["log_likelihood"]["digit+street+text"]
    assert list(metrics["conditional_log_likelihood"]) == [
        "street|digit", "text|digit", "street+text|digit", "digit|street", "text|street",
        "digit+text|street", "digit|text", "street|text", "digit+street|text",
        "text|digit+street", "street|digit+text", "digit|street+text"]
    values = [*metrics["log_likelihood"].values(), *metrics["conditional_log_likelihood"].values()]
    assert all(isinstance(v, float) for v in values)
    assert set(metrics["likelihood_estimators"]) == set(LIKELIHOODS)
    assert "q(z|x_S)" in metrics["likelihood_estimators"]["conditional_log_likelihood"]
    for name in LIKELIHOODS:
        assert metrics["num_examples"][name] == 20 and metrics["num_examples"][f"{name}_samples"] == 6


def test_log_likelihood_does_not_change_with_the_likelihood_weights(run, likelihoods_only):
    """Only model.likelihood_weights changes in the run's config between two evaluations: the
    model really scores differently in training, and every likelihood stays as it was."""
    _set_likelihood_weights(run, {})
    before = evaluate_lib.evaluate(run.root)
    trained_with = run_dir.load_trained_model(run.root)[2].likelihood_weights
    _set_likelihood_weights(run, {"digit": 1.0, "street": 40.0, "text": 0.5})
    after = evaluate_lib.evaluate(run.root)
    assert trained_with == [12.0, 1.0, 96.0]
    assert run_dir.load_trained_model(run.root)[2].likelihood_weights == [1.0, 40.0, 0.5]
    for name in LIKELIHOODS:
        assert after[name] == before[name], name
    _set_likelihood_weights(run, {})


@pytest.mark.parametrize("wanted, cap, expected", [(500, 0, 500), (0, 0, 0), (500, 64, 64), (0, 64, 64),
                                                   (20, 64, 20)])
def test_examples_to_score_reads_zero_as_the_whole_split(wanted, cap, expected):
    config = config_lib.EvalConfig(log_likelihood_examples=wanted, max_examples=cap)
    assert likelihood.examples_to_score(config) == expected


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


# configs/search/ holds `bmvae tune`'s search spaces, not configs.
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))
                      if os.path.basename(os.path.dirname(p)) != "search")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_paper_configs_estimate_with_k_1000_over_the_whole_test_split(path):
    """Shi et al.'s protocol for the paper's datasets; the digits demo may use fewer."""
    config = config_lib.from_dict(config_lib.load_yaml(path), source=path)
    if os.path.basename(os.path.dirname(path)) == "digits":
        assert config.eval.log_likelihood_samples >= 100
    else:
        assert (config.eval.log_likelihood_samples, config.eval.log_likelihood_examples) == (1000, 0)


def test_tensorboard_headline_metrics_carry_the_joint_and_conditional_likelihoods():
    from bmvae_tf.trainers.training import summaries

    assert summaries.headline_metrics({"joint_log_likelihood": -5.0,
                                       "conditional_log_likelihood": {"b|a": -2.0, "a|b": None}}) == {
        "eval/joint_log_likelihood": -5.0, "eval/conditional_log_likelihood/b|a": -2.0}


@pytest.mark.slow  # ~10 s a model, most of it tracing
@pytest.mark.parametrize("name", sorted(config_lib.MODELS))
def test_every_model_scores_every_likelihood(name):
    """The estimator runs on each model's own subset posterior (mixtures, products, Blockwise with
    private latents): finite numbers for every key, L_S(S) the same as log_marginal."""
    specs = synthetic.digits_like_modalities(3)
    config = config_lib.from_dict({"model": {**TINY_MODEL, "name": name, "K": 2}})
    model = config_lib.build_model(config.model, specs)
    inputs = synthetic.random_inputs(specs, 5)
    model.loss_terms(inputs, tf.constant([0, 0]))  # build
    estimates = likelihood.likelihood_estimates(model, [inputs], num_samples=3, seed=4)
    assert len(estimates.log_likelihood) == 7 and len(estimates.conditional_log_likelihood) == 12
    assert all(math.isfinite(v) for v in [*estimates.log_likelihood.values(),
                                          *estimates.conditional_log_likelihood.values()]), estimates
    present = tf.constant([True, False, True])
    seed = tf.random.experimental.stateless_fold_in(tf.constant([4, 3]), 0)
    alone = float(tf.reduce_mean(model.log_marginal(inputs, present, 3, seed)))
    assert estimates.log_likelihood["digit+text"] == pytest.approx(alone, rel=1e-5)
