"""Waiting for the peers of a multi-worker run, with a deadline.

A MultiWorkerMirroredStrategy worker blocks inside TensorFlow until every task of TF_CONFIG's
cluster has started; a peer that never starts would keep it waiting forever. `watch_peers` starts
a thread that checks which peers accept connections on their TF_CONFIG address (a task listens
once its strategy is made), logs the missing ones every `POLL_LOG_S` seconds, and when
`train.cluster_timeout_s` passes with some still missing, prints one line naming them and ends
the process with exit code 2 (TensorFlow's wait cannot be interrupted from Python). The OS
releases the run directory's lock with the process.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("bmvae.train")

POLL_LOG_S = 10.0


def peers(tf_config: dict) -> dict[str, str]:
    """{"worker 1": "host:port", ...}: every task of the cluster but this one."""
    me = (tf_config["task"]["type"], tf_config["task"]["index"])
    return {f"{kind} {i}": address
            for kind, addresses in tf_config["cluster"].items() if isinstance(addresses, list)
            for i, address in enumerate(addresses) if (kind, i) != me}


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def missing_peers(tasks: dict[str, str]) -> dict[str, str]:
    return {name: address for name, address in tasks.items() if not _listening(address)}


def watch_peers(train_config) -> threading.Thread | None:
    """For `train.strategy=multi_worker`, starts the watchdog thread (a daemon); else nothing."""
    if train_config.strategy != "multi_worker":
        return None
    from bmvae_tf.trainers.training.strategy import check_tf_config

    tasks = peers(check_tf_config(os.environ.get("TF_CONFIG")))
    if not tasks:
        return None
    thread = threading.Thread(target=_watch, args=(tasks, train_config.cluster_timeout_s),
                              name="bmvae-peers", daemon=True)
    thread.start()
    return thread


def _watch(tasks: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_log = -POLL_LOG_S  # the first missing peers are logged at once
    while True:
        missing = missing_peers(tasks)
        if not missing:
            return
        now = time.monotonic()
        if now >= deadline:
            names = ", ".join(f"{name} ({address})" for name, address in missing.items())
            print(f"bmvae: error: the multi-worker cluster did not start within "
                  f"train.cluster_timeout_s={timeout_s:g} s; missing: {names}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)
        if now - last_log >= POLL_LOG_S:
            log.info("waiting for %s of the cluster (%.0f s left)",
                     ", ".join(f"{n} ({a})" for n, a in missing.items()), deadline - now)
            last_log = now
        time.sleep(min(0.5, max(deadline - now, 0.01)))
