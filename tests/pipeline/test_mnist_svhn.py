"""MNIST-SVHN and MNIST-SVHN-Text: sources, pairing, text, the Beam job, and bad input."""

import glob
import gzip
import hashlib
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import scipy.io
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import beam_io, build_mnist_svhn, mnist_svhn, permutation, sources
from tests import source_fixtures as fixtures
from tests.source_fixtures import read_bytes, read_split
from bmvae_tf.trainers import config as config_lib

IN_PROCESS = ["--runner=FnApiRunner"]
DM = 3


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("raw"))
    fixtures.write_raw_source(directory)
    return directory


@pytest.fixture(scope="module")
def raw_labels(raw_dir) -> dict[str, np.ndarray]:
    source = sources.RawSource(raw_dir)
    return {f"{d}/{s}": source.labels(d, s) for d in sources.DATASETS for s in sources.SPLITS}


@pytest.fixture(scope="module")
def built_text(raw_dir, tmp_path_factory) -> beam_io.BuildResult:
    out = str(tmp_path_factory.mktemp("mst"))
    return build_mnist_svhn.run_mnist_svhn_job(out, with_text=True, source_dir=raw_dir, dm=DM, seed=0,
                                               beam_args=IN_PROCESS)


def copy_source(raw_dir: str, tmp_path) -> str:
    directory = str(tmp_path / "source")
    shutil.copytree(raw_dir, directory)
    return directory


# --------------------------------------------------------------------------------------------
# Pure pairing and text


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_index_is_a_keyed_bijection(size):
    x = np.arange(size)
    permuted = permutation.permute_index(x, size, (0, 0))
    assert sorted(permuted.tolist()) == list(range(size))
    if size >= 64:
        assert not np.array_equal(permuted, x)
        assert not np.array_equal(permuted, permutation.permute_index(x, size, (1, 0)))
        # Pieces of it give the same values as the whole: no list of all pairs is needed.
        assert np.array_equal(permutation.permute_index(x[10:20], size, (0, 0)), permuted[10:20])


def test_class_plans_and_expansion_follow_shi_et_al():
    mnist_labels = fixtures.shuffled_labels(fixtures.MNIST_TRAIN_COUNTS, 0)
    svhn_labels = fixtures.shuffled_labels(fixtures.SVHN_TRAIN_COUNTS, 1)
    plans = mnist_svhn.class_plans(mnist_labels, svhn_labels, split="train", dm=4, max_d=3)
    expected_n = [min(a, b, 3) for a, b in zip(fixtures.MNIST_TRAIN_COUNTS, fixtures.SVHN_TRAIN_COUNTS)]
    assert [p.label for p in plans] == [c for c in range(10) if expected_n[c]]
    total = 4 * sum(expected_n)
    indices = []
    for plan in plans:
        n = expected_n[plan.label]
        # The first n indices of the class, in index order, on each side.
        assert np.array_equal(plan.mnist, np.flatnonzero(mnist_labels == plan.label)[:n])
        assert np.array_equal(plan.svhn, np.flatnonzero(svhn_labels == plan.label)[:n])
        assert plan.total == total
        pairs = mnist_svhn.expand_plan(plan, dm=4, seed=0, with_text=True)
        assert len(pairs["index"]) == 4 * n
        # Each side is dm permutations: every paired index exactly dm times, in rounds of n.
        for side, first in (("mnist", plan.mnist), ("svhn", plan.svhn)):
            for r in range(4):
                assert sorted(pairs[side][r * n:(r + 1) * n]) == sorted(first)
        assert np.all(mnist_labels[pairs["mnist"]] == plan.label)
        assert np.all(svhn_labels[pairs["svhn"]] == plan.label)
        assert np.all((pairs["text_start"] >= 0) & (pairs["text_start"] <= mnist_svhn.max_text_start(plan.label)))
        indices.extend(pairs["index"].tolist())
    assert sorted(indices) == list(range(total))
    plan = next(p for p in plans if p.n >= 3)
    again = mnist_svhn.expand_plan(plan, dm=4, seed=0, with_text=False)
    assert np.array_equal(again["mnist"], mnist_svhn.expand_plan(plan, dm=4, seed=0, with_text=True)["mnist"])
    assert not np.array_equal(mnist_svhn.expand_plan(plan, dm=4, seed=1, with_text=False)["mnist"],
                              again["mnist"])


def test_text_tokens_round_trip_over_sutters_alphabet():
    assert len(mnist_svhn.VOCAB) == 71 and mnist_svhn.VOCAB[:26] == tuple("abcdefghijklmnopqrstuvwxyz")
    assert " " in mnist_svhn.VOCAB and "\n" in mnist_svhn.VOCAB
    for label, name in enumerate(mnist_svhn.CLASS_NAMES):
        assert mnist_svhn.max_text_start(label) == 8 - 1 - len(name)
        for start in range(mnist_svhn.max_text_start(label) + 1):
            text = mnist_svhn.decode_text(mnist_svhn.text_tokens(label, start))
            assert text == " " * start + name + " " * (8 - start - len(name))
            assert text.endswith(" ")  # the name never reaches the last position
        with pytest.raises(ValueError):
            mnist_svhn.text_tokens(label, mnist_svhn.max_text_start(label) + 1)


# --------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_streams_images_and_maps_label_10_to_0(tmp_path, compress):
    labels = np.array([0, 1, 9, 0, 5, 3, 0])
    images = fixtures.identity_images(labels, (32, 32, 3), seed=3)
    path = str(tmp_path / "x.mat")
    fixtures.write_svhn_mat(path, images, labels, compress=compress)
    assert scipy.io.loadmat(path)["y"].ravel().tolist() == [10, 1, 9, 10, 5, 3, 10]
    assert sources.read_mat_labels(path).tolist() == labels.tolist()
    chunks = list(sources.iter_mat_images(path, chunk=3))
    assert [start for start, _ in chunks] == [0, 3, 6]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), images)


def test_idx_reader_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    fixtures.write_idx(str(tmp_path / "i.gz"), images)
    fixtures.write_idx(str(tmp_path / "l.gz"), np.array([3, 1, 4, 1, 5]))
    assert sources.read_idx_labels(str(tmp_path / "l.gz")).tolist() == [3, 1, 4, 1, 5]
    read = np.concatenate([c for _, c in sources.iter_idx_images(str(tmp_path / "i.gz"), chunk=2)])
    assert np.array_equal(read[..., 0], images)


def test_tfds_source_reads_mnist_and_svhn_cropped():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = sources.TfdsSource("/nonexistent/tfds")
        labels = source.labels("svhn", "train")
        chunks = list(source.iter_images("svhn", "train", chunk=5))
        assert [len(i) for _, i, _ in chunks] == [5, 5, 2]
        assert np.array_equal(np.concatenate([lab for _, _, lab in chunks]), labels)
        assert chunks[0][1].shape[1:] == (32, 32, 3)
        assert source.validate()["datasets"]["mnist"]["counts"] == {"train": 12, "test": 12}


# --------------------------------------------------------------------------------------------
# The whole job


def test_build_writes_the_paper_manifest(built_text):
    manifest = schema.read_manifest(built_text.manifest.directory)
    assert manifest.name == "mnist-svhn-text"
    assert [(m.name, m.kind, m.shape, m.dtype, m.likelihood) for m in manifest.modalities] == [
        ("mnist", "image", (28, 28, 1), "uint8", "laplace"),
        ("svhn", "image", (32, 32, 3), "uint8", "laplace"),
        ("text", "sequence", (8,), "int64", "categorical")]
    weights = {m.name: m.likelihood_weight for m in manifest.modalities}
    assert weights == pytest.approx({"mnist": 3072 / 784, "svhn": 1.0, "text": 3072 / 8})
    assert manifest.modality("text").vocab == mnist_svhn.VOCAB
    assert manifest.label.names == mnist_svhn.CLASS_NAMES
    assert manifest.extras["text_padding"] == {"modality": "text", "space_token": mnist_svhn.SPACE_TOKEN,
                                               "length": 8, "start_metadata": "text_pad",
                                               "dynamic_default": True}
    assert dict(manifest.factors) == {"text_pad": "text"}  # the indices are identities, not factors
    assert (manifest.source["kind"], manifest.source["dm"], manifest.source["max_d"]) == ("raw", DM, 10000)
    assert set(manifest.source["files"]) == {
        *sources.MNIST_FILES["train"], *sources.MNIST_FILES["test"], *sources.SVHN_FILES.values()}


def split_pools(raw_labels, split: str) -> dict[str, np.ndarray]:
    """{dataset: the source indices `split` may pair}: validation holds out part of train."""
    source = mnist_svhn.SOURCE_SPLIT[split]
    pools = {}
    for dataset in sources.DATASETS:
        labels = raw_labels[f"{dataset}/{source}"]
        held = mnist_svhn.validation_indices(labels, schema.DEFAULT_VALIDATION_FRACTION, seed=0,
                                             dataset=dataset)
        pools[dataset] = {"test": np.arange(len(labels)), "validation": held,
                          "train": np.setdiff1d(np.arange(len(labels)), held)}[split]
    return pools


def test_validation_images_are_a_seeded_share_of_each_class_of_train():
    labels = fixtures.shuffled_labels((30, 5, 2, 1, 0, 10, 10, 10, 10, 10), 0)
    held = mnist_svhn.validation_indices(labels, 0.1, seed=0, dataset="mnist")
    assert [int(np.sum(labels[held] == c)) for c in range(10)] == [3, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    assert np.array_equal(held, mnist_svhn.validation_indices(labels, 0.1, seed=0, dataset="mnist"))
    assert not np.array_equal(held, mnist_svhn.validation_indices(labels, 0.1, seed=0, dataset="svhn"))
    assert not np.array_equal(held, mnist_svhn.validation_indices(labels, 0.1, seed=1, dataset="mnist"))


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_build_pairs_follow_the_rule_exactly(built_text, raw_labels, split):
    data = read_split(built_text.manifest, split)
    source = mnist_svhn.SOURCE_SPLIT[split]
    mnist_labels, svhn_labels = raw_labels[f"mnist/{source}"], raw_labels[f"svhn/{source}"]
    pools = split_pools(raw_labels, split)
    n = mnist_svhn.class_counts(mnist_labels, svhn_labels, 10000, pools)
    assert built_text.manifest.source["class_counts"][split] == n
    assert built_text.manifest.splits[split].count == len(data["label"]) == DM * sum(n)
    assert built_text.counters[f"{split}_records"] == DM * sum(n)
    mnist_index, mnist_label = fixtures.image_identity(data["mnist"])
    svhn_index, svhn_label = fixtures.image_identity(data["svhn"])
    # The images are the ones the metadata names, and every pair shares its label.
    assert np.array_equal(mnist_index, data["mnist_index"][:, 0])
    assert np.array_equal(svhn_index, data["svhn_index"][:, 0])
    assert np.array_equal(mnist_label, data["label"]) and np.array_equal(svhn_label, data["label"])
    assert np.array_equal(mnist_labels[mnist_index], data["label"])
    assert np.array_equal(svhn_labels[svhn_index], data["label"])
    for c in range(10):
        in_class = data["label"] == c
        assert in_class.sum() == DM * n[c]
        # First-n rule: exactly the first n_c indices of the class, each dm times.
        for index, labels, pool in ((mnist_index, mnist_labels, pools["mnist"]),
                                    (svhn_index, svhn_labels, pools["svhn"])):
            values, counts = np.unique(index[in_class], return_counts=True)
            assert values.tolist() == pool[labels[pool] == c][:n[c]].tolist()
            assert set(counts.tolist()) <= {DM}
    # Pixel values are x / 255 of the source bytes.
    assert np.all(np.isclose(data["mnist"] * 255, np.round(data["mnist"] * 255), atol=1e-4))


# sha256 of the test shard `built_text` wrote before validation splits existed (commit 65e420f):
# holding validation images out of train must not change a test byte.
TEST_SHARD_SHA256_BEFORE_VALIDATION = "cf77f7a813818160ad356f3ec5f259bd39d905cfc877b8443793fb032663a984"


def test_the_test_split_is_byte_identical_to_the_two_split_build(built_text):
    shard = read_bytes(built_text.manifest.directory)[schema.shard_name("test", 0, 1)]
    assert hashlib.sha256(shard).hexdigest() == TEST_SHARD_SHA256_BEFORE_VALIDATION


def test_build_texts_decode_to_the_digit_name(built_text):
    data = read_split(built_text.manifest, "train")
    for tokens, label, pad in zip(data["text"], data["label"], data["text_pad"][:, 0]):
        name = mnist_svhn.CLASS_NAMES[label]
        assert 0 <= pad <= 8 - 1 - len(name)
        assert mnist_svhn.decode_text(tokens) == " " * int(pad) + name + " " * (8 - int(pad) - len(name))
    starts = {(int(label), int(pad)) for label, pad in zip(data["label"], data["text_pad"][:, 0])}
    assert len({s for label, s in starts if label == 1}) > 1  # the padding does vary


def test_rebuild_is_byte_identical_and_the_seed_matters(built_text, raw_dir, tmp_path):
    again = build_mnist_svhn.build_mnist_svhn(str(tmp_path / "a"), with_text=True, source_dir=raw_dir,
                                              dm=DM, seed=0, beam_args=IN_PROCESS)
    assert read_bytes(again.directory) == read_bytes(built_text.manifest.directory)
    other = build_mnist_svhn.build_mnist_svhn(str(tmp_path / "b"), with_text=True, source_dir=raw_dir,
                                              dm=DM, seed=1, beam_args=IN_PROCESS)
    name = schema.shard_name("train", 0, 1)
    assert read_bytes(other.directory)[name] != read_bytes(again.directory)[name]


def test_mnist_svhn_without_text_from_tfds(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        source = sources.TfdsSource(str(tmp_path / "tfds"))
        labels = {d: source.labels(d, "train") for d in sources.DATASETS}
        result = build_mnist_svhn.run_mnist_svhn_job(
            str(tmp_path / "out"), source="tfds", tfds_data_dir=str(tmp_path / "tfds"), dm=2,
            num_shards=3, beam_args=IN_PROCESS)
    manifest = result.manifest
    assert manifest.name == "mnist-svhn" and manifest.modality_names == ["mnist", "svhn"]
    assert "text_padding" not in manifest.extras and dict(manifest.factors) == {}
    assert manifest.splits["train"].count == 2 * sum(manifest.source["class_counts"]["train"])
    assert list(manifest.splits) == list(schema.SPLITS)
    assert len(manifest.splits["train"].files) == 3
    data = read_split(manifest, "train")
    assert np.array_equal(labels["mnist"][data["mnist_index"][:, 0].astype(int)], data["label"])
    assert np.array_equal(labels["svhn"][data["svhn_index"][:, 0].astype(int)], data["label"])
    assert manifest.source["kind"] == "tfds"
    assert manifest.source["datasets"]["svhn"]["name"] == "svhn_cropped"


@pytest.mark.slow  # each worker process imports TensorFlow
def test_two_worker_processes_write_the_same_records(built_text, raw_dir, tmp_path):
    manifest = build_mnist_svhn.build_mnist_svhn(
        str(tmp_path), with_text=True, source_dir=raw_dir, dm=DM, seed=0,
        beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    expected, written = read_bytes(built_text.manifest.directory), read_bytes(manifest.directory)
    assert written.keys() == expected.keys()
    for name in expected:
        if name != schema.MANIFEST_FILENAME:  # it records the differing Beam options
            assert written[name] == expected[name], name


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming the culprit, nothing written


def assert_refused(tmp_path, source_dir: str, match: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        build_mnist_svhn.build_mnist_svhn(str(out), source_dir=source_dir, dm=1, beam_args=IN_PROCESS,
                                          **kwargs)
    assert not out.exists()


def test_truncated_idx_file(raw_dir, tmp_path):
    directory = copy_source(raw_dir, tmp_path)
    path = os.path.join(directory, "train-images-idx3-ubyte.gz")
    data = gzip.decompress(open(path, "rb").read())
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])  # a valid gzip stream of a cut-off IDX file
    assert_refused(tmp_path, directory, "train-images-idx3-ubyte.gz: truncated")
    open(path, "wb").write(gzip.compress(data)[:-30])  # a cut-off gzip stream
    assert_refused(tmp_path, directory, "train-images-idx3-ubyte.gz: truncated")


def test_mat_file_without_x(raw_dir, tmp_path):
    directory = copy_source(raw_dir, tmp_path)
    path = os.path.join(directory, "test_32x32.mat")
    scipy.io.savemat(path, {"y": scipy.io.loadmat(path)["y"]})
    assert_refused(tmp_path, directory, r"test_32x32.mat: no variable 'X' \(has \['y'\]\)")


def test_truncated_mat_file(raw_dir, tmp_path):
    directory = copy_source(raw_dir, tmp_path)
    for name in ("train_32x32.mat", "test_32x32.mat"):  # compressed and not
        path = os.path.join(directory, name)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
        assert_refused(tmp_path, directory, f"{name}: truncated")
        open(path, "wb").write(data)


def test_labels_that_disagree_in_count_with_the_images(raw_dir, tmp_path):
    directory = copy_source(raw_dir, tmp_path)
    labels = fixtures.shuffled_labels(fixtures.MNIST_TEST_COUNTS, 2)[:-1]
    fixtures.write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"), labels)
    assert_refused(tmp_path, directory,
                   f"t10k-images-idx3-ubyte.gz: 15 images, but .*t10k-labels-idx1-ubyte.gz has {len(labels)} labels")
    directory2 = str(tmp_path / "svhn_bad")
    shutil.copytree(raw_dir, directory2)
    path = os.path.join(directory2, "test_32x32.mat")
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, {"X": mat["X"], "y": mat["y"][:-2]})
    assert_refused(tmp_path, directory2, "test_32x32.mat: 15 images, but .*test_32x32.mat has 13 labels")


def test_missing_and_foreign_files(raw_dir, tmp_path):
    directory = copy_source(raw_dir, tmp_path)
    os.remove(os.path.join(directory, "train_32x32.mat"))
    assert_refused(tmp_path, directory, "train_32x32.mat: file not found")
    open(os.path.join(directory, "train_32x32.mat"), "wb").write(b"not a matlab file" * 20)
    assert_refused(tmp_path, directory, "train_32x32.mat: not a MATLAB 5 MAT-file")
    assert_refused(tmp_path, str(tmp_path / "nowhere"), "nowhere: --source-dir is not a directory")
    assert_refused(tmp_path, raw_dir, "--source must be raw or tfds", source="csv")


def test_tfds_dataset_that_is_not_prepared(tmp_path):
    with pytest.raises(UserError, match="TFDS 'mnist'.*tfds build mnist"):
        build_mnist_svhn.build_mnist_svhn(str(tmp_path / "out"), source="tfds",
                                          tfds_data_dir=str(tmp_path / "empty"), beam_args=IN_PROCESS)
    assert not (tmp_path / "out").exists()


def test_output_dir_holding_another_dataset_is_refused_unless_overwrite(raw_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "digits"}))
    with pytest.raises(UserError, match=f"{out}: already holds dataset 'digits'.*--overwrite"):
        build_mnist_svhn.build_mnist_svhn(str(out), source_dir=raw_dir, dm=1, beam_args=IN_PROCESS)
    assert os.listdir(out) == ["manifest.json"]
    manifest = build_mnist_svhn.build_mnist_svhn(str(out), source_dir=raw_dir, dm=1, overwrite=True,
                                                 beam_args=IN_PROCESS)
    assert schema.read_manifest(str(out)).name == manifest.name == "mnist-svhn"


@pytest.mark.parametrize("kwargs, culprit", [
    ({"dm": 0}, "dm"), ({"max_d": 0}, "max_d"), ({"seed": -1}, "seed"), ({"num_shards": 0}, "num_shards"),
    ({"beam_args": ["--runner=NoSuchRunner"]}, "NoSuchRunner"),
])
def test_bad_arguments(raw_dir, tmp_path, kwargs, culprit):
    with pytest.raises(UserError, match=culprit):
        build_mnist_svhn.build_mnist_svhn(str(tmp_path / "out"), source_dir=raw_dir, **kwargs)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# The reader's dynamic text padding (trainers/input_pipeline.py)


def test_redraw_text_padding_moves_the_word_uniformly_within_range():
    from bmvae_tf.trainers import input_pipeline

    labels = np.repeat(np.arange(10), 400)
    stored = np.stack([mnist_svhn.text_tokens(c, 0) for c in labels])
    tokens, starts = input_pipeline.redraw_text_padding(tf.constant(stored), tf.constant([7, 1]),
                                                        mnist_svhn.SPACE_TOKEN)
    tokens, starts = tokens.numpy(), starts.numpy()
    for row, label, start in zip(tokens, labels, starts):
        assert np.array_equal(row, mnist_svhn.text_tokens(label, start))  # raises if out of range
    for c in range(10):
        counts = np.bincount(starts[labels == c], minlength=mnist_svhn.max_text_start(c) + 1)
        assert len(counts) == mnist_svhn.max_text_start(c) + 1
        expected = 400 / len(counts)
        # Every start drawn, each within 5 binomial standard deviations of uniform.
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (c, counts)
    # Texts stored at any start are moved as well, and the same seed gives the same padding.
    again, again_starts = input_pipeline.redraw_text_padding(tf.constant(tokens), tf.constant([8, 1]),
                                                             mnist_svhn.SPACE_TOKEN)
    for row, label, start in zip(again.numpy(), labels, again_starts.numpy()):
        assert np.array_equal(row, mnist_svhn.text_tokens(label, start))
    assert not np.array_equal(again_starts.numpy(), starts)
    repeat, _ = input_pipeline.redraw_text_padding(tf.constant(tokens), tf.constant([8, 1]),
                                                   mnist_svhn.SPACE_TOKEN)
    assert np.array_equal(repeat.numpy(), again.numpy())


def read_texts(manifest, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from bmvae_tf.trainers import input_pipeline

    batches = list(input_pipeline.make_dataset(manifest, "train", 16, input_pipeline.ReadOptions(**kwargs)).as_numpy_iterator())
    return tuple(np.concatenate([b[k] for b in batches]) for k in ("text", "label", "text_pad"))


def test_dynamic_padding_changes_across_reads_and_the_fixed_variant_is_stable(built_text):
    from bmvae_tf.trainers import input_pipeline

    manifest = built_text.manifest
    stored = read_split(manifest, "train")
    fixed = read_texts(manifest)
    assert np.array_equal(fixed[0], stored["text"]) and np.array_equal(read_texts(manifest)[0], fixed[0])
    epoch1 = read_texts(manifest, seed=1, dynamic_text_padding=True)
    assert np.array_equal(epoch1[0], read_texts(manifest, seed=1, dynamic_text_padding=True)[0])
    epoch2 = read_texts(manifest, seed=2, dynamic_text_padding=True)
    for texts, labels, pads in (epoch1, epoch2):
        assert np.array_equal(labels, stored["label"])
        assert all(np.array_equal(t, mnist_svhn.text_tokens(c, int(p))) for t, c, p in zip(texts, labels, pads[:, 0]))
    assert not np.array_equal(epoch1[0], fixed[0]) and not np.array_equal(epoch1[0], epoch2[0])
    assert input_pipeline.use_dynamic_text_padding(None, manifest) is True
    assert input_pipeline.use_dynamic_text_padding(False, manifest) is False


def test_dynamic_padding_keyed_by_a_tensor_seed_is_that_of_the_same_int(built_text):
    """The training loop's dataset over epochs gives each epoch's seed as a tensor."""
    import tensorflow as tf
    from bmvae_tf.trainers import input_pipeline

    manifest = built_text.manifest
    options = lambda seed: input_pipeline.ReadOptions(seed=seed, dynamic_text_padding=True, skip_batches=1)
    by_int = [b["text"] for b in input_pipeline.make_dataset(manifest, "train", 16, options(1)).as_numpy_iterator()]
    by_tensor = tf.data.Dataset.from_tensors(tf.constant(1, tf.int64)).flat_map(
        lambda seed: input_pipeline.make_dataset(manifest, "train", 16, options(seed)))
    assert np.array_equal(np.concatenate([b["text"] for b in by_tensor.as_numpy_iterator()]),
                          np.concatenate(by_int))


def test_dynamic_padding_on_a_dataset_without_text_padding_is_refused(tmp_path):
    from tests.synthetic import write_dataset
    from bmvae_tf.trainers import input_pipeline

    manifest = write_dataset(str(tmp_path), num_train=8, num_test=8)
    assert input_pipeline.use_dynamic_text_padding(None, manifest) is False
    with pytest.raises(UserError, match="declares no text padding"):
        input_pipeline.use_dynamic_text_padding(True, manifest)


# --------------------------------------------------------------------------------------------
# Through the command line, and on to training with the paper's configs


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SHORT_EVAL = ["--set", "eval.classifier_epochs=1", "--set", "eval.random_samples=50",
              "--set", "eval.log_likelihood_samples=4", "--set", "eval.log_likelihood_examples=8",
              "--set", "eval.max_examples=256", "--set", "eval.robustness_noise_levels=[0,1]",
              "--set", "eval.robustness_baseline_examples=256"]


def test_cli_reports_a_bad_source_in_one_line(raw_dir, tmp_path, capsys):
    from bmvae_tf.trainers import cli

    directory = copy_source(raw_dir, tmp_path)
    open(os.path.join(directory, "t10k-images-idx3-ubyte.gz"), "wb").write(b"\x1f\x8b\x08garbage")
    code = cli.main(["data", "build", "mnist-svhn-text", "--source-dir", directory, "--output",
                     str(tmp_path / "out"), "--", *IN_PROCESS])
    # Log lines (the runner used) may come first; the error itself is one line, no traceback.
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ", line)]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("bmvae: error: ") and "t10k-images-idx3-ubyte.gz" in err[0]
    assert not (tmp_path / "out").exists()


# dm just large enough for one batch of the configs' size (13 paired train images per class side,
# once validation has held out its share): 128 for MNIST-SVHN, 256 for MNIST-SVHN-Text.
PAPER_DM = {"mnist-svhn": 10, "mnist-svhn-text": 20}
PAPER_CONFIGS = [(dataset, os.path.relpath(path, CONFIGS))
                 for dataset, folder in (("mnist-svhn", "mnist_svhn"), ("mnist-svhn-text", "mnist_svhn_text"))
                 for path in sorted(glob.glob(os.path.join(CONFIGS, folder, "*.yaml")))]


@pytest.fixture(scope="module")
def paper_data(raw_dir, tmp_path_factory):
    """Each dataset built once from the raw fixtures with the CLI, for every config's run."""
    from bmvae_tf.trainers import cli

    built = {}

    def build(dataset):
        if dataset not in built:
            data = str(tmp_path_factory.mktemp(dataset) / "data")
            assert cli.main(["data", "build", dataset, "--source-dir", raw_dir, "--output", data,
                             "--dm", str(PAPER_DM[dataset]), "--", *IN_PROCESS]) == 0
            built[dataset] = data
        return built[dataset]

    return build


@pytest.mark.slow  # 10-30 s each: the paper's full-size networks, batch and K on 2 CPU cores
@pytest.mark.parametrize("dataset, config", PAPER_CONFIGS, ids=[c for _, c in PAPER_CONFIGS])
def test_build_train_evaluate_with_the_paper_config(paper_data, tmp_path, dataset, config):
    from bmvae_tf.trainers import cli

    data, run = paper_data(dataset), str(tmp_path / "run")
    manifest = schema.read_manifest(data)
    assert manifest.splits["train"].count == PAPER_DM[dataset] * sum(manifest.source["class_counts"]["train"])
    assert cli.main(["train", "--data", data, "--workdir", run, "--config", os.path.join(CONFIGS, config),
                     "--epochs", "1", *SHORT_EVAL]) == 0
    assert cli.main(["evaluate", "--workdir", run]) == 0
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["dataset"] == dataset and metrics["modalities"] == manifest.modality_names
    assert metrics["model"] == config_lib.load_yaml(os.path.join(CONFIGS, config))["model"]["name"]
    assert len(metrics["latent_accuracy"]) == 2 ** len(manifest.modalities) - 1
    assert all(0.0 <= v <= 1.0 for v in metrics["latent_accuracy"].values())
    assert all(math.isfinite(v) for v in metrics["log_likelihood"].values())


def test_the_workers_cache_keeps_the_last_entries_and_pickles_empty():
    import pickle

    cache = build_mnist_svhn._LruCache(2)
    made = []
    for key in ["a", "b", "a", "c", "b"]:
        assert cache.get(key, lambda k=key: made.append(k) or k.upper()) == key.upper()
    assert made == ["a", "b", "c", "b"]  # "a" was a hit; "c" then pushed out "b", "b" pushed out "a"
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get("c", lambda: "new") == "new"  # nothing travels but the size
