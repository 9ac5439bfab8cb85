"""bench/evaluate.py: its timed worker runs `evaluate` itself (the same metrics as a plain call),
its stages add up to the evaluation's time, with a cold and with a warm dataset cache."""

import json
import os
import shutil
import sys

import pytest

from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
from tests.trainers.test_evaluate import run  # noqa: F401  (the tiny trained run fixture)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import evaluate as bench_evaluate  # noqa: E402


def test_worker_times_the_evaluation_stage_by_stage(run, tmp_path, dataset_cache_dir):  # noqa: F811
    _, paths = run
    expected_root = str(tmp_path / "plain")
    shutil.copytree(paths.root, expected_root, ignore=shutil.ignore_patterns("classifiers", "metrics.json", "plots"))
    expected = evaluate_lib.evaluate(expected_root)

    cold = bench_evaluate.timed_evaluation(paths.root, None, None, str(tmp_path / "cold"), cached=False)
    assert cold["metrics"] == expected  # the bench measures the product's evaluation, unchanged
    assert set(cold["seconds"]) == set(bench_evaluate.STAGE_ORDER)
    assert all(v >= 0 for v in cold["seconds"].values())
    assert sum(cold["seconds"].values()) == pytest.approx(cold["total"], rel=1e-9)
    # the cache the cold round filled is read by a warm one
    warm = bench_evaluate.timed_evaluation(paths.root, None, None, str(tmp_path / "cold"), cached=False,
                                           warm_cache=True)
    assert warm["metrics"] == expected
    assert os.listdir(os.path.join(tmp_path, "cold", "dataset_cache"))
    with open(os.path.join(tmp_path, "cold", "timing.json")) as f:
        assert json.load(f)["total"] == warm["total"]


def test_compare_metrics_names_every_difference():
    a = {"coherence": {"a|b": 0.5, "b|a": 0.25}, "curve": [1.0, 2.0], "n": 3}
    b = {"coherence": {"a|b": 0.5, "b|a": 0.3}, "curve": [1.0, 2.5], "extra": None, "n": 3}
    assert bench_evaluate.compare_metrics(a, a) == []
    assert bench_evaluate.compare_metrics(a, b) == ["coherence.b|a: 0.25 != 0.3", "curve[1]: 2.0 != 2.5"]
