"""tf.data reader: a manifest -> batched dicts of modality tensors, label and metadata.

Parsing follows bmvae_tf.schema.feature_spec, the same spec the Beam writers encode with.
Batches are parsed vectorised (tf.io.parse_example after batching), in parallel, and prefetched.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import TrainingStream


def check_shards(manifest: schema.Manifest, split: str) -> list[str]:
    """The split's shard paths, after checking that each exists (UserError names a missing one)."""
    paths = manifest.split_paths(split)
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise UserError(f"{path}: shard listed in {schema.manifest_path(manifest.directory)} "
                            f"is missing")
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
    dynamic_text_padding: re-draw the padding of the manifest's `text_padding` modality on every
        read (`redraw_text_padding`), keyed by (seed, batch number), so each epoch (a new seed in
        training) sees new paddings while a given seed reads the same batches.
    """

    shuffle: bool = False
    seed: int = 0
    shuffle_buffer: int = 10000
    repeat: bool = False
    drop_remainder: bool = False
    holdout: Holdout | None = None
    skip_batches: int = 0
    dynamic_text_padding: bool = False


def make_dataset(manifest: schema.Manifest, split: str, batch_size: int,
                 options: ReadOptions = ReadOptions(), *, take: int = 0,
                 input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Batches {modality: [B, *shape], "label": [B], metadata: [B, *shape]} of one split.

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
        records = records.shuffle(options.shuffle_buffer, seed=options.seed,
                                  reshuffle_each_iteration=True)
    if options.repeat:
        records = records.repeat()
    if options.skip_batches:
        records = records.skip(options.skip_batches * batch_size)
    batches = records.batch(batch_size, drop_remainder=options.drop_remainder)
    return _parse(manifest, batches, padding, options, input_context).prefetch(tf.data.AUTOTUNE)


def _records(manifest: schema.Manifest, split: str, options: ReadOptions,
             input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """The split's serialized records for this input pipeline, shards shuffled when asked, the
    holdout applied."""
    paths = check_shards(manifest, split)
    files = tf.data.Dataset.from_tensor_slices(paths)
    record_sharded = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(paths) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            record_sharded = True
    if options.shuffle:
        files = files.shuffle(len(paths), seed=options.seed)
    # Deterministic interleave keeps a seeded run reproducible; parallel reads still overlap.
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION),
        cycle_length=min(len(paths), 4), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if record_sharded:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    holdout = options.holdout
    if holdout is not None and holdout.fraction > 0:
        records = records.filter(lambda r: in_holdout(r, holdout.fraction) == holdout.held_out)
    return records


def _parse(manifest: schema.Manifest, batches: tf.data.Dataset, padding: dict | None,
           options: ReadOptions, input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """Serialized batches -> decoded batches; with a `padding` (`text_padding`), the text's
    padding re-drawn per batch."""
    spec = schema.feature_spec(manifest)
    if padding is None:
        return batches.map(
            lambda serialized: schema.decode_parsed(manifest, tf.io.parse_example(serialized, spec)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    base_seed = tf.constant([options.seed, TrainingStream.TEXT_PADDING], tf.int64)
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

