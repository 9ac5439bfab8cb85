"""The progress bar and log lines: epoch, loss to 4 significant digits, a steady-state rate that
leaves out the first (tracing) step, and an ETA from that rate. A fake clock drives them."""

import io
import logging

from bmvae_tf.trainers.training.progress import Progress, format_duration, format_loss


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_loss_has_four_significant_digits():
    assert format_loss(2913.4567) == "2913"
    assert format_loss(12.34567) == "12.35"
    assert format_loss(0.0012345) == "0.001234" or format_loss(0.0012345) == "0.001235"
    assert format_loss(None) == "n/a"


def test_durations():
    assert format_duration(7.4) == "0:07"
    assert format_duration(205) == "3:25"
    assert format_duration(3729) == "1:02:09"


def test_rate_and_eta_leave_out_the_first_step():
    """The first step takes 30 s (tracing), the next ones 0.5 s each: the bar shows 2 steps/s,
    64 examples/s and an ETA of (100 - 11) / 2 s, not a rate diluted by the tracing."""
    clock, terminal = Clock(), Terminal()
    progress = Progress(100, 32, epoch=3, epochs=30, done=0, clock=clock, stream=terminal)
    clock.now += 30.0
    progress.tick(1)
    for done in range(2, 12):
        clock.now += 0.5
        progress.tick(done)
    record = progress.update(11, 11, 2913.4567)
    shown = terminal.getvalue()
    assert "epoch 3/30" in shown and "11/100" in shown
    assert "loss: 2913 " in shown
    assert "steps/s: 2 " in shown and "examples/s: 64 " in shown
    assert "ETA: 0:44" in shown  # 89 steps at 2 steps/s = 44.5 s
    # progress.jsonl keeps its meaning: the rate since the previous update, tracing included.
    assert record["steps_per_second"] == 11 / 35.0
    assert record["examples_per_second"] == 32 * 11 / 35.0


def test_finish_shows_the_epoch_time_and_keeps_the_steady_rate():
    clock, terminal = Clock(), Terminal()
    progress = Progress(4, 8, epoch=1, epochs=2, done=0, clock=clock, stream=terminal)
    for done in range(1, 5):
        clock.now += 10.0 if done == 1 else 1.0
        progress.tick(done)
    progress.finish(4, 1.23456)
    shown = terminal.getvalue()
    assert shown.endswith("\n") and "4/4" in shown and "time: 0:13" in shown and "loss: 1.235" in shown
    assert progress.final_rate == 1.0


def test_without_a_terminal_progress_goes_to_the_log(caplog):
    clock, stream = Clock(), io.StringIO()
    progress = Progress(10, 4, epoch=2, epochs=5, done=0, clock=clock, stream=stream)
    for done in range(1, 5):
        clock.now += 1.0
        progress.tick(done)
    with caplog.at_level(logging.INFO, logger="bmvae.train"):
        progress.update(4, 14, 0.5)
    assert stream.getvalue() == ""
    [message] = [r.getMessage() for r in caplog.records]
    assert message == "epoch 2/5 step 14 loss 0.5  1 steps/s  4 examples/s  4/10  ETA 0:06"
