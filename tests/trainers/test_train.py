"""The training loop: the loss falls, and a rerun resumes exactly where the checkpoint left off."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests import synthetic
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import demo
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.training import steps as steps_lib

SMALL_MODEL = {"latent_dim": 6, "hidden_units": [32], "channels": [8, 16, 16], "sequence_width": 16}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.write_dataset(directory, num_train=384, num_test=64)
    return directory


def _config(data_dir, **train_overrides):
    return config_lib.from_dict({
        "data": {"dir": data_dir}, "model": SMALL_MODEL,
        "train": {"epochs": 3, "batch_size": 32, "log_every_steps": 1000, **train_overrides}})


def test_loss_falls(dataset, tmp_path):
    history = train.train(_config(dataset, epochs=4, learning_rate=3e-3), str(tmp_path / "run"))
    losses = [h["loss"] for h in history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.03 * abs(losses[0])
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert [h["step"] for h in history] == [12, 24, 36, 48]
    for key in ("epoch", "step", "loss", "val_loss", "seconds"):
        assert key in history[0]


def _weights(workdir):
    _, _, model = run_dir.load_trained_model(workdir)
    return [v.numpy() for v in model.weights]


def test_resume_continues_exactly(dataset, tmp_path):
    tf.config.experimental.enable_op_determinism()
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.train(_config(dataset, epochs=3), straight)
    train.train(_config(dataset, epochs=2), split)
    resumed = train.train(_config(dataset, epochs=3), split)

    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    with open(os.path.join(split, "history.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [h["step"] for h in lines] == [12, 24, 36]
    for a, b in zip(_weights(straight), _weights(split)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rerun_of_a_finished_run_trains_nothing(dataset, tmp_path):
    workdir = str(tmp_path / "run")
    first = train.train(_config(dataset, epochs=1), workdir)
    again = train.train(_config(dataset, epochs=1), workdir)
    assert again == first


def test_resume_with_a_different_model_is_refused(dataset, tmp_path):
    workdir = str(tmp_path / "run")
    config = _config(dataset, epochs=1)
    train.train(config, workdir)
    with pytest.raises(config_lib.UserError, match="model.latent_dim"):
        train.resolve_config(workdir, dataset, None, ["model.latent_dim=9"])


def test_batch_larger_than_the_data_is_a_user_error(dataset, tmp_path):
    with pytest.raises(config_lib.UserError, match="batch_size"):
        train.train(_config(dataset, batch_size=4096), str(tmp_path / "run"))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_train_step_is_traced_once_across_epochs(dataset, tmp_path, monkeypatch, jit_compile):
    """A new dataset per epoch must not retrace the step (retracing costs seconds per epoch, and
    under jit_compile each retrace is an XLA compilation)."""
    steps = []
    original = steps_lib.make_train_step

    def recording(*args, **kwargs):
        step = original(*args, **kwargs)
        steps.append(step)
        return step

    monkeypatch.setattr(steps_lib, "make_train_step", recording)
    train.train(_config(dataset, epochs=3, jit_compile=jit_compile), str(tmp_path / "run"))
    assert len(steps) == 1
    assert steps[0].experimental_get_tracing_count() == 1
    compiled = steps[0].compiled_loss_and_grads
    if jit_compile:
        # The XLA-compiled loss and gradients, traced once with the step that calls them.
        assert compiled.experimental_get_tracing_count() == 1
    else:
        assert compiled is None


@pytest.mark.parametrize("setting, deterministic, steps, expected", [
    (None, False, config_lib.JIT_MIN_STEPS, True),
    (None, False, config_lib.JIT_MIN_STEPS - 1, False),
    (None, True, 10 * config_lib.JIT_MIN_STEPS, False),
    (True, True, 1, True),
    (False, False, 10 * config_lib.JIT_MIN_STEPS, False),
])
def test_jit_compile_null_means_xla_for_long_runs_only(setting, deterministic, steps, expected):
    t = config_lib.TrainConfig(jit_compile=setting, deterministic=deterministic)
    assert config_lib.resolve_jit_compile(t, steps) is expected


def test_auto_jit_compile_compiles_a_run_long_enough(dataset, tmp_path, monkeypatch, caplog):
    """train.jit_compile: null (the digits config's setting) gives XLA to a run of at least
    JIT_MIN_STEPS steps. The default is false: XLA is slower on the paper's conv nets on CPU."""
    assert config_lib.TrainConfig().jit_compile is False
    assert config_lib.load_yaml(demo.DEMO_CONFIG)["train"]["jit_compile"] is None
    monkeypatch.setattr(config_lib, "JIT_MIN_STEPS", 24)  # this run: 2 epochs x 12 steps
    steps = []
    original = steps_lib.make_train_step
    monkeypatch.setattr(steps_lib, "make_train_step",
                        lambda *a, **k: steps.append(original(*a, **k)) or steps[-1])
    with caplog.at_level("INFO", logger="bmvae.train"):
        train.train(_config(dataset, epochs=2, jit_compile=None), str(tmp_path / "run"))
    assert steps[0].compiled_loss_and_grads is not None
    assert any("XLA on (train.jit_compile: null, 24 steps)" in r.message for r in caplog.records)
