"""Process-wide TensorFlow and Keras settings, set for one run and restored after it.

Op determinism and Keras' global dtype policy belong to the process: a run that set them and
left them would change every later run, evaluation or test in the same process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
# TensorFlow 2.21 exports enable_op_determinism but neither its query nor its inverse.
from tensorflow.python.framework import config as tf_config

from bmvae_tf.trainers import config as config_lib

MIXED_PRECISION_POLICY = "mixed_float16"


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """Deterministic TensorFlow ops inside the block when `enabled`; otherwise the process's own
    setting stands (a caller that turned determinism on keeps it). Restored on exit, even when
    the block raises."""
    was_enabled = tf_config.is_op_determinism_enabled()
    try:
        if enabled:
            tf_config.enable_op_determinism()
        yield
    finally:
        if was_enabled:
            tf_config.enable_op_determinism()
        else:
            tf_config.disable_op_determinism()


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool) -> Iterator[None]:
    """Keras layers built inside the block compute in float16 with float32 variables when
    `mixed_precision` (layers take the policy when they are built; the maths outside them stays
    float32); otherwise the global policy stands. Restored on exit, even when the block raises."""
    previous = keras.config.dtype_policy()
    try:
        if mixed_precision:
            keras.config.set_dtype_policy(MIXED_PRECISION_POLICY)
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def run_settings(train_config: config_lib.TrainConfig) -> Iterator[None]:
    """`train.deterministic` and `train.mixed_precision` for the block (one training run)."""
    with op_determinism(train_config.deterministic), dtype_policy(train_config.mixed_precision):
        yield
