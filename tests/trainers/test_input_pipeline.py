"""The tf.data reader on a real Digits build: shapes, dtypes, value ranges, seeds, sharding."""

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.trainers import input_pipeline


def test_batches_have_the_manifest_shapes_dtypes_and_ranges(built):
    manifest = schema.read_manifest(built.manifest.directory)
    batch = next(iter(input_pipeline.make_dataset(manifest, "train", 32)))
    assert batch["digit"].shape == (32, 8, 8, 1) and batch["digit"].dtype == tf.float32
    assert batch["street"].shape == (32, 16, 16, 3) and batch["street"].dtype == tf.float32
    assert batch["text"].shape == (32, 8) and batch["text"].dtype == tf.int64
    assert batch["label"].shape == (32,) and batch["label"].dtype == tf.int64
    for key, shape in manifest.metadata_keys.items():
        assert batch[key].shape == (32, *shape)
    for name in ("digit", "street"):
        values = batch[name].numpy()
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.5
    vocab = manifest.modality("text").vocab
    assert batch["text"].numpy().min() >= 0 and batch["text"].numpy().max() < len(vocab)
    assert set(batch["label"].numpy()) <= set(range(10))


def test_whole_split_is_read_once(built):
    manifest = schema.read_manifest(built.manifest.directory)
    labels = np.concatenate([b["label"].numpy() for b in input_pipeline.make_dataset(manifest, "test", 128)])
    assert len(labels) == manifest.split("test").count == 360


def test_shuffle_is_seeded(built):
    manifest = schema.read_manifest(built.manifest.directory)

    def first_labels(seed):
        ds = input_pipeline.make_dataset(manifest, "train", 64, input_pipeline.ReadOptions(shuffle=True, seed=seed))
        return next(iter(ds))["label"].numpy()

    np.testing.assert_array_equal(first_labels(3), first_labels(3))
    assert not np.array_equal(first_labels(3), first_labels(4))


@pytest.mark.parametrize("global_seed", [0, 5])
def test_shuffle_with_a_tensor_seed_gives_the_order_of_the_same_int_seed(global_seed):
    tf.random.set_seed(global_seed)
    numbers = tf.data.Dataset.range(200)
    by_int = [int(x) for x in input_pipeline.shuffle(numbers, 50, 4)]
    # Traced inside a dataset function, where the seed is symbolic (the loop's epochs).
    by_tensor = tf.data.Dataset.range(4, 6).flat_map(lambda seed: input_pipeline.shuffle(numbers, 50, seed))
    by_tensor = [int(x) for x in by_tensor]
    assert by_tensor[:200] == by_int and sorted(by_int) == list(range(200)) and by_int != sorted(by_int)
    assert by_tensor[200:] == [int(x) for x in input_pipeline.shuffle(numbers, 50, 5)] != by_int


def test_input_context_shards_partition_the_records(built):
    manifest = schema.read_manifest(built.manifest.directory)

    def sources(pipeline_id):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
        ds = input_pipeline.make_dataset(manifest, "train", 100, input_context=ctx)
        return np.concatenate([b["digit_source"].numpy().ravel() * 1e4 + b["street_source"].numpy().ravel()
                               for b in ds])

    a, b = sources(0), sources(1)
    assert len(a) + len(b) == manifest.split("train").count
    assert abs(len(a) - len(b)) <= manifest.split("train").count // 2
    # Each record (a digit/street source pair; dm=1 makes them unique) goes to exactly one pipeline.
    assert len(set(a) & set(b)) == 0
