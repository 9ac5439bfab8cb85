"""Early stopping on the validation loss. Its state lives in the trainer's checkpointed
variables, so a resumed run keeps counting where it stopped."""

from __future__ import annotations

import tensorflow as tf


class EarlyStopping:
    """Stops after `patience` epochs without a validation loss lower than the best by more than
    `min_delta`; patience 0 never stops (and never names a best epoch)."""

    def __init__(self, patience: int, min_delta: float, *, best_val_loss: tf.Variable,
                 bad_epochs: tf.Variable, stopped: tf.Variable):
        self.patience, self.min_delta = patience, min_delta
        self.best_val_loss, self.bad_epochs, self._stopped = best_val_loss, bad_epochs, stopped

    @property
    def stopped(self) -> bool:
        return bool(int(self._stopped.numpy()))

    @property
    def best(self) -> float:
        return float(self.best_val_loss.numpy())

    def update(self, val_loss: float | None) -> bool:
        """Tracks the best validation loss; returns whether this epoch is the new best."""
        if not self.patience or val_loss is None:
            return False
        if val_loss < self.best - self.min_delta:
            self.best_val_loss.assign(val_loss)
            self.bad_epochs.assign(0)
            return True
        self.bad_epochs.assign_add(1)
        if int(self.bad_epochs.numpy()) >= self.patience:
            self._stopped.assign(1)
        return False
