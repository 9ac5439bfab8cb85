"""Progress within an epoch: a bar on a terminal, log lines otherwise.

Both show the epoch, the loss to 4 significant digits, a steady-state rate in steps and examples
per second and an ETA from that rate. The rate is measured from the end of the epoch's first
step on, so the tracing (and XLA compilation) of a run's first step is not in it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("bmvae.train")

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """0:07, 3:25, 1:02:09."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_loss(loss: float | None) -> str:
    """4 significant digits: 2913, 12.35, 0.001235 (a 2,900-nat loss has no useful decimals)."""
    return "n/a" if loss is None else f"{loss:.4g}"


class SteadyRate:
    """Steps per second from the end of the first timed step on (that step traces the graph)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.start_time: float | None = None
        self.start_done = 0

    def tick(self, done: int) -> None:
        """Called after every step; the first call starts the clock."""
        if self.start_time is None:
            self.start_time, self.start_done = self.clock(), done

    def rate(self, done: int) -> float | None:
        """Steps per second since the first tick; None until a step after it has finished."""
        if self.start_time is None or done <= self.start_done:
            return None
        return (done - self.start_done) / max(self.clock() - self.start_time, 1e-9)


class Progress:
    """A progress bar on a terminal (stdout), plain log lines otherwise (the logging handlers:
    stderr from the CLI).

    Progress records (progress.jsonl) keep their meaning: the rates since the previous update.
    """

    def __init__(self, steps: int, global_batch: int, epoch: int, epochs: int, done: int, *,
                 clock: Callable[[], float] = time.perf_counter, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.bar = self.stream if self.stream.isatty() else None
        self.steps, self.global_batch, self.epoch, self.epochs = steps, global_batch, epoch, epochs
        self.done = done
        self.clock = clock
        self.steady = SteadyRate(clock)
        self.started = clock()
        self.mark, self.mark_step = self.started, done
        self._width = 0
        self.final_rate: float | None = None

    def tick(self, done: int) -> None:
        """After every step (cheap: one clock read on the first)."""
        self.steady.tick(done)

    def update(self, done: int, step: int, loss: float | None) -> dict:
        """Shows the loss, the steady rates and the ETA; returns the progress record (rates since
        the last update)."""
        now = self.clock()
        rate = (done - self.mark_step) / max(now - self.mark, 1e-9)
        record = {"epoch": self.epoch, "step": step, "loss": loss, "steps_per_second": rate,
                  "examples_per_second": rate * self.global_batch}
        if self.bar is not None:
            self._draw(self.line(done, loss))
        else:
            log.info("%s", self.log_line(done, step, loss))
        self.mark, self.mark_step = now, done
        return record

    def finish(self, done: int, loss: float) -> None:
        """Closes the bar with the epoch's mean loss and its steady rates (kept in `final_rate`:
        steps/s, None for an epoch of a single step)."""
        self.final_rate = self.steady.rate(done)
        if self.bar is not None:
            self._draw(self.line(done, loss, elapsed=self.clock() - self.started))
            self.stream.write("\n")
            self.stream.flush()

    def log_line(self, done: int, step: int, loss: float | None) -> str:
        """`epoch 3/30 step 1320 loss 2913  12.3 steps/s  197 examples/s  120/400  ETA 0:23`."""
        rate = self.steady.rate(done)
        rates = ("-- steps/s  -- examples/s" if rate is None else
                 f"{rate:.3g} steps/s  {rate * self.global_batch:.4g} examples/s")
        eta = "" if rate is None else f"  ETA {format_duration((self.steps - done) / rate)}"
        return (f"epoch {self.epoch}/{self.epochs} step {step} loss {format_loss(loss)}  {rates}  "
                f"{done}/{self.steps}{eta}")

    def line(self, done: int, loss: float | None, *, elapsed: float | None = None) -> str:
        """The bar: `epoch 3/30  120/400  [=====>....]  loss: 2913  steps/s: 12.3  examples/s: 197
        ETA: 0:23`; after the epoch, its time instead of the ETA."""
        parts = [f"epoch {self.epoch}/{self.epochs}", f"{done}/{self.steps}"]
        filled = int(BAR_WIDTH * done / max(self.steps, 1))
        parts.append("[" + ("=" * filled + (">" if filled < BAR_WIDTH else "")).ljust(BAR_WIDTH, ".") + "]")
        parts.append(f"loss: {format_loss(loss)}")
        rate = self.steady.rate(done)
        if rate is None:
            parts.append("steps/s: -  examples/s: -")
        else:
            parts.append(f"steps/s: {rate:.3g}  examples/s: {rate * self.global_batch:.4g}")
        if elapsed is not None:
            parts.append(f"time: {format_duration(elapsed)}")
        elif rate is not None:
            parts.append(f"ETA: {format_duration((self.steps - done) / rate)}")
        return "  ".join(parts)

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
