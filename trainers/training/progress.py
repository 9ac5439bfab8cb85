"""Progress within an epoch: a bar on a terminal, log lines otherwise; steps and examples per second."""

from __future__ import annotations

import logging
import sys
import time

import keras

log = logging.getLogger("bmvae.train")


class Progress:
    """A progress bar on a terminal, plain log lines otherwise; steps and examples per second.

    Keras' Progbar writes to stdout, so whether stdout is a terminal decides which; the log lines
    go to the logging handlers (stderr from the CLI).
    """

    def __init__(self, steps: int, global_batch: int, epoch: int, epochs: int, done: int):
        self.bar = (keras.utils.Progbar(steps, unit_name="step",
                                        stateful_metrics=("loss", "steps/s", "examples/s"))
                    if sys.stdout.isatty() else None)
        self.global_batch, self.epoch, self.epochs = global_batch, epoch, epochs
        self.done = done
        self.mark, self.mark_step = time.perf_counter(), done

    def update(self, done: int, step: int, loss: float) -> dict:
        """Shows the loss and the rates since the last update; returns them as a progress record."""
        elapsed = time.perf_counter() - self.mark
        rate = (done - self.mark_step) / max(elapsed, 1e-9)
        record = {"epoch": self.epoch, "step": step, "loss": loss, "steps_per_second": rate,
                  "examples_per_second": rate * self.global_batch}
        if self.bar is not None:
            self.bar.update(done, values=self._bar_values(loss, rate), finalize=False)
        else:
            log.info("epoch %d/%d step %d loss %.4f  %.1f steps/s  %.0f examples/s", self.epoch,
                     self.epochs, step, loss, rate, rate * self.global_batch)
        self.mark, self.mark_step = time.perf_counter(), done
        return record

    def finish(self, done: int, loss: float, seconds: float) -> None:
        """Closes the bar with the epoch's mean loss and its average rates."""
        if self.bar is not None:
            rate = (done - self.done) / max(seconds, 1e-9)
            self.bar.update(done, values=self._bar_values(loss, rate), finalize=True)

    def _bar_values(self, loss: float, rate: float) -> list:
        return [("loss", loss), ("steps/s", rate), ("examples/s", rate * self.global_batch)]
