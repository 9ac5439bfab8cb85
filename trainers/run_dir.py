"""The run directory RUN/: where its files live, and loading a trained model back from it."""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib


# RUN/checkpoints/best holds the best validation epoch's weights when early stopping is on.
BEST = "best"


@dataclasses.dataclass(frozen=True)
class RunPaths:
    root: str

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.yaml")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    @property
    def history(self) -> str:
        return os.path.join(self.root, "history.jsonl")

    @property
    def progress(self) -> str:
        """One JSON line per `train.log_every_steps` steps: step, loss, steps and examples per second."""
        return os.path.join(self.root, "progress.jsonl")

    @property
    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.json")

    @property
    def plots(self) -> str:
        return os.path.join(self.root, "plots")

    @property
    def classifiers(self) -> str:
        return os.path.join(self.root, "classifiers")


def read_config(paths: RunPaths) -> config_lib.Config:
    if not tf.io.gfile.exists(paths.config):
        raise UserError(f"{paths.config}: not found; is {paths.root!r} a run made by `bmvae train`?")
    return config_lib.from_dict(config_lib.load_yaml(paths.config), source=paths.config)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (history.jsonl, progress.jsonl); none if it is absent."""
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def read_history(paths: RunPaths) -> list[dict]:
    """RUN/history.jsonl: one record per finished epoch."""
    return read_jsonl(paths.history)


def dummy_inputs(manifest: schema.Manifest, batch: int = 1) -> dict:
    """Zeros of every modality's shape and dtype, to build a model's variables."""
    return {m.name: tf.zeros([batch, *m.shape], tf.int64 if m.dtype == "int64" else tf.float32)
            for m in manifest.modalities}


def build_variables(model, manifest: schema.Manifest) -> None:
    """Create every variable of `model` (Keras builds layers lazily on first call)."""
    model(dummy_inputs(manifest))
    model.generate(tf.zeros([1, model.latent_dim]))


def model_checkpoint(model, **objects) -> tf.train.Checkpoint:
    """A checkpoint of every variable of `model`, by position in `model.weights`, plus `objects`.

    Keras 3 keeps sub-layers in wrapped lists that tf.train.Checkpoint does not follow, so
    `tf.train.Checkpoint(model=model)` would silently save only the top-level weights. Positions
    are fixed by the architecture, which the run's config pins down; a mismatch fails on restore.
    """
    return tf.train.Checkpoint(model_weights=list(model.weights), **objects)


def load_trained_model(workdir: str, data_dir: str | None = None):
    """(config, manifest, model) with the latest checkpoint's weights restored."""
    paths = RunPaths(workdir)
    config = read_config(paths)
    manifest = schema.read_manifest(data_dir or config.data.dir)
    model = config_lib.build_model(config.model, manifest.modalities)
    build_variables(model, manifest)
    # With early stopping the best validation epoch is the model; else the last one.
    best = (tf.train.latest_checkpoint(os.path.join(paths.checkpoints, BEST))
            if config.train.early_stopping_patience else None)
    latest = best or tf.train.latest_checkpoint(paths.checkpoints)
    if latest is None:
        raise UserError(f"{paths.checkpoints}: no checkpoint; train the run first")
    status = model_checkpoint(model).restore(latest).expect_partial()  # the optimizer is not needed
    status.assert_existing_objects_matched()
    return config, manifest, model
