"""Waiting for the peers of a multi-worker run, with a deadline.

A MultiWorkerMirroredStrategy worker blocks inside TensorFlow, holding Python's interpreter lock,
until every task of TF_CONFIG's cluster has started; a peer that never starts would keep it
waiting forever, and no Python thread of the process can run meanwhile. So `waiting_for_peers`
starts a small watchdog process (standard library only) while the strategy is made. It checks
which peers accept connections on their TF_CONFIG address (a task listens once its strategy is
made), logs the missing ones every `LOG_EVERY_S` seconds, and when `train.cluster_timeout_s`
passes with some still missing, prints one line naming them and sends SIGINT to the worker.
During that window the worker's SIGINT action is the C library's `_exit`, called with the
signal's number, 2: the worker ends with exit code 2 at once, however TensorFlow is blocked (and
the OS releases the run directory's lock with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Iterator

log = logging.getLogger("bmvae.train")

LOG_EVERY_S = 10.0

# The watchdog: argv[1] = {"tasks": {name: "host:port"}, "timeout_s": T, "parent": PID}.
_WATCHDOG = r"""
import json, os, signal, socket, sys, time
spec = json.loads(sys.argv[1])
tasks, parent = spec["tasks"], spec["parent"]
def listening(address):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False
start = time.monotonic()
deadline, next_log = start + spec["timeout_s"], start
while os.getppid() == parent:
    missing = [f"{name} ({address})" for name, address in tasks.items() if not listening(address)]
    if not missing:
        sys.exit(0)
    now = time.monotonic()
    if now >= deadline:
        print(f"bmvae: error: the multi-worker cluster did not start within "
              f"train.cluster_timeout_s={spec['timeout_s']:g} s; missing: {', '.join(missing)}",
              file=sys.stderr, flush=True)
        os.kill(parent, signal.SIGINT)
        sys.exit(0)
    if now >= next_log:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO bmvae.train: waiting for "
              f"{', '.join(missing)} of the cluster ({deadline - now:.0f} s left)",
              file=sys.stderr, flush=True)
        next_log = now + spec["log_every_s"]
    time.sleep(0.5)
"""


def peers(tf_config: dict) -> dict[str, str]:
    """{"worker 1": "host:port", ...}: every task of the cluster but this one."""
    me = (tf_config["task"]["type"], tf_config["task"]["index"])
    return {f"{kind} {i}": address
            for kind, addresses in tf_config["cluster"].items() if isinstance(addresses, list)
            for i, address in enumerate(addresses) if (kind, i) != me}


@contextlib.contextmanager
def waiting_for_peers(train_config) -> Iterator[None]:
    """Around making the strategy: for `train.strategy=multi_worker`, ends the process with exit
    code 2 naming the missing peers if the cluster has not started within the timeout."""
    if train_config.strategy != "multi_worker":
        yield
        return
    from bmvae_tf.trainers.training.strategy import check_tf_config

    tasks = peers(check_tf_config(os.environ.get("TF_CONFIG")))
    if not tasks:
        yield
        return
    spec = {"tasks": tasks, "timeout_s": train_config.cluster_timeout_s, "parent": os.getpid(),
            "log_every_s": LOG_EVERY_S}
    previous = signal.getsignal(signal.SIGINT)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    libc.signal(signal.SIGINT, ctypes.cast(libc._exit, ctypes.c_void_p))  # SIGINT -> _exit(2)
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, json.dumps(spec)])
    try:
        yield
    finally:
        watchdog.terminate()
        watchdog.wait()
        signal.signal(signal.SIGINT, previous)  # Python's own handler again
