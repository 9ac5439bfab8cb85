"""The dataset cache (trainers/evaluation/dataset_cache.py) and the evaluation flow around it:
what depends on the data alone is computed by the first evaluation on a dataset and read by the
later ones, with metrics identical bit for bit; the plots drawn beside the metric stages."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from threadpoolctl import threadpool_info

from bmvae_tf import schema
from bmvae_tf.trainers.evaluation import classifiers as classifiers_lib
from bmvae_tf.trainers.evaluation import dataset_cache, robustness
from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
from bmvae_tf.trainers.reporting import plots
from tests import synthetic
from tests.trainers.test_evaluate import run  # noqa: F401  (the tiny trained run fixture)


def _copy_run(run_root: str, target: str) -> str:
    """A copy of the run as training left it: no classifiers, metrics, plots or report."""
    shutil.copytree(run_root, target, ignore=shutil.ignore_patterns(
        "classifiers", "metrics*.json", "plots", "report.html"))
    return target


def _cache_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_digest_is_the_content_of_the_dataset(tmp_path):
    a = synthetic.write_dataset(str(tmp_path / "a"), num_train=32, num_test=16, num_validation=0)
    b = synthetic.write_dataset(str(tmp_path / "b"), num_train=32, num_test=16, num_validation=0)
    other = synthetic.write_dataset(str(tmp_path / "c"), num_train=40, num_test=16, num_validation=0)
    # the same records elsewhere: the same digest; other records: another
    assert dataset_cache.dataset_digest(a) == dataset_cache.dataset_digest(b)
    assert dataset_cache.dataset_digest(a) != dataset_cache.dataset_digest(other)
    # a shard replaced under an unchanged manifest (a new directory: the digest of a path is kept
    # for the life of the process)
    shutil.copytree(tmp_path / "b", tmp_path / "d")
    shard = os.path.join(tmp_path / "d", b.splits["test"].files[0])
    with open(shard, "ab") as f:
        f.write(b"\0")
    assert dataset_cache.dataset_digest(schema.read_manifest(str(tmp_path / "d"))) != dataset_cache.dataset_digest(b)


def test_store_and_lookup_match_the_fingerprint_exactly(tmp_path, dataset_cache_dir, caplog):
    manifest = synthetic.write_dataset(str(tmp_path / "data"), num_train=16, num_test=8, num_validation=0)
    fingerprint = {"seed": 3, "levels": [0.0, 0.5]}
    assert dataset_cache.lookup(manifest, "kind", fingerprint) is None
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights")
    dataset_cache.store(manifest, "kind", fingerprint, {"accuracy": [0.25, 1 / 3]}, files={".bin": str(source)})
    assert dataset_cache.lookup(manifest, "kind", fingerprint) == {"accuracy": [0.25, 1 / 3]}  # floats exact
    with open(dataset_cache.entry_path(manifest, "kind", fingerprint, ".bin"), "rb") as f:
        assert f.read() == b"weights"
    assert dataset_cache.lookup(manifest, "kind", {"seed": 4, "levels": [0.0, 0.5]}) is None
    assert dataset_cache.lookup(manifest, "other kind", fingerprint) is None
    assert not [f for f in _cache_files(dataset_cache_dir) if ".tmp-" in f]

    # a damaged entry costs a recomputation, not an evaluation
    with open(dataset_cache.entry_path(manifest, "kind", fingerprint, ".json"), "w") as f:
        f.write('{"fingerprint": ')
    assert dataset_cache.lookup(manifest, "kind", fingerprint) is None
    assert "unreadable cache entry" in caplog.text


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, caplog):
    manifest = synthetic.write_dataset(str(tmp_path / "data"), num_train=16, num_test=8, num_validation=0)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv(dataset_cache.ENV_VAR, str(blocker / "cache"))
    dataset_cache.store(manifest, "kind", {"seed": 0}, 1.0)  # no exception
    assert "could not write the cache entry" in caplog.text and str(blocker) in caplog.text
    assert dataset_cache.lookup(manifest, "kind", {"seed": 0}) is None


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset_cache.ENV_VAR, str(tmp_path / "explicit"))
    assert dataset_cache.root() == str(tmp_path / "explicit")
    monkeypatch.delenv(dataset_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dataset_cache.root() == str(tmp_path / "xdg" / "bmvae")


def test_a_second_run_on_the_data_reads_the_cache_and_scores_identically(run, tmp_path, monkeypatch,  # noqa: F811
                                                                          dataset_cache_dir):
    _, paths = run
    first = evaluate_lib.evaluate(_copy_run(paths.root, str(tmp_path / "first")))
    stored = _cache_files(dataset_cache_dir)
    assert len([f for f in stored if f.endswith(".keras")]) == 3  # a classifier per modality
    assert len([f for f in stored if "robustness_baseline" in f]) == 1
    assert len([f for f in stored if "classifier_accuracy" in f]) == 1

    # the second evaluation on the same data trains no classifier, scores none on real data and
    # fits no baseline
    def refuse(*args, **kwargs):
        raise AssertionError("computed again despite the dataset cache")

    monkeypatch.setattr(classifiers_lib, "train_classifiers", refuse)
    monkeypatch.setattr(robustness, "fit_probes", refuse)
    monkeypatch.setattr(classifiers_lib, "accuracy", refuse)
    second_root = _copy_run(paths.root, str(tmp_path / "second"))
    second = evaluate_lib.evaluate(second_root)
    assert second == first  # bit for bit: the classifiers, their accuracy and the baseline's curves
    assert _cache_files(dataset_cache_dir) == stored
    # the run keeps its own copy of the classifiers, with their fingerprint
    for name in first["modalities"]:
        with open(os.path.join(second_root, "classifiers", f"{name}.json")) as f:
            assert json.load(f)["modality"] == name
        assert os.path.getsize(os.path.join(second_root, "classifiers", f"{name}.keras")) > 0


def test_shared_cache_off_reads_and_writes_nothing(run, tmp_path, monkeypatch, dataset_cache_dir):  # noqa: F811
    _, paths = run
    evaluate_lib.evaluate(_copy_run(paths.root, str(tmp_path / "first")))
    assert _cache_files(dataset_cache_dir)
    fresh = str(tmp_path / "fresh_cache")
    monkeypatch.setenv(dataset_cache.ENV_VAR, fresh)
    trained = []
    original = classifiers_lib.train_classifiers
    monkeypatch.setattr(classifiers_lib, "train_classifiers",
                        lambda *a, **k: trained.append(1) or original(*a, **k))
    evaluate_lib.evaluate(_copy_run(paths.root, str(tmp_path / "second")), overrides=["eval.shared_cache=false"])
    assert trained == [1] and not os.path.exists(fresh)


def test_a_plotting_error_fails_the_evaluation_and_the_thread_limits_are_restored(run, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    _, paths = run
    before = sorted((pool["internal_api"], pool["num_threads"]) for pool in threadpool_info())

    def broken(*args, **kwargs):
        raise RuntimeError("the figure could not be drawn")

    monkeypatch.setattr(plots, "write_plots", broken)
    root = _copy_run(paths.root, str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="could not be drawn"):
        evaluate_lib.evaluate(root)
    assert not os.path.exists(os.path.join(root, "metrics.json"))  # no record without its plots
    assert sorted((pool["internal_api"], pool["num_threads"]) for pool in threadpool_info()) == before
