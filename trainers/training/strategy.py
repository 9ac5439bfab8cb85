"""The tf.distribute strategy, made once at the entry point from `train.strategy`."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from bmvae_tf.errors import UserError


def make_strategy(name: str) -> tf.distribute.Strategy:
    """auto: MirroredStrategy with more than one GPU, else the default strategy.

    mirrored: MirroredStrategy over the local GPUs (or logical CPUs when no GPU is present).
    multi_worker: MultiWorkerMirroredStrategy configured from the TF_CONFIG environment variable.
    """
    if name == "multi_worker":
        # Before anything else touches the runtime: collectives are configured at start-up.
        check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        cpus = tf.config.list_logical_devices("CPU")
        devices = [d.name for d in gpus] or [d.name for d in cpus]
        if len(devices) < 2:
            found = "one GPU" if gpus else f"no GPU and {len(cpus)} CPU device"
            raise UserError(
                f"train.strategy=mirrored: this machine has {found}, so there is nothing to "
                "mirror over; use --strategy default, or --simulate-devices N to test mirrored "
                "training on the CPU")
        return tf.distribute.MirroredStrategy(devices=devices)
    raise UserError(f"train.strategy: unknown strategy {name!r}")


def check_tf_config(raw: str | None) -> dict:
    """TF_CONFIG must name a cluster with workers and this task's type and index."""
    if not raw:
        raise UserError("TF_CONFIG: multi_worker training needs the TF_CONFIG environment variable")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG: not valid JSON ({e})") from None
    cluster = value.get("cluster") if isinstance(value, dict) else None
    task = value.get("task") if isinstance(value, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise UserError("TF_CONFIG: needs a 'cluster' with a non-empty 'worker' list")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UserError("TF_CONFIG: needs a 'task' with 'type' and 'index'")
    index = task["index"]
    if isinstance(index, bool) or not isinstance(index, int):
        raise UserError(f"TF_CONFIG: task 'index' must be an integer, got {index!r}")
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not 0 <= index < len(members):
        raise UserError(f"TF_CONFIG: task {task} is not in the cluster")
    return value


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster; 0 otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None and resolver.task_id is not None else 0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes checkpoints, logs and metrics."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())
