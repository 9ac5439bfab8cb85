"""The non-finite guard: a NaN or Inf stops training before anything of it is saved.

Losses are read back in groups (at each log line, step checkpoint and epoch end), not at
every step: reading a loss makes the host wait for the device.
"""

from __future__ import annotations

import math
import tensorflow as tf

from bmvae_tf.trainers.training.trainer import Trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class NonFiniteGuard:
    """Checks the losses of `trainer`'s steps and its weights before each checkpoint."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._pending: list[tf.Tensor] = []

    def add(self, loss: tf.Tensor) -> None:
        """A step's loss, checked at the next `check_pending`."""
        self._pending.append(loss)

    def check_pending(self, epoch: int) -> float | None:
        """The mean of the losses added since the last check (None if there are none); raises
        TrainingDiverged if one is not finite."""
        if not self._pending:
            return None
        value = self.check(self._pending, epoch)
        self._pending = []
        return value

    def check_epoch(self, losses: list[tf.Tensor], epoch: int) -> None:
        """All of the epoch's `losses` (the pending ones are among them); raises
        TrainingDiverged if one is not finite."""
        if losses:
            self.check(losses, epoch)
        self._pending = []

    def check(self, losses: list[tf.Tensor], epoch: int) -> float:
        """The mean of `losses`; raises TrainingDiverged if one is not finite."""
        value = float(tf.reduce_mean(losses))
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} in epoch {epoch} at or before step {self.trainer.global_step}; "
                f"training stopped. The last good checkpoint is "
                f"{self.trainer.last_good_checkpoint}; lower train.learning_rate or check the data")
        return value

    def check_weights(self, step: int) -> None:
        """Raises TrainingDiverged if an update has made a weight non-finite: a step's loss is
        computed before its update, so a finite loss does not prove finite weights."""
        variables = self.trainer.model.trainable_variables
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
        if not bool(finite):
            raise TrainingDiverged(
                f"a weight became NaN or Inf by step {step}; training stopped. The last good "
                f"checkpoint is {self.trainer.last_good_checkpoint}; lower train.learning_rate or "
                f"check the data")
