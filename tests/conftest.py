"""Shared pytest set-up: quiet TensorFlow logs, and the one small Digits build tests share."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bmvae_tf.pipeline import beam_io, build_digits  # noqa: E402


@pytest.fixture(autouse=True)
def dataset_cache_dir(tmp_path_factory, monkeypatch) -> str:
    """Every test gets an empty dataset cache of its own (trainers/evaluation/dataset_cache.py),
    inherited by the CLI subprocesses it starts: no test reads what another stored, and none
    writes to the user's ~/.cache."""
    directory = str(tmp_path_factory.mktemp("dataset_cache"))
    monkeypatch.setenv("BMVAE_CACHE_DIR", directory)
    return directory


@pytest.fixture(scope="session")
def source() -> tuple[np.ndarray, np.ndarray]:
    """images [1797, 8, 8] in 0..16, labels [1797]."""
    return build_digits.load_source()


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> beam_io.BuildResult:
    """Digits with dm=1 (1293 train / 144 validation / 360 test pairs), built once with the
    default runner."""
    return build_digits.run_digits_job(str(tmp_path_factory.mktemp("digits")), seed=0, dm=1)


@pytest.fixture(scope="session")
def cub_built(tmp_path_factory):
    """The tiny CUB tree of tests/cub_tree.py built once (published split, image side 32, weights
    saved from ResNet101(weights=None), a small FastText hash table): (tree, weights, result)."""
    from bmvae_tf.pipeline import build_cub
    from tests import cub_tree

    root = tmp_path_factory.mktemp("cub")
    tree = cub_tree.write_tree(str(root / "raw"))
    weights = cub_tree.save_resnet_weights(str(root / "resnet101_notop.weights.h5"))
    result = build_cub.run_cub_job(
        str(root / "built"), cub_dir=tree.cub_dir, captions_dir=tree.captions_dir,
        resnet_weights=weights, image_size=32, batch_size=4, max_bad_fraction=0.2,
        fasttext_bucket=1000)
    return tree, weights, result
