"""tf.data reader: a manifest -> batched dicts of modality tensors, label and metadata.

Parsing follows bmvae_tf.schema.feature_spec, the same spec the Beam writers encode with.
Batches are parsed vectorised (tf.io.parse_example after batching), in parallel, and prefetched.
"""

from __future__ import annotations

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError


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


def make_dataset(manifest: schema.Manifest, split: str, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, repeat: bool = False, drop_remainder: bool = False,
                 shuffle_buffer: int = 10000, input_context: tf.distribute.InputContext | None = None,
                 take: int = 0, holdout_fraction: float = 0.0, holdout: bool = False,
                 skip_batches: int = 0) -> tf.data.Dataset:
    """Batches {modality: [B, *shape], "label": [B], metadata: [B, *shape]} of one split.

    batch_size is per input pipeline (per replica when called from
    `distribute_datasets_from_function`). With an `input_context` the shards are divided between
    input pipelines when there are enough of them, else the records are.
    take: keep only the first `take` records (0 = all), for quick evaluations.
    holdout_fraction: with holdout=False drop that fraction of records (see `in_holdout`), with
        holdout=True keep only them: a validation set carved out of a split.
    skip_batches: start this many batches in, without parsing the skipped records (a
        mid-epoch resume replays the epoch's order up to where it stopped).
    """
    paths = check_shards(manifest, split)
    files = tf.data.Dataset.from_tensor_slices(paths)
    record_sharded = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if len(paths) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            record_sharded = True
    if shuffle:
        files = files.shuffle(len(paths), seed=seed)
    # Deterministic interleave keeps a seeded run reproducible; parallel reads still overlap.
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION),
        cycle_length=min(len(paths), 4), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if record_sharded:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if holdout_fraction > 0:
        records = records.filter(lambda r: in_holdout(r, holdout_fraction) == holdout)
    if take:
        records = records.take(take)
    if shuffle:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()
    if skip_batches:
        records = records.skip(skip_batches * batch_size)
    spec = schema.feature_spec(manifest)
    batches = records.batch(batch_size, drop_remainder=drop_remainder)
    batches = batches.map(lambda serialized: schema.decode_parsed(manifest, tf.io.parse_example(serialized, spec)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)

