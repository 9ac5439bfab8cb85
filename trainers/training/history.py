"""The run's records: RUN/history.jsonl (one line per epoch), RUN/progress.jsonl (one per
`train.log_every_steps` steps) and the epoch scalars in RUN/logs (TensorBoard; the other
summaries are `summaries.py`'s, through the same writer). Only the chief writes."""

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
        """{"epoch", "step", "loss", "val_loss", "seconds", "terms"[, "stopped_early"]}; loss and
        val_loss also go to TensorBoard at the epoch's last step, and each of "terms"
        ({"train/<metric>": epoch mean, "val/<metric>": validation mean} of the model's
        LossTerms.metrics) as `epoch/<key>`."""
        self.epochs.append(record)
        if not self.chief:
            return
        _write_jsonl(self.paths.history, self.epochs)
        with self.writer.as_default(step=record["step"]):
            tf.summary.scalar("loss", record["loss"])
            if record["val_loss"] is not None:
                tf.summary.scalar("val_loss", record["val_loss"])
            for key, value in record.get("terms", {}).items():
                tf.summary.scalar(f"epoch/{key}", value)
        self.writer.flush()
