"""Keras fit() (bmvae_tf/keras_fit.py): the custom loop's objective and keyed noise, callbacks,
MirroredStrategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import bmvae_tf
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.training import inputs
from tests import synthetic

ROOT = Path(__file__).resolve().parents[2]
TINY = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fit"))
    synthetic.write_dataset(directory, num_train=64, num_test=32)
    return directory


class StepLosses(keras.callbacks.Callback):
    """Each step's loss, recovered from Keras's running epoch mean."""

    def __init__(self):
        super().__init__()
        self.means: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))

    @property
    def losses(self) -> list[float]:
        m = self.means
        return [m[0]] + [(k + 1) * m[k] - k * m[k - 1] for k in range(1, len(m))]


@pytest.mark.parametrize("name", ["bmvae_m", pytest.param("mmvae", marks=pytest.mark.slow)])
def test_one_epoch_of_fit_follows_the_custom_loop(dataset, tmp_path, name):
    """Same seed, same initial weights, same batches: fit() and `bmvae train`'s loop take the same
    steps (losses per step, validation loss, final weights) within float tolerance."""
    config = config_lib.from_dict({
        "data": {"dir": dataset}, "model": {**TINY, "name": name, "K": 2},
        "train": {"epochs": 1, "batch_size": 16, "seed": 3, "log_every_steps": 1, "jit_compile": False}})
    workdir = str(tmp_path / "run")
    history = train.train(config, workdir)
    paths = run_dir.RunPaths(workdir)
    loop_losses = [p["loss"] for p in run_dir.read_jsonl(paths.progress)]
    _, manifest, trained = run_dir.load_trained_model(workdir)

    keras.utils.set_random_seed(3)  # as the Trainer does before building the model
    model = config_lib.build_model(config.model, manifest.modalities)
    model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate), seed=3)
    validation = inputs.choose_validation(manifest, config.train)
    steps = inputs.steps_per_epoch(manifest, validation, 16)
    epoch = inputs.epoch_dataset(tf.distribute.InputContext(), manifest, config, validation, 1, 0,
                                 steps, False)
    recorder = StepLosses()
    held_out = inputs.validation_dataset(manifest, validation, config.eval.batch_size)
    fitted = model.fit(epoch, epochs=1, verbose=0, callbacks=[recorder], validation_data=held_out)

    assert len(loop_losses) == steps == 4
    np.testing.assert_allclose(recorder.losses, loop_losses, rtol=1e-4)
    np.testing.assert_allclose(fitted.history["loss"][0], history[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(fitted.history["val_loss"][0], history[0]["val_loss"], rtol=1e-5)
    for mine, theirs in zip(model.weights, trained.weights):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-3, atol=1e-5, err_msg=mine.path)


def test_fit_noise_is_keyed_by_step_and_seed(dataset):
    """The noise of step n is (seed, n): with a zero learning rate, two models compiled with the
    same seed take the same steps, step 1 draws other noise than step 0, another seed others."""
    batch = next(iter(bmvae_tf.load_dataset(dataset, "train", 16)))
    losses = {}
    for label, seed in (("a", 0), ("b", 0), ("other", 1)):
        model = bmvae_tf.build_model("mmvae", dataset, seed=0, K=2, **TINY)
        model.compile(optimizer=keras.optimizers.SGD(0.0), seed=seed)
        losses[label] = []
        for _ in range(2):
            model.reset_metrics()
            losses[label].append(float(model.train_on_batch(batch, return_dict=True)["loss"]))
    assert losses["a"] == losses["b"]
    assert losses["a"][0] != losses["a"][1]
    assert losses["a"][0] != losses["other"][0]


def test_fit_and_evaluate_log_each_loss_term(dataset):
    """Beside the loss, fit() and evaluate() log every LossTerms.metrics key, averaged over the
    epoch's examples: evaluate's figure is the example-weighted mean of each batch's terms under
    that batch's noise (seed, batch index), a short last batch weighted by its size."""
    model = bmvae_tf.build_model("bmvae_m", dataset, seed=0, **TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), seed=5)
    test = bmvae_tf.load_dataset(dataset, "test", 24)  # 32 examples: batches of 24 and 8
    logs = model.evaluate(test, return_dict=True, verbose=0)

    expected, sizes = {}, []
    for index, batch in enumerate(test):
        inputs, present, noise, _, _ = model._keyed(batch, tf.constant([5, index], tf.int32))
        for name, value in model.loss_terms(inputs, noise, present=present).metrics.items():
            expected.setdefault(name, []).append(float(value))
        sizes.append(int(tf.shape(batch["label"])[0]))
    assert sizes == [24, 8]
    assert set(logs) == {"loss", *expected} and {"bound", "kl_mixture", "reconstruction"} <= set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(logs[name], np.average(values, weights=sizes), rtol=1e-5, err_msg=name)

    fitted = model.fit(bmvae_tf.load_dataset(dataset, "train", 16), validation_data=test, epochs=1, verbose=0)
    assert {*expected, *(f"val_{name}" for name in expected)} <= set(fitted.history)
    assert all(np.isfinite(fitted.history[name][0]) for name in expected)


def test_compile_refuses_a_loss(dataset):
    model = bmvae_tf.build_model("mvae", dataset, **TINY)
    with pytest.raises(ValueError, match="own objective"):
        model.compile(optimizer="adam", loss="mse")


@pytest.mark.slow
def test_standard_callbacks_work(dataset, tmp_path):
    """EarlyStopping on val_loss, ModelCheckpoint (weights and whole model), TensorBoard and
    BackupAndRestore, which resumes an interrupted fit at the epoch it reached."""
    train_data = bmvae_tf.load_dataset(dataset, "train", 16, shuffle=True)
    test_data = bmvae_tf.load_dataset(dataset, "test", 16)
    model = bmvae_tf.build_model("bmvae_m", dataset, seed=0, **TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    backup = str(tmp_path / "backup")
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), save_weights_only=True),
                 keras.callbacks.ModelCheckpoint(str(tmp_path / "model.keras")),
                 keras.callbacks.TensorBoard(str(tmp_path / "logs")),
                 keras.callbacks.BackupAndRestore(backup)]
    # min_delta beyond any change: EarlyStopping stops after the second epoch of five.
    history = model.fit(train_data, validation_data=test_data, epochs=5, verbose=0, callbacks=callbacks)
    assert len(history.history["loss"]) == 2 and all(np.isfinite(history.history["val_loss"]))
    assert os.path.getsize(tmp_path / "best.weights.h5") > 0 and os.path.getsize(tmp_path / "model.keras") > 0
    assert any(name.startswith("events") for _, _, files in os.walk(tmp_path / "logs") for name in files)

    restored = bmvae_tf.build_model("bmvae_m", dataset, seed=1, **TINY)
    restored.load_weights(str(tmp_path / "best.weights.h5"))
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # BackupAndRestore: interrupted after epoch 2 of 3, a new fit runs only epoch 3.
    resumable = bmvae_tf.build_model("mvae", dataset, seed=0, **TINY)
    resumable.compile(optimizer="adam")
    with pytest.raises(KeyboardInterrupt):
        resumable.fit(train_data, epochs=3, verbose=0,
                      callbacks=[keras.callbacks.BackupAndRestore(backup + "2"), Interrupt()])
    again = resumable.fit(train_data, epochs=3, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(backup + "2")])
    assert len(again.history["loss"]) == 1


_MIRRORED_FIT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import bmvae_tf
data_dir, out = sys.argv[1], sys.argv[2]
tiny = dict(latent_dim=4, hidden_units=[16], channels=[8, 8, 8], sequence_width=8)
results = {}
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for kind, strategy in (("default", tf.distribute.get_strategy()), ("mirrored", mirrored)):
    with strategy.scope():
        model = bmvae_tf.build_model("bmvae_m", data_dir, seed=0, **tiny)
        model.compile(optimizer=keras.optimizers.SGD(0.01), seed=5)
    data = bmvae_tf.load_dataset(data_dir, "train", 16, drop_remainder=True)
    val = bmvae_tf.load_dataset(data_dir, "test", 16, drop_remainder=True)
    history = model.fit(data, validation_data=val, epochs=2, verbose=0,
                        callbacks=[keras.callbacks.EarlyStopping(patience=3)])
    results[kind] = {"history": history.history, "replicas": strategy.num_replicas_in_sync,
                     "weights": [float(abs(w.numpy()).sum()) for w in model.trainable_weights]}
json.dump(results, open(out, "w"))
"""


@pytest.mark.slow
def test_fit_under_mirrored_strategy_matches_one_device(dataset, tmp_path):
    """Two logical CPUs, 8 + 8 examples of each global batch of 16: the same losses and weights
    as one device, because the noise is keyed by global row."""
    out = str(tmp_path / "out.json")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _MIRRORED_FIT, dataset, out], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.load(open(out))
    assert results["mirrored"]["replicas"] == 2
    one, two = results["default"], results["mirrored"]
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=1e-4)
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=1e-4)


@pytest.mark.slow
def test_every_model_of_the_zoo_fits(dataset):
    """compile + fit + evaluate for each registered model: a finite loss that falls on one batch."""
    from bmvae_tf.models import MODELS

    batch = next(iter(bmvae_tf.load_dataset(dataset, "train", 16)))
    for name in MODELS:
        model = bmvae_tf.build_model(name, dataset, seed=0, **TINY)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), seed=0)
        before = model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0, return_dict=True)["loss"]
        model.fit(tf.data.Dataset.from_tensors(batch).repeat(5), epochs=1, verbose=0)
        after = model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0, return_dict=True)["loss"]
        assert np.isfinite(after) and after < before, name
