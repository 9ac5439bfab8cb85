"""bench/full_size_build.py: its source writers write what the pipeline's readers read (MNIST IDX
gz, SVHN MAT 5 with digit 0 stored as 10) with the real class frequencies, and its sampler stops
a build that outgrows its memory cap."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import full_size_build as fsb  # noqa: E402
from bmvae_tf.pipeline import sources  # noqa: E402

FULL = {("mnist", "train"): 60000, ("mnist", "test"): 10000, ("svhn", "train"): 73257, ("svhn", "test"): 26032}
SCALE = 0.01


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("sources"))
    return directory, fsb.write_sources(directory, scale=SCALE, seed=3)


def test_full_size_counts_are_the_published_ones():
    for key, total in FULL.items():
        assert sum(fsb.COUNTS[key]) == total
        assert fsb.scaled_counts(fsb.COUNTS[key], 1.0) == list(fsb.COUNTS[key])
    assert fsb.scaled_counts([5923, 3, 0], 0.001) == [6, 1, 1]  # every class keeps an image


def test_the_pipeline_reads_the_written_sources_with_the_class_frequencies(written):
    directory, labels = written
    source = sources.RawSource(directory)
    record = source.validate()  # every file read whole, structure and lengths checked
    for (dataset, split), counts in fsb.COUNTS.items():
        expected = fsb.scaled_counts(counts, SCALE)
        read = source.labels(dataset, split)
        assert np.bincount(read, minlength=10).tolist() == expected
        assert record["counts"][f"{dataset}/{split}"] == sum(expected)
        np.testing.assert_array_equal(read, labels[f"{dataset}/{split}"])
        images = np.concatenate([x for _, x, _ in source.iter_images(dataset, split)])
        assert images.shape == (sum(expected), *sources.IMAGE_SHAPES[dataset])
        # the pixels show the class: each image is nearest to its own class's mean image
        means = np.stack([images[read == c].mean(0) for c in range(10)]).reshape(10, -1)
        flat = images.reshape(len(images), -1).astype(np.float64)
        nearest = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        assert np.mean(nearest == read) > 0.99


def test_svhn_mat_is_matlab_format_with_ten_for_zero(written, tmp_path):
    directory, labels = written
    for split in ("train", "test"):
        mat = scipy.io.loadmat(os.path.join(directory, fsb.SVHN_FILES[split]))
        y = labels[f"svhn/{split}"]
        np.testing.assert_array_equal(mat["y"][:, 0], np.where(y == 0, 10, y))
        assert mat["X"].shape == (32, 32, 3, len(y)) and mat["X"].dtype == np.uint8
        ours = np.concatenate([x for _, x, _ in sources.RawSource(directory).iter_images("svhn", split)])
        np.testing.assert_array_equal(mat["X"], ours.transpose(1, 2, 3, 0))
    # uncompressed, too, and in chunks smaller than the file
    y = fsb.draw_labels([3, 1, 2, 0, 1, 1, 1, 1, 1, 1], seed=0)
    path = str(tmp_path / "plain.mat")
    fsb.write_svhn_mat(path, y, seed=5, compress=False)
    assert scipy.io.loadmat(path)["X"].shape == (32, 32, 3, 12)
    read = np.concatenate([x for _, x in sources.iter_mat_images(path, chunk=5)])
    np.testing.assert_array_equal(read, fsb.synthetic_images(y, (32, 32, 3), seed=5))
    np.testing.assert_array_equal(sources.read_mat_labels(path), y)


def test_images_do_not_depend_on_the_chunking():
    y = fsb.draw_labels([7] * 10, seed=1)
    whole = np.concatenate([x for _, x in fsb.image_chunks(y, "mnist", seed=2, chunk=70)])
    parts = np.concatenate([x for _, x in fsb.image_chunks(y, "mnist", seed=2, chunk=70)])
    np.testing.assert_array_equal(whole, parts)
    assert fsb.draw_labels([7] * 10, seed=1).tolist() == y.tolist()


def test_the_sampler_kills_a_process_over_its_cap():
    hog = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(400 << 20); x[::4096] = "
                            "b'1' * len(x[::4096]); time.sleep(60)"], start_new_session=True)
    with fsb.Sampler(hog.pid, {}, cap_mb=200, interval=0.1) as sampler:
        hog.wait(60)
    assert sampler.capped and hog.returncode == -9
    assert sampler.max_total_mb > 200 and sampler.peaks[hog.pid]["role"] == "driver"


def test_run_plan_and_the_summary_ratios():
    args = fsb.parse_args(["--datasets", "mnist-svhn,mnist-svhn-text", "--engines", "direct1,direct2",
                           "--rss-dm", "1"])
    assert fsb.plan_runs(args) == [
        ("direct1", "mnist-svhn", 30), ("direct1", "mnist-svhn", 1), ("direct2", "mnist-svhn", 30),
        ("direct2", "mnist-svhn", 1), ("direct1", "mnist-svhn-text", 20), ("direct1", "mnist-svhn-text", 1),
        ("direct2", "mnist-svhn-text", 20), ("direct2", "mnist-svhn-text", 1)]
    row = lambda engine, dm, wall, driver, workers: {
        "engine": engine, "dataset": "mnist-svhn", "dm": dm, "wall_s": wall,
        "driver_peak_rss_mb": driver, "worker_peak_rss_mb": workers}
    results = {"runs": [row("direct1", 30, 100.0, 1000.0, [900.0]), row("direct2", 30, 50.0, 1100.0, [800.0, 700.0]),
                        row("direct1", 1, 10.0, 500.0, [400.0]),
                        dict(row("direct2", 1, 9.0, 1.0, []), aborted="exit 1")]}
    fsb.summarize(results)
    assert results["speedup_2_over_1"] == {"mnist-svhn dm 30 direct2/direct1": 2.0}
    assert results["peak_rss_ratio_by_dm"] == {"direct1 mnist-svhn dm 30/dm 1": 2.0}
