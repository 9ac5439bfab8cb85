"""tf.data reader: a manifest -> batched dicts of modality tensors, label, metadata and the mask
of present modalities (`schema.PRESENT_KEY`: bool [B, M], all True for a dataset without missing
rows).

Parsing follows bmvae_tf.schema.feature_spec, the same spec the Beam writers encode with.
Batches are parsed vectorised (tf.io.parse_example after batching), in parallel, and prefetched.

What is read is checked against the manifest: shard entries are plain names inside the dataset
directory (`check_shards`), and every pass over a shard asserts its record count (the manifest's
`shard_counts`; a split's total for manifests without them), so a mismatch stops the first epoch
instead of silently repeating or dropping records. tf.data reports such faults, and records that
do not parse or truncated files, as TensorFlow errors during iteration, without the shard's name:
iterate inside `reading(manifest)`, which finds the culprit and raises one schema.DataError
naming the shard, the record and the counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from typing import Iterator, Sequence

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import TrainingStream


logger = logging.getLogger(__name__)


def check_shards(manifest: schema.Manifest, split: str) -> list[str]:
    """The split's shard paths, after checking that each exists and lies inside the dataset
    directory (UserError names the entry); remote directories get the name checks only."""
    paths = manifest.split_paths(split)  # refuses entries that are not plain file names
    listed_in = schema.manifest_path(manifest.directory)
    local = "://" not in manifest.directory
    root = os.path.realpath(manifest.directory or ".")
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise UserError(f"{path}: shard listed in {listed_in} is missing")
        if local and os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise schema.SchemaError(f"{path}: shard listed in {listed_in} is a symlink that leads "
                                     f"out of the dataset directory (to {os.path.realpath(path)})")
    return paths


HOLDOUT_BUCKETS = 10_000


def in_holdout(serialized: tf.Tensor, fraction: float) -> tf.Tensor:
    """Whether a record belongs to the held-out validation fraction: a hash of its bytes, so the
    choice is the same whatever the sharding, the order or the number of input pipelines."""
    bucket = tf.strings.to_hash_bucket_fast(serialized, HOLDOUT_BUCKETS)
    return bucket < int(round(fraction * HOLDOUT_BUCKETS))


@dataclasses.dataclass(frozen=True)
class Holdout:
    """A validation set carved out of a split by record hash (see `in_holdout`).

    fraction: the share of records held out. held_out: read only those records (the validation
    set) when True, every other record (the training set) when False.
    """

    fraction: float
    held_out: bool


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How `make_dataset` reads a split beyond one plain pass in stored order.

    shuffle: a seeded order, shards then records (a buffer of `shuffle_buffer` records).
    seed: keys the shuffle and the re-drawn text paddings; a given seed reads the same batches.
    repeat: cycle through the records endlessly (the training loop takes a fixed number of steps).
    drop_remainder: only full batches.
    holdout: keep only, or drop, a hashed fraction of the records.
    skip_batches: start this many batches in, without parsing the skipped records (a mid-epoch
        resume replays the epoch's order up to where it stopped).
    seed and skip_batches may be int64 scalar tensors (the training loop's dataset over epochs
    makes each epoch's from the epoch number); they read the same batches as the same ints.
    dynamic_text_padding: re-draw the padding of the manifest's `text_padding` modality on every
        read (`redraw_text_padding`), keyed by (seed, batch number), so each epoch (a new seed in
        training) sees new paddings while a given seed reads the same batches.
    fully_observed: keep only the records in which every modality is present (evaluation
        scores these, `schema.Manifest.fully_observed_count` of them); nothing is dropped from a
        dataset without missing rows.
    """

    shuffle: bool = False
    seed: int = 0
    shuffle_buffer: int = 10000
    repeat: bool = False
    drop_remainder: bool = False
    holdout: Holdout | None = None
    skip_batches: int = 0
    dynamic_text_padding: bool = False
    fully_observed: bool = False


def make_dataset(manifest: schema.Manifest, split: str, batch_size: int,
                 options: ReadOptions = ReadOptions(), *, take: int = 0,
                 input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Batches {modality: [B, *shape], "label": [B], metadata: [B, *shape],
    "present": bool [B, M]} of one split. An absent modality's values are zeros.

    batch_size is per input pipeline (per replica when called from
    `distribute_datasets_from_function`). With an `input_context` the shards are divided between
    input pipelines when there are enough of them, else the records are.
    options: order, repetition, holdout and text re-padding (`ReadOptions`); the default reads
        the split once in stored order, as evaluation does.
    take: keep only the first `take` records (0 = all), for quick evaluations.
    """
    padding = text_padding(manifest) if options.dynamic_text_padding else None
    records = _records(manifest, split, options, input_context)
    if take:
        records = records.take(take)
    if options.shuffle:
        records = shuffle(records, options.shuffle_buffer, options.seed)
    if options.repeat:
        records = records.repeat()
    if _maybe_nonzero(options.skip_batches):
        records = records.skip(options.skip_batches * batch_size)
    batches = records.batch(batch_size, drop_remainder=options.drop_remainder)
    return _parse(manifest, batches, padding, options, input_context).prefetch(tf.data.AUTOTUNE)


_MAXINT32 = 2**31 - 1


def shuffle(dataset: tf.data.Dataset, buffer_size: int, seed) -> tf.data.Dataset:
    """`dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)`, `seed` an int
    or an int64 scalar tensor.

    Dataset.shuffle accepts a tensor seed, but the seed logic it shares with the random ops
    compares the (global seed, op seed) pair with (0, 0) in Python, which fails while tracing
    when the global seed is 0 (train.seed 0, the default) and the op seed is symbolic. For a
    tensor seed this builds the same op with the same two seeds that Dataset.shuffle would
    give it (tf.data's random_seed.get_seed), so the order is the one of the same int seed.
    """
    if not tf.is_tensor(seed):
        return dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    global_seed = tf.compat.v1.random.get_seed(1)[0]  # the graph's, as Dataset.shuffle reads it
    seed2 = tf.math.floormod(tf.cast(seed, tf.int64), _MAXINT32)
    if global_seed % _MAXINT32 == 0:
        seed2 = tf.where(tf.equal(seed2, 0), tf.constant(_MAXINT32, tf.int64), seed2)
    specs = tf.nest.flatten(dataset.element_spec)
    variant = tf.raw_ops.ShuffleDatasetV3(
        input_dataset=tf.data.experimental.to_variant(dataset),
        buffer_size=tf.constant(buffer_size, tf.int64),
        seed=tf.constant(global_seed % _MAXINT32, tf.int64), seed2=seed2,
        seed_generator=tf.raw_ops.DummySeedGenerator(), reshuffle_each_iteration=True,
        output_types=[s.dtype for s in specs], output_shapes=[s.shape for s in specs])
    return tf.data.experimental.from_variant(variant, dataset.element_spec)


def _maybe_nonzero(value) -> bool:
    """False only for a Python 0 (a tensor's value is known when the dataset runs)."""
    return tf.is_tensor(value) or bool(value)


def _records(manifest: schema.Manifest, split: str, options: ReadOptions,
             input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """The split's serialized records for this input pipeline, shards shuffled when asked, the
    holdout applied."""
    paths = check_shards(manifest, split)
    info = manifest.split(split)
    counts = info.shard_counts
    # -1: not recorded (manifests before shard_counts); the split's total is checked instead.
    files = tf.data.Dataset.from_tensor_slices(
        (paths, tf.constant(counts if counts is not None else [-1] * len(paths), tf.int64)))
    record_sharded = file_sharded = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(paths) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
            file_sharded = True
        else:
            record_sharded = True
    if options.shuffle:
        files = shuffle(files, len(paths), options.seed)
    # Deterministic interleave keeps a seeded run reproducible; parallel reads still overlap.
    records = files.interleave(
        lambda path, count: _shard_records(path, count, counts is not None),
        cycle_length=min(len(paths), 4), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if counts is None and not file_sharded:
        records = records.apply(tf.data.experimental.assert_cardinality(info.count))
    if record_sharded:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    holdout = options.holdout
    if holdout is not None and holdout.fraction > 0:
        records = records.filter(lambda r: in_holdout(r, holdout.fraction) == holdout.held_out)
    if options.fully_observed and manifest.has_missing_rows:
        records = records.filter(fully_observed_filter(manifest))
    return records


def fully_observed_filter(manifest: schema.Manifest):
    """serialized record -> whether every modality is present in it (parses only its mask)."""
    spec = {schema.PRESENT_KEY: tf.io.FixedLenFeature([len(manifest.modalities)], tf.int64)}
    return lambda serialized: tf.reduce_all(
        tf.not_equal(tf.io.parse_single_example(serialized, spec)[schema.PRESENT_KEY], 0))


def _shard_records(path: tf.Tensor, count: tf.Tensor, checked: bool) -> tf.data.Dataset:
    """One shard's records; with `checked`, a pass that finds more or fewer than `count` records
    fails (FailedPreconditionError, which `reading` turns into a DataError naming the shard)."""
    records = tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION)
    if checked:
        records = records.apply(tf.data.experimental.assert_cardinality(count))
    return records


# The errors tf.data raises for a shard that is not what its manifest says: corrupt or truncated
# data, a record that does not parse or reshape, a count that differs. (A record of random bytes
# can make TensorFlow's own error message undecodable: a UnicodeDecodeError.)
READ_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError,
               tf.errors.FailedPreconditionError, UnicodeDecodeError)


@contextlib.contextmanager
def reading(manifest: schema.Manifest, splits: Sequence[str] | None = None) -> Iterator[None]:
    """Turns a tf.data read error raised inside the block into one DataError naming the culprit.

    On such an error the shards of `splits` (default: every split) are read again, one by one,
    to find the first shard that is unreadable, holds a record that does not parse, or holds a
    number of records other than the manifest's; the error names it, the record index and both
    counts. An error that the shards do not explain is re-raised unchanged (a bug, not the data).
    """
    try:
        yield
    except READ_ERRORS as e:
        logger.info("a read error (%s); checking the shards of %s", type(e).__name__,
                    manifest.directory)
        problem = diagnose(manifest, splits)
        if problem is None:
            raise
        raise schema.DataError(problem) from None


def diagnose(manifest: schema.Manifest, splits: Sequence[str] | None = None) -> str | None:
    """The first problem found in the shards of `splits` (default: all), as one line, or None."""
    listed_in = schema.manifest_path(manifest.directory)
    for split in splits or sorted(manifest.splits):
        info = manifest.split(split)
        total = 0
        for i, path in enumerate(check_shards(manifest, split)):
            count, problem = _scan_shard(manifest, path)
            if problem is not None:
                return problem
            expected = info.shard_counts[i] if info.shard_counts is not None else None
            if expected is not None and count != expected:
                return f"{path}: holds {count} records, {listed_in} says {expected}"
            total += count
        if total != info.count:
            return (f"split {split!r}: its shards hold {total} records, {listed_in} says "
                    f"{info.count}")
    return None


def _scan_shard(manifest: schema.Manifest, path: str, batch_size: int = 1024
                ) -> tuple[int, str | None]:
    """(records in the shard, the first problem in it or None): reads and parses every record."""
    parse = _parse_function(manifest)
    count = 0
    records = tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION)
    try:
        for batch in records.batch(batch_size):
            try:
                parse(batch)
            except (tf.errors.InvalidArgumentError, ValueError):
                for i in range(int(batch.shape[0])):
                    try:
                        parse(batch[i:i + 1])
                    except (tf.errors.InvalidArgumentError, ValueError) as e:
                        return count + i, (f"{path}: record {count + i} does not match the manifest's "
                                           f"layout ({_first_line(e)})")
            count += int(batch.shape[0])
    except tf.errors.DataLossError as e:
        readable = sum(1 for _ in _readable(records.skip(count)))
        return count + readable, (f"{path}: unreadable after record {count + readable - 1} "
                                  f"(truncated or corrupt: {_first_line(e)})" if count + readable
                                  else f"{path}: unreadable (truncated or corrupt: {_first_line(e)})")
    return count, None


def _readable(records: tf.data.Dataset) -> Iterator[tf.Tensor]:
    """The records up to the first unreadable one."""
    iterator = iter(records)
    while True:
        try:
            yield next(iterator)
        except (StopIteration, tf.errors.DataLossError):
            return


def _first_line(error: Exception) -> str:
    """TensorFlow's message without its op decorations."""
    message = (getattr(error, "message", None) or str(error)).strip()
    message = message.splitlines()[0] if message else type(error).__name__
    for pattern in (r"\{\{function_node [^}]*\}\}\s*", r"\s*\[Op:[^\]]*\].*$", r"Name: <unknown>, ",
                    r", Index: \d+"):
        message = re.sub(pattern, "", message)
    return message.strip()


def _parse_function(manifest: schema.Manifest):
    spec = schema.feature_spec(manifest)
    return lambda serialized: schema.decode_parsed(manifest, tf.io.parse_example(serialized, spec))


def _parse(manifest: schema.Manifest, batches: tf.data.Dataset, padding: dict | None,
           options: ReadOptions, input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """Serialized batches -> decoded batches; with a `padding` (`text_padding`), the text's
    padding re-drawn per batch."""
    spec = schema.feature_spec(manifest)
    if padding is None:
        return batches.map(
            lambda serialized: schema.decode_parsed(manifest, tf.io.parse_example(serialized, spec)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    base_seed = tf.stack([tf.cast(options.seed, tf.int64),
                          tf.constant(TrainingStream.TEXT_PADDING, tf.int64)])
    if input_context is not None:
        base_seed = tf.random.experimental.stateless_fold_in(base_seed, input_context.input_pipeline_id)

    def parse_and_repad(number, serialized):
        batch = schema.decode_parsed(manifest, tf.io.parse_example(serialized, spec))
        batch_seed = tf.random.experimental.stateless_fold_in(base_seed, number)
        tokens, start = redraw_text_padding(batch[padding["modality"]], batch_seed,
                                            padding["space_token"])
        batch[padding["modality"]] = tokens
        if padding.get("start_metadata") in batch:
            batch[padding["start_metadata"]] = tf.cast(start, tf.float32)[:, None]
        return batch

    # Numbered from skip_batches, so a resumed epoch re-pads as the uninterrupted one did.
    return batches.enumerate(start=options.skip_batches).map(
        parse_and_repad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def text_padding(manifest: schema.Manifest) -> dict:
    """The manifest's `text_padding` entry (see pipeline.mnist_svhn.text_padding_spec)."""
    padding = manifest.extras.get("text_padding")
    if not isinstance(padding, dict) or padding.get("modality") not in manifest.modality_names:
        raise UserError(f"dataset {manifest.name!r} declares no text padding to re-draw; set "
                        "data.dynamic_text_padding to false")
    return padding


def use_dynamic_text_padding(setting: bool | None, manifest: schema.Manifest) -> bool:
    """data.dynamic_text_padding resolved: None means the dataset's default (on for MNIST-SVHN-Text)."""
    if setting is None:
        padding = manifest.extras.get("text_padding")
        return bool(isinstance(padding, dict) and padding.get("dynamic_default", False))
    if setting:
        text_padding(manifest)  # raises if the dataset has none
    return bool(setting)


def redraw_text_padding(tokens: tf.Tensor, seed: tf.Tensor, space_token: int
                        ) -> tuple[tf.Tensor, tf.Tensor]:
    """Moves each text's word to a uniformly drawn start, as Sutter et al. pad on every read.

    A text is one run of non-space tokens among spaces (MNIST-SVHN-Text's digit names). Its new
    start is uniform over [0, L - 1 - len(word)], the range the dataset was drawn from; texts
    that fill the sequence are left as they are.

    Args:
      tokens: [B, L] int64 token ids.
      seed: [2] int stateless seed.
      space_token: the id of the space.
    Returns:
      (tokens [B, L] int64, start [B] int64 of the word in the new tokens).
    """
    length = tf.shape(tokens)[1]
    is_word = tf.cast(tf.not_equal(tokens, space_token), tf.int32)
    word_length = tf.reduce_sum(is_word, axis=1)
    old_start = tf.argmax(is_word, axis=1, output_type=tf.int32)
    max_start = tf.maximum(length - 1 - word_length, 0)
    uniform = tf.random.stateless_uniform(tf.shape(word_length), seed)
    new_start = tf.minimum(tf.cast(tf.floor(uniform * tf.cast(max_start + 1, tf.float32)), tf.int32),
                           max_start)
    new_start = tf.where(word_length >= length, old_start, new_start)
    shift = new_start - tf.where(word_length > 0, old_start, new_start)
    # The word never wraps (it ends before the last position), so a per-row roll moves it.
    positions = tf.math.floormod(tf.range(length)[None, :] - shift[:, None], length)
    return tf.gather(tokens, positions, batch_dims=1), tf.cast(new_start, tf.int64)

