"""Shared pytest set-up: quiet TensorFlow logs and seeded tiny models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
