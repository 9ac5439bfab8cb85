"""The run directory RUN/: where its files live, and loading a trained model back from it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import tensorflow as tf

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib

log = logging.getLogger("bmvae.run")

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
        """The scores of the test split (`bmvae evaluate`), the file reports and compare read."""
        return os.path.join(self.root, "metrics.json")

    def metrics_for(self, split: str) -> str:
        """Where `bmvae evaluate --split SPLIT` writes: metrics.json for test, and
        metrics-SPLIT.json otherwise, so that scoring validation (a search, a check) never
        replaces the test scores that reports and `bmvae compare` read."""
        return self.metrics if split == "test" else os.path.join(self.root, f"metrics-{split}.json")

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
    """The records of a JSON-lines file (history.jsonl, progress.jsonl); none if it is absent.

    A torn last line (a writer cut off mid-line) is dropped with a warning: the records before it
    stand, and training rewrites the file. Any other line that is not a JSON object is a UserError
    naming the file and line.
    """
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines):  # no newline after it: the last write was cut off
            log.warning("%s: ignoring its torn last line %d (%r)", path, number, line[:40])
        else:
            raise UserError(f"{path}: line {number} is not a JSON record ({line[:40]!r})")
    return records


def read_history(paths: RunPaths) -> list[dict]:
    """RUN/history.jsonl: one record per finished epoch."""
    return read_jsonl(paths.history)


def check_run_directory(workdir: str) -> None:
    """A run directory must be a directory (or not exist yet)."""
    if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
        raise UserError(f"{workdir}: is a file, not a run directory; choose another --workdir")


# Temporary publish files of other commands (evaluate, analyze) younger than this may belong to
# one still running beside the training; older ones are left over from a killed or failed writer.
STALE_AFTER_S = 600.0
# Files only training writes: their temporaries are always stale when a training starts.
_TRAINING_FILES = ("config.yaml", "history.jsonl", "progress.jsonl")


def remove_stale_temporaries(paths: RunPaths) -> list[str]:
    """Removes what killed or failed writers left in RUN: checkpoint `*_temp` directories and
    `<name>.tmp-<hex>` publish temporaries (those of other commands once STALE_AFTER_S old).
    Only the lock holder calls this. Returns the removed paths (each is logged)."""
    if not tf.io.gfile.isdir(paths.root):
        return []
    removed, now = [], time.time()
    for directory, subdirs, files in tf.io.gfile.walk(paths.root):
        in_checkpoints = directory.startswith(paths.checkpoints)
        for name in list(subdirs) + list(files):
            path = os.path.join(directory, name)
            stale = in_checkpoints and (name.endswith("_temp") or atomic.TEMP_MARKER in name)
            if not stale and atomic.TEMP_MARKER in name:
                stale = (name.split(atomic.TEMP_MARKER)[0] in _TRAINING_FILES
                         or now - tf.io.gfile.stat(path).mtime_nsec / 1e9 > STALE_AFTER_S)
            if stale:
                _remove_tree(path)
                removed.append(path)
                log.info("removed %s, left by a killed or failed writer", path)
    return removed


def _remove_tree(path: str) -> None:
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def dummy_inputs(manifest: schema.Manifest, batch: int = 1) -> dict:
    """Zeros of every modality's shape and dtype, to build a model's variables."""
    return {m.name: tf.zeros([batch, *m.shape], tf.int64 if m.dtype == "int64" else tf.float32)
            for m in manifest.modalities}


def build_variables(model, manifest: schema.Manifest) -> None:
    """Create every variable of `model` (Keras builds layers lazily on first call), after checking
    that each network keeps its contract (`MultimodalVAE.build_variables`)."""
    del manifest  # the model knows its modalities
    model.build_variables()


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
    directory = (os.path.join(paths.checkpoints, BEST) if config.train.early_stopping_patience
                 and tf.train.latest_checkpoint(os.path.join(paths.checkpoints, BEST)) else paths.checkpoints)
    # A training running beside us may delete the checkpoint we picked (it keeps the last few):
    # then the state file names a newer one, which we read instead.
    for attempt in range(5):
        latest = tf.train.latest_checkpoint(directory)
        if latest is None:
            raise UserError(f"{paths.checkpoints}: no checkpoint; train the run first")
        try:
            restore_checkpoint(model_checkpoint(model), latest, manifest, partial=True)
            return config, manifest, model
        except tf.errors.NotFoundError:
            if attempt == 4 or tf.train.latest_checkpoint(directory) == latest:
                raise
    raise AssertionError("unreachable")


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str, manifest: schema.Manifest, *,
                       partial: bool = False) -> None:
    """Restores `path` into `checkpoint`; a checkpoint that is damaged or made for another model
    or dataset is a UserError naming it. partial: only the model is needed, not the optimizer."""
    try:
        status = checkpoint.restore(path)
        if partial:
            status = status.expect_partial()
        status.assert_existing_objects_matched()
    except tf.errors.NotFoundError:
        raise
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError, IndexError) as e:
        # A truncated .data file: TensorFlow's reader raises IndexError("Read less bytes ...").
        raise UserError(f"{path}: the checkpoint is damaged ({_first_line(str(e))}); "
                        "was it cut off while being written or copied?") from None
    except (tf.errors.OpError, ValueError, AssertionError) as e:
        message = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise UserError(
            f"{path}: the checkpoint does not fit this model on {manifest.directory} (modalities "
            f"{[m.name for m in manifest.modalities]}); was the run trained on another dataset? "
            f"({_first_line(message)})") from None


def _first_line(message: str) -> str:
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "no details"
