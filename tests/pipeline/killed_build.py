"""A `bmvae data build` killed mid-way (SIGKILL to its driver: no handler of ours runs).

The driver is the CLI in a subprocess whose first train DoFn element announces that it has
started and then holds its worker until the test releases it, after the kill. Shared by the
DirectRunner test (test_killed_build.py) and the Dask ones (test_dask.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests import source_fixtures as fixtures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 240  # imports of Beam and TensorFlow on 2 busy cores

# The drivers: the CLI, with the build's first train DoFn element announcing that it has started
# and then holding its worker until the test releases it (after killing the driver).
_PREAMBLE = """
    import os, sys, time
    from bmvae_tf.trainers import cli

    started, release, source, out, *beam_args = sys.argv[1:]

    def hold():
        open(started, "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.2)
"""
_DRIVERS = {
    "mnist-svhn": _PREAMBLE + """
    from bmvae_tf.pipeline import build_mnist_svhn

    class BlockingShardFn(build_mnist_svhn.WritePairShardFn):
        def process(self, element):
            if tuple(element) == ("train", 0):
                hold()
            yield from super().process(element)

    build_mnist_svhn.WritePairShardFn = BlockingShardFn
    sys.exit(cli.main(["data", "build", "mnist-svhn", "--source-dir", source, "--output", out,
                       "--dm", "2", "--num-shards", "2", "--", *beam_args]))
""",
    "digits": _PREAMBLE + """
    from bmvae_tf.pipeline import build_digits

    class BlockingRenderFn(build_digits.RenderPairFn):
        def process(self, pair):
            if pair.split == "train" and pair.index == 0:
                hold()
            yield from super().process(pair)

    build_digits.RenderPairFn = BlockingRenderFn
    sys.exit(cli.main(["data", "build", "digits", "--output", out, "--dm", "1", "--", *beam_args]))
""",
}


def kill_mid_build(tmp_path, beam_args: list[str], dataset: str = "mnist-svhn") -> str:
    """Starts the build of `dataset` ("mnist-svhn" from small raw files, or the embedded
    "digits"), SIGKILLs its driver once a worker holds the first train element, then releases
    that worker and waits for the driver's other processes (its SDK workers) to end (killing them
    after 30 s). Returns the output directory."""
    source, out = str(tmp_path / "raw"), str(tmp_path / "out")
    if dataset == "mnist-svhn":
        fixtures.write_raw_source(source)
    script, started, release = tmp_path / "driver.py", tmp_path / "started", tmp_path / "release"
    script.write_text(textwrap.dedent(_DRIVERS[dataset]))
    driver = subprocess.Popen([sys.executable, str(script), str(started), str(release), source, out, *beam_args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not started.exists():
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the build never reached a worker"
            time.sleep(0.2)
        driver.kill()
        driver.wait(60)
    finally:
        release.touch()
        _end_process_group(driver.pid, grace_s=30)
        driver.stdout.close()
    return out


def _end_process_group(pgid: int, grace_s: float) -> None:
    """Waits for every process of the driver's session to exit, then kills what is left."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
