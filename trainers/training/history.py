"""The run's records: RUN/history.jsonl (one line per epoch), RUN/progress.jsonl (one per
`train.log_every_steps` steps) and the TensorBoard scalars in RUN/logs. Only the chief writes."""

from __future__ import annotations

import json

import tensorflow as tf

from bmvae_tf import atomic
from bmvae_tf.trainers import run_dir


def _write_jsonl(path: str, records: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class History:
    """The epoch and progress records of a run, resumed from its files.

    Records past the restored checkpoint (epochs after `finished_epochs`, steps after
    `restored_step`) belong to work that was lost; they are dropped and the files rewritten.
    """

    def __init__(self, paths: run_dir.RunPaths, chief: bool, *, finished_epochs: int,
                 restored_step: int):
        self.paths, self.chief = paths, chief
        self.epochs = [h for h in run_dir.read_history(paths) if h["epoch"] <= finished_epochs]
        self.progress = [p for p in run_dir.read_jsonl(paths.progress) if p["step"] <= restored_step]
        if chief:
            _write_jsonl(paths.history, self.epochs)
            _write_jsonl(paths.progress, self.progress)
        self.writer = tf.summary.create_file_writer(paths.logs) if chief else tf.summary.create_noop_writer()

    def add_progress(self, record: dict) -> None:
        """{"epoch", "step", "loss", "steps_per_second", "examples_per_second"}."""
        self.progress.append(record)
        if self.chief:
            _write_jsonl(self.paths.progress, self.progress)

    def add_epoch(self, record: dict) -> None:
        """{"epoch", "step", "loss", "val_loss", "seconds"[, "stopped_early"]}; loss and val_loss
        also go to TensorBoard at the epoch's last step."""
        self.epochs.append(record)
        if not self.chief:
            return
        _write_jsonl(self.paths.history, self.epochs)
        with self.writer.as_default(step=record["step"]):
            tf.summary.scalar("loss", record["loss"])
            if record["val_loss"] is not None:
                tf.summary.scalar("val_loss", record["val_loss"])
        self.writer.flush()
