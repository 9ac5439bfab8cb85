"""Fixtures shared by the pipeline tests: the sklearn source and one small Digits build."""

import numpy as np
import pytest

from pipeline import beam_io, build_digits


@pytest.fixture(scope="session")
def source() -> tuple[np.ndarray, np.ndarray]:
    """images [1797, 8, 8] in 0..16, labels [1797]."""
    return build_digits.load_source()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> beam_io.BuildResult:
    """Digits with dm=1 (1437 train / 360 test pairs), built once with the default runner."""
    return build_digits.run_digits_job(str(tmp_path_factory.mktemp("digits")), seed=0, dm=1)
