"""Shared pytest set-up: quiet TensorFlow logs, and the one small Digits build tests share."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline import beam_io, build_digits  # noqa: E402


@pytest.fixture(scope="session")
def source() -> tuple[np.ndarray, np.ndarray]:
    """images [1797, 8, 8] in 0..16, labels [1797]."""
    return build_digits.load_source()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> beam_io.BuildResult:
    """Digits with dm=1 (1437 train / 360 test pairs), built once with the default runner."""
    return build_digits.run_digits_job(str(tmp_path_factory.mktemp("digits")), seed=0, dm=1)
