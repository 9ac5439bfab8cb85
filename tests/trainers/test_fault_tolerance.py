"""Fault tolerance and GPU options of the training loop: kill -9 and resume from a step
checkpoint, NaN, early stopping, the held-out validation set, mixed precision, XLA, determinism."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from tests import synthetic
from bmvae_tf.trainers import cli
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir, train
from bmvae_tf.trainers.training import inputs
from bmvae_tf.trainers.training import steps as steps_lib
from bmvae_tf.trainers.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
SMALL_MODEL = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}
TINY = [a for k, v in SMALL_MODEL.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("faults"))
    synthetic.write_dataset(directory, num_train=192, num_test=32)
    return directory


@pytest.fixture(scope="module")
def old_dataset(tmp_path_factory):
    """The same examples without a validation split (a dataset built before they existed)."""
    directory = str(tmp_path_factory.mktemp("old"))
    synthetic.write_dataset(directory, num_train=192, num_test=32, num_validation=0)
    return directory


def _config(data_dir, model=None, **train_overrides):
    return config_lib.from_dict({
        "data": {"dir": data_dir}, "model": {**SMALL_MODEL, **(model or {})},
        "train": {"epochs": 2, "batch_size": 16, "log_every_steps": 1000, **train_overrides}})


def _weights(workdir):
    _, _, model = run_dir.load_trained_model(workdir)
    return [v.numpy() for v in model.weights]


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_from_the_step_checkpoint_exactly(dataset, tmp_path):
    args = [sys.executable, "-m", "bmvae_tf.trainers.cli", "train", "--data", dataset, *TINY,
            "--epochs", "4", "--set", "train.batch_size=16", "--set", "train.checkpoint_every_steps=5",
            "--set", "train.log_every_steps=1", "--set", "train.deterministic=true"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = subprocess.Popen([*args, "--workdir", str(killed)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    # Kill once the checkpoint state names a step checkpoint (the data files of ckpt-5 appear
    # before the state file that a rerun reads).
    while tf.train.latest_checkpoint(str(killed / "checkpoints")) is None:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no step checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    progress_at_kill = _read_jsonl(killed / "progress.jsonl")
    assert progress_at_kill[-1]["step"] < 48, "the run finished before it was killed"
    assert not (killed / "history.jsonl").exists() or len(_read_jsonl(killed / "history.jsonl")) < 4
    restored = int(tf.train.latest_checkpoint(str(killed / "checkpoints")).rsplit("-", 1)[1])
    assert restored >= 5  # a step checkpoint (every 5 steps) or an epoch-end one (every 12)
    # At most one checkpoint interval of work is lost.
    assert progress_at_kill[-1]["step"] - restored <= 5

    rerun = subprocess.run([*args, "--workdir", str(killed)], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ckpt-{restored} at epoch {restored // 12 + 1}, step {restored}" in rerun.stderr
    # The rerun trains from the step after the checkpoint, not from the start.
    rerun_steps = [int(m) for m in re.findall(r"epoch \d+/4 step (\d+) loss", rerun.stderr)]
    assert rerun_steps == list(range(restored + 1, 49)), rerun_steps
    assert subprocess.run([*args, "--workdir", str(straight)], env=ENV, capture_output=True,
                          timeout=300).returncode == 0

    # 192 examples / 16 = 12 steps per epoch, 48 in all: every step logged once, in order.
    steps = [p["step"] for p in _read_jsonl(killed / "progress.jsonl")]
    assert steps == list(range(1, 49)), steps
    history = _read_jsonl(killed / "history.jsonl")
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 12), (2, 24), (3, 36), (4, 48)]
    # Replaying the epoch's order from the checkpoint reproduces the uninterrupted run.
    for a, b in zip(_weights(str(killed)), _weights(str(straight))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "val_loss"):
        assert [h[key] for h in history] == pytest.approx(
            [h[key] for h in _read_jsonl(straight / "history.jsonl")], rel=1e-5)


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(dataset, tmp_path, monkeypatch):
    """A step's loss is computed before its update: poison a weight after step 8's (finite) loss,
    just before the step-8 checkpoint. Training stops and ckpt-6 stays the latest."""
    real_make_train_step = steps_lib.make_train_step

    def poisoned_after_step_8(state, *args, **kwargs):
        step_fn = real_make_train_step(state, *args, **kwargs)

        def step(batch):
            loss = step_fn(batch)
            if int(state.step.numpy()) == 8:
                weight = state.model.trainable_variables[0]
                weight.assign(tf.fill(weight.shape, float("nan")))
            return loss

        return step

    monkeypatch.setattr(steps_lib, "make_train_step", poisoned_after_step_8)
    workdir = str(tmp_path / "run")
    with pytest.raises(train.TrainingDiverged, match="a weight became NaN or Inf by step 8") as error:
        train.train(_config(dataset, checkpoint_every_steps=2), workdir)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith("ckpt-6") and latest in str(error.value)
    assert all(np.all(np.isfinite(w)) for w in _weights(workdir))


def test_injected_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = str(tmp_path / "data")
    # 192 training records; record 150 is corrupt, so it is met after a few step checkpoints.
    synthetic.write_dataset(data, num_train=192, num_test=32, shards=1, nan_train_example=150)
    workdir = tmp_path / "run"
    code = cli.main(["train", "--data", data, "--workdir", str(workdir), *TINY, "--epochs", "2",
                     "--set", "train.batch_size=16", "--set", "train.checkpoint_every_steps=2",
                     "--set", "train.shuffle_buffer=1"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "training diverged: loss is nan" in err and "last good checkpoint is" in err
    assert "Traceback" not in err
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    assert latest is not None and latest in err
    # Record 150 sits in batch 10 (0-based 9) of epoch 1 with this order: the checkpoints at
    # steps 2..8 were good; nothing from step 10 on was saved.
    assert int(latest.rsplit("-", 1)[1]) == 8
    assert all(np.all(np.isfinite(w)) for w in _weights(str(workdir)))
    assert not (workdir / "history.jsonl").read_text().strip()


def test_early_stopping_stops_keeps_the_best_epoch_and_does_not_train_again(old_dataset, tmp_path):
    workdir = str(tmp_path / "run")
    # No epoch after the first can improve by more than min_delta: patience 2 stops after epoch 3.
    # Without a validation split, train.validation_fraction holds a quarter of train out.
    config = _config(old_dataset, epochs=6, early_stopping_patience=2, early_stopping_min_delta=1e12,
                     validation_fraction=0.25)
    history = train.train(config, workdir)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["stopped_early"] and "stopped_early" not in history[0]
    best = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints", run_dir.BEST))
    assert best is not None and best.endswith("-9")   # epoch 1: int(192 * 0.75) // 16 = 9 steps
    # evaluate/export load the best epoch's weights, not the last.
    model_weights = _weights(workdir)
    _, manifest, fresh = run_dir.load_trained_model(workdir)
    run_dir.model_checkpoint(fresh).restore(
        tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))).expect_partial()
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(model_weights, fresh.weights))
    assert train.train(config, workdir) == history


def test_training_never_falls_back_to_the_test_split(old_dataset, tmp_path):
    """A dataset without a validation split: training refuses (naming the rebuild command and
    train.validation_fraction) rather than compute val_loss, or select, on test."""
    for patience in (0, 2):
        with pytest.raises(config_lib.UserError, match=r"no validation split.*bmvae data build arrays.*"
                                                       r"validation_fraction"):
            train.train(_config(old_dataset, early_stopping_patience=patience), str(tmp_path / "run"))


def test_held_out_validation_records_are_disjoint_from_training_and_cover_the_split(dataset):
    manifest = schema.read_manifest(dataset)

    def keys(fraction=0.0, held_out=False, **kwargs):
        holdout = input_pipeline.Holdout(fraction, held_out) if fraction else None
        ds = input_pipeline.make_dataset(manifest, "train", 64,
                                         input_pipeline.ReadOptions(holdout=holdout, **kwargs))
        return [float(v) for b in ds for v in b["noise_seed"].numpy().ravel()]

    train_keys = keys(0.25, held_out=False)
    held_keys = keys(0.25, held_out=True)
    assert not set(train_keys) & set(held_keys)
    assert sorted(train_keys + held_keys) == sorted(keys())
    assert 0.12 < len(held_keys) / 192 < 0.38
    # The choice follows the record, not its position: a shuffled read holds out the same ones.
    assert sorted(keys(0.25, held_out=True, shuffle=True, seed=5)) == sorted(held_keys)


def test_skip_batches_starts_the_seeded_epoch_order_part_way(dataset):
    manifest = schema.read_manifest(dataset)
    order = lambda skip: [b["noise_seed"].numpy().ravel().tolist() for b in input_pipeline.make_dataset(
        manifest, "train", 16, input_pipeline.ReadOptions(shuffle=True, seed=9, drop_remainder=True,
                                                          skip_batches=skip))]
    assert order(5) == order(0)[5:]


@pytest.mark.parametrize("seed,pipelines", [(0, 1), (7, 2)])
def test_the_dataset_over_epochs_reads_each_epochs_own_batches_from_the_resumed_step(dataset, seed,
                                                                                    pipelines):
    """The loop's one dataset over the epochs (epoch numbers as tensors) gives exactly the
    batches of each epoch's own dataset (int seeds), the first from the resumed step on; seed 0
    is the global seed that Dataset.shuffle cannot take with a tensor seed."""
    keras.utils.set_random_seed(seed)  # as the Trainer does
    manifest = schema.read_manifest(dataset)
    config = _config(dataset, epochs=4, seed=seed, shuffle_buffer=64)
    validation = inputs.choose_validation(manifest, config.train)
    steps = inputs.steps_per_epoch(manifest, validation, 16)
    keys = lambda ds: [b["noise_seed"].numpy().ravel().tolist() for b in ds]
    for pipeline in range(pipelines):
        ctx = tf.distribute.InputContext(pipelines, pipeline, pipelines)
        for first, done in ((1, 0), (2, 5)):
            epochs = [keys(inputs.epoch_dataset(ctx, manifest, config, validation, epoch,
                                                done if epoch == first else 0, steps, False))
                      for epoch in range(first, 5)]
            assert [len(e) for e in epochs] == [steps - done] + [steps] * (4 - first)
            assert epochs[1] != epochs[2]  # each epoch its own order
            over_epochs = keys(inputs.epochs_dataset(ctx, manifest, config, validation, first, done,
                                                     steps, False))
            assert over_epochs == [b for e in epochs for b in e]


def test_mixed_precision_trains_float32_variables_to_a_loss_near_float32(dataset, tmp_path):
    mixed = train.train(_config(dataset, epochs=1, mixed_precision=True), str(tmp_path / "mixed"))
    full = train.train(_config(dataset, epochs=1), str(tmp_path / "full"))
    assert np.isfinite(mixed[0]["loss"])
    assert mixed[0]["loss"] == pytest.approx(full[0]["loss"], rel=0.02)
    assert all(w.dtype == np.float32 for w in _weights(str(tmp_path / "mixed")))
    # The networks really computed in float16.
    config = _config(dataset, mixed_precision=True)
    state = Trainer(config, schema.read_manifest(dataset), tf.distribute.get_strategy())
    assert state.model.encoders[0].dtype_policy.compute_dtype == "float16"
    assert "LossScaleOptimizer" in type(state.optimizer).__name__


def _one_sgd_step(config, manifest, batch, jit_compile):
    """Weight deltas and loss of one SGD step (SGD's update is the gradient itself; Adam's first
    steps are about lr * sign(g) and would amplify rounding in near-zero gradients)."""
    strategy = tf.distribute.get_strategy()
    state = Trainer(config, manifest, strategy)
    state.optimizer = keras.optimizers.SGD(0.1)
    state.optimizer.build(state.model.trainable_variables)
    initial = [v.numpy() for v in state.model.trainable_variables]
    loss = float(steps_lib.make_train_step(state, strategy, 16, 3, jit_compile=jit_compile)(batch))
    delta = np.concatenate([(v.numpy() - i).ravel() for v, i in zip(state.model.trainable_variables, initial)])
    return loss, delta


def test_mixed_precision_scales_the_loss_so_the_update_is_the_float32_update(dataset):
    """The float16 gradients come from the loss times the loss scale and are unscaled before the
    update: one SGD step moves the weights as the float32 step does. An unscaled loss would leave
    the LossScaleOptimizer dividing the true gradients by the scale. (The scale starts at 16:
    Keras' default 2^15 overflows float16 on this loss, and the optimizer rightly skips that step.)"""
    manifest = schema.read_manifest(dataset)
    batch = next(iter(input_pipeline.make_dataset(manifest, "train", 16)))

    def one_step(mixed):
        config = _config(dataset, mixed_precision=mixed)
        strategy = tf.distribute.get_strategy()
        state = Trainer(config, manifest, strategy)
        sgd = keras.optimizers.SGD(0.1)
        state.optimizer = keras.optimizers.LossScaleOptimizer(sgd, initial_scale=16.0) if mixed else sgd
        state.optimizer.build(state.model.trainable_variables)
        initial = [v.numpy() for v in state.model.trainable_variables]
        steps_lib.make_train_step(state, strategy, 16, 3)(batch)
        return np.concatenate([(v.numpy() - i).ravel()
                               for v, i in zip(state.model.trainable_variables, initial)])

    mixed, full = one_step(True), one_step(False)
    assert np.linalg.norm(mixed) / np.linalg.norm(full) == pytest.approx(1.0, abs=0.05)
    assert np.corrcoef(mixed, full)[0, 1] > 0.99


@pytest.mark.parametrize("name", ["bmvae_m", "mmvae", "bmvae_p"])
def test_xla_compiled_step_matches_the_plain_step(dataset, name):
    config = _config(dataset, {"name": name, "K": 2})
    manifest = schema.read_manifest(dataset)
    batch = next(iter(input_pipeline.make_dataset(manifest, "train", 16)))
    xla_loss, xla_delta = _one_sgd_step(config, manifest, batch, jit_compile=True)
    loss, delta = _one_sgd_step(config, manifest, batch, jit_compile=False)
    if name == "bmvae_p":
        # Its Dirichlet draws differ under XLA (bmvae_tf/noise.py): the same objective, other noise.
        assert xla_loss == pytest.approx(loss, rel=0.05)
        return
    assert xla_loss == pytest.approx(loss, rel=1e-5)
    assert np.max(np.abs(xla_delta - delta)) < 1e-3 * np.max(np.abs(delta))


def test_xla_training_runs_an_epoch(dataset, tmp_path):
    history = train.train(_config(dataset, {"K": 2}, epochs=1, jit_compile=True), str(tmp_path / "run"))
    assert np.isfinite(history[0]["loss"])


def test_determinism_and_dtype_policy_are_set_for_each_run_and_restored_after(dataset, tmp_path,
                                                                             monkeypatch):
    """train.deterministic and train.mixed_precision hold during their run only: two runs with
    different settings in one process each see their own, and the process's state is as before
    after each, also after a run that fails."""
    # TensorFlow exports the switch but not its query; the query lives in tensorflow.python.
    from tensorflow.python.framework import config as tf_config
    from bmvae_tf.trainers.training import loop

    during = []
    real_run = loop.Controller.run

    def recording_run(self):
        during.append((tf_config.is_op_determinism_enabled(), keras.config.dtype_policy().name,
                       self.trainer.model.encoders[0].dtype_policy.compute_dtype,
                       {w.dtype for w in self.trainer.model.weights}))
        return real_run(self)

    monkeypatch.setattr(loop.Controller, "run", recording_run)
    state = lambda: (tf_config.is_op_determinism_enabled(), keras.config.dtype_policy().name)
    was_deterministic = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()  # an earlier test may have left it on
    try:
        assert state() == (False, "float32")
        train.train(_config(dataset, epochs=1, deterministic=True, mixed_precision=True),
                    str(tmp_path / "first"))
        assert state() == (False, "float32")
        train.train(_config(dataset, epochs=1), str(tmp_path / "second"))
        assert state() == (False, "float32")
        with pytest.raises(config_lib.UserError, match="batch_size"):
            train.train(_config(dataset, batch_size=4096, deterministic=True, mixed_precision=True),
                        str(tmp_path / "failed"))
        assert state() == (False, "float32")
        # A caller's own setting stands through a run that does not ask for determinism.
        tf_config.enable_op_determinism()
        train.train(_config(dataset, epochs=1), str(tmp_path / "third"))
        assert state() == (True, "float32")
    finally:
        (tf_config.enable_op_determinism if was_deterministic else tf_config.disable_op_determinism)()
    assert during == [(True, "mixed_float16", "float16", {"float32"}),
                      (False, "float32", "float32", {"float32"}),
                      (True, "float32", "float32", {"float32"})]


def test_progress_is_logged_with_rates(dataset, tmp_path, caplog):
    workdir = tmp_path / "run"
    with caplog.at_level("INFO", logger="bmvae.train"):
        train.train(_config(dataset, epochs=1, log_every_steps=4), str(workdir))
    progress = _read_jsonl(workdir / "progress.jsonl")
    assert [p["step"] for p in progress] == [4, 8, 12]
    assert all(p["steps_per_second"] > 0 and p["examples_per_second"] == pytest.approx(
        16 * p["steps_per_second"]) for p in progress)
    assert any("steps/s" in r.message and "examples/s" in r.message for r in caplog.records)


def test_progress_bar_on_a_terminal_shows_loss_and_rates(dataset, tmp_path, monkeypatch, caplog):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with caplog.at_level("INFO", logger="bmvae.train"):
        train.train(_config(dataset, epochs=1, log_every_steps=1000), str(tmp_path / "run"))
    shown = terminal.getvalue()
    # 12 steps: the bar redraws itself ("\r" or backspaces) and ends at 12/12 with every figure.
    assert "12/12" in shown and all(k in shown for k in ("loss:", "steps/s:", "examples/s:"))
    assert not any(" step " in r.message and "steps/s" in r.message for r in caplog.records)
