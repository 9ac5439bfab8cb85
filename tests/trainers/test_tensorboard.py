"""TensorBoard in RUN/logs: the model's loss terms for train and validation, the learning rate,
the mixture weights as an image and histograms, the cross-generation and prior-sample images per
epoch, and the HParams session `bmvae evaluate` adds. Read back with TensorBoard's
EventAccumulator, as TensorBoard reads them."""

import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from tests import synthetic
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.training import summaries

TINY_MODEL = {"name": "bmvae_m", "latent_dim": 4, "hidden_units": [16], "channels": [8, 16],
              "sequence_width": 16}
TINY_EVAL = {"batch_size": 32, "classifier_epochs": 5, "random_samples": 32,
             "log_likelihood_samples": 4, "log_likelihood_examples": 16, "max_examples": 64,
             "robustness_noise_levels": [0.0, 1.0]}
TERMS = ("bound", "kl_mixture", "reconstruction")  # BMVAE_M's LossTerms.metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs of 4 steps of a tiny BMVAE_M, logged every 2 steps; validation on `validation`."""
    root = tmp_path_factory.mktemp("tensorboard")
    data_dir, workdir = str(root / "data"), str(root / "run")
    manifest = synthetic.write_dataset(data_dir, num_train=128, num_test=64)
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": TINY_MODEL, "eval": TINY_EVAL,
                                   "train": {"epochs": 2, "batch_size": 32, "log_every_steps": 2}})
    train.train(config, workdir)
    return manifest, workdir


def _events(workdir: str) -> EventAccumulator:
    accumulator = EventAccumulator(os.path.join(workdir, "logs"), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator


def _value(event) -> float:
    return float(tensor_util.make_ndarray(event.tensor_proto))


def _tags(accumulator: EventAccumulator, plugin: str) -> set[str]:
    return set(accumulator.PluginTagToContent(plugin))


def test_event_file_holds_terms_learning_rate_and_images(run):
    manifest, workdir = run
    events = _events(workdir)
    scalars = _tags(events, "scalars")
    for term in TERMS:
        assert {f"train/{term}", f"epoch/train/{term}", f"epoch/val/{term}"} <= scalars
    assert {"train/loss", "learning_rate", "loss", "val_loss"} <= scalars
    # Per log step (every 2 steps of 8) and per epoch.
    assert [e.step for e in events.Tensors("train/bound")] == [2, 4, 6, 8]
    assert [e.step for e in events.Tensors("epoch/val/bound")] == [4, 8]
    assert _value(events.Tensors("learning_rate")[0]) == pytest.approx(1e-3)

    assert {"mixture_weights", "cross_generation", "prior_samples"} <= _tags(events, "images")
    # train.images_every_epochs (5) exceeds the run's 2 epochs: pictures after the last one only.
    assert [e.step for e in events.Tensors("cross_generation")] == [8]
    assert {f"mixture_weights/{name}" for name in manifest.modality_names} <= _tags(events, "histograms")
    # An image summary holds [width, height, PNG]: a real picture, not an empty one.
    width, height, png = events.Tensors("prior_samples")[-1].tensor_proto.string_val
    assert int(width) > 50 and int(height) > 50 and png.startswith(b"\x89PNG")


@pytest.mark.parametrize("every, epochs, stopped_at, drawn", [
    (5, 12, None, [5, 10, 12]),  # every 5th epoch and the last
    (1, 3, None, [1, 2, 3]),
    (0, 4, None, [4]),           # 0: the last epoch only
    (5, 12, 7, [5, 7]),          # early stopping makes epoch 7 the last
])
def test_pictures_are_drawn_every_n_epochs_and_after_the_last(every, epochs, stopped_at, drawn):
    from types import SimpleNamespace
    from bmvae_tf.trainers.training import loop

    controller = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(
        images_every_epochs=every, epochs=epochs)), early_stopping=SimpleNamespace(stopped=False))
    seen = []
    for epoch in range(1, epochs + 1):
        controller.early_stopping.stopped = epoch == stopped_at
        if loop.Controller._draws_images(controller, epoch):
            seen.append(epoch)
        if controller.early_stopping.stopped:
            break
    assert seen == drawn


def test_history_records_the_epoch_means_of_the_terms(run):
    _, workdir = run
    history = run_dir.read_history(run_dir.RunPaths(workdir))
    for record in history:
        assert list(record)[:5] == ["epoch", "step", "loss", "val_loss", "seconds"]
        assert set(record["terms"]) == {f"{split}/{term}" for split in ("train", "val") for term in TERMS}
    assert all(isinstance(v, float) for v in history[-1]["terms"].values())
    # The same numbers as TensorBoard's epoch scalars.
    events = _events(workdir)
    assert _value(events.Tensors("epoch/val/bound")[-1]) == pytest.approx(
        history[-1]["terms"]["val/bound"])


def test_model_without_mixture_weights_has_no_mixture_images(tmp_path):
    data_dir = str(tmp_path / "data")
    synthetic.write_dataset(data_dir, num_train=64, num_test=32, num_modalities=2)
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": {**TINY_MODEL, "name": "mmvae"},
                                   "train": {"epochs": 1, "batch_size": 32, "log_every_steps": 1}})
    train.train(config, str(tmp_path / "run"))
    events = _events(str(tmp_path / "run"))
    assert {"cross_generation", "prior_samples"} <= _tags(events, "images")
    assert "mixture_weights" not in _tags(events, "images")
    assert {"train/bound", "train/reconstruction", "epoch/val/bound"} <= _tags(events, "scalars")


@pytest.mark.slow
def test_evaluate_writes_an_hparams_session(run):
    from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib

    _, workdir = run
    metrics = evaluate_lib.evaluate(workdir)
    events = _events(workdir)
    [content] = [c for tag, c in events.PluginTagToContent("hparams").items()
                 if tag.endswith("session_start_info")]
    session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert session.hparams["model.name"].string_value == "bmvae_m"
    assert session.hparams["model.latent_dim"].number_value == 4
    assert session.hparams["train.batch_size"].number_value == 32
    scalars = _tags(events, "scalars")
    assert "eval/random_coherence" in scalars
    assert {f"eval/latent_accuracy/{key}" for key in metrics["latent_accuracy"]} <= scalars
    [value] = events.Tensors("eval/random_coherence")
    assert value.step == 8 and _value(value) == pytest.approx(metrics["random_coherence"])


def test_hparam_values_flatten_the_config():
    assert summaries.hparam_values({"model": {"name": "x", "hidden_units": [1, 2], "K": None},
                                    "train": {"lr": 0.1, "amsgrad": True}}) == {
        "model.name": "x", "model.hidden_units": "[1, 2]", "model.K": "None", "train.lr": 0.1,
        "train.amsgrad": True}
    assert summaries.headline_metrics({"coherence": {"a|b": 0.5}, "random_coherence": None,
                                       "log_likelihood": {"a": -3.0, "b": None}}) == {
        "eval/coherence/a|b": 0.5, "eval/log_likelihood/a": -3.0}
