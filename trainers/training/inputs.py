"""What the training loop reads: each epoch's batches and the validation set.

Each epoch's input order is a pure function of (seed, epoch), so a rerun replays the epoch up
to its checkpoint and continues from the exact step. The loop reads every epoch it trains from
one dataset (`epochs_dataset`), so the next epoch's reading starts before the current one ends.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline


# `bmvae data build` commands that rebuild a dataset of this name with a validation split.
_BUILT_IN = ("digits", "mnist-svhn", "mnist-svhn-text", "cub")


@dataclasses.dataclass(frozen=True)
class Validation:
    """Where validation examples come from: the `validation` split, or a held-out fraction of
    `train` (train.validation_fraction on a dataset without one). Never `test`."""

    split: str
    holdout_fraction: float = 0.0

    @property
    def description(self) -> str:
        if self.holdout_fraction:
            return f"{self.holdout_fraction:g} of the train split held out"
        return f"the {self.split} split"

    @property
    def selects(self) -> bool:
        """Whether the validation loss may select the model (early stopping, the best
        checkpoint): always, since validation never reads the test split."""
        return self.split != schema.TEST


def choose_validation(manifest: schema.Manifest, train_config: config_lib.TrainConfig) -> Validation:
    """The `validation` split when the dataset has it; else a held-out fraction of train when
    train.validation_fraction is set; else a UserError naming the command that rebuilds the
    dataset with a validation split. Training never reads the test split."""
    if schema.VALIDATION in manifest.splits:
        return Validation(schema.VALIDATION)
    if train_config.validation_fraction > 0:
        return Validation(schema.TRAIN, train_config.validation_fraction)
    raise UserError(f"{schema.manifest_path(manifest.directory)}: dataset {manifest.name!r} has no "
                    f"validation split (built before they existed); rebuild it with "
                    f"`{rebuild_command(manifest)}`, or set train.validation_fraction to hold out "
                    f"part of train")


def rebuild_command(manifest: schema.Manifest) -> str:
    """The `bmvae data build` command line that rebuilds the dataset in place, validation split
    included (options other than the output left at their defaults)."""
    if manifest.name in _BUILT_IN:
        return f"bmvae data build {manifest.name} --output {manifest.directory} --overwrite"
    return f"bmvae data build arrays --input FILE.npz --output {manifest.directory} --overwrite"


def splits_read(validation: Validation) -> tuple[str, ...]:
    """The splits training reads (and checks after a read error): train and its validation."""
    return tuple(dict.fromkeys((schema.TRAIN, validation.split)))


def steps_per_epoch(manifest: schema.Manifest, validation: Validation | None, global_batch: int) -> int:
    """Full global batches per epoch; a held-out fraction is taken out of the count (its exact
    size depends on record hashes, so this is the expected size; epochs repeat the data and
    take exactly this many steps)."""
    count = manifest.split("train").count
    if validation is not None and validation.split == schema.TRAIN:
        count = int(count * (1.0 - validation.holdout_fraction))
    return count // global_batch


def validation_dataset(manifest: schema.Manifest, validation: Validation,
                       batch_size: int) -> tf.data.Dataset:
    """The validation examples, once, in stored order."""
    holdout = input_pipeline.Holdout(validation.holdout_fraction, held_out=True)
    return input_pipeline.make_dataset(manifest, validation.split, batch_size,
                                       input_pipeline.ReadOptions(holdout=holdout))


def epoch_seed(seed: int, epoch):
    """The seed of epoch `epoch`'s order (an int, or an int64 tensor for a tensor epoch)."""
    return seed * 100003 + epoch


def epoch_dataset(ctx: tf.distribute.InputContext, manifest: schema.Manifest,
                  config: config_lib.Config, validation: Validation | None, epoch, done,
                  steps: int, dynamic_text_padding: bool) -> tf.data.Dataset:
    """Epoch `epoch`'s batches for one input pipeline, from global step `done` of the epoch on.

    The order is a pure function of (seed, epoch). Each pipeline feeds
    num_replicas / num_input_pipelines replicas, one batch each per step; the data repeat and
    every pipeline takes exactly `steps` steps' worth, so workers with unequal shards stay in
    lockstep. `epoch` and `done` may be int64 tensors (`epochs_dataset` maps over epochs): the
    batches are the same as for the same Python ints.
    """
    t = config.train
    per_pipeline = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    holdout = (input_pipeline.Holdout(validation.holdout_fraction, held_out=False)
               if validation is not None and validation.split == schema.TRAIN else None)
    options = input_pipeline.ReadOptions(
        shuffle=True, seed=epoch_seed(t.seed, epoch), shuffle_buffer=t.shuffle_buffer, repeat=True,
        drop_remainder=True, holdout=holdout, skip_batches=done * per_pipeline,
        dynamic_text_padding=dynamic_text_padding)
    dataset = input_pipeline.make_dataset(manifest, schema.TRAIN, ctx.get_per_replica_batch_size(t.batch_size),
                                          options, input_context=ctx)
    return dataset.take((steps - done) * per_pipeline)


# Examples read ahead of the step (in whole batches, at least 2). Reading runs this far ahead of
# the step, into the next epoch near an epoch's end: the next epoch's shards open and its
# shuffle buffer fills while the step trains on these (0.3-0.4 s of reading for digits' 10,000
# records; 4,096 examples are 32 steps of 128, 0.6 s at 7,000 examples/s).
PREFETCH_EXAMPLES = 4096


def epochs_dataset(ctx: tf.distribute.InputContext, manifest: schema.Manifest,
                   config: config_lib.Config, validation: Validation | None, first_epoch: int,
                   done: int, steps: int, dynamic_text_padding: bool) -> tf.data.Dataset:
    """Epochs `first_epoch` to train.epochs back to back, one input pipeline's batches: the
    first from global step `done` on, each one `epoch_dataset` of its epoch (the same batches,
    in the same order), so the loop takes `steps - done`, then `steps` per epoch from one
    iterator.

    One dataset over the epochs lets the next epoch start (its shards opened, its shuffle buffer
    filled) while the step still trains on the current epoch's last PREFETCH_EXAMPLES examples,
    instead of waiting for it at every epoch start. The epochs are read one after another
    (flat_map): one shuffle buffer at a time. (A parallel interleave of the epochs opens up to
    six of them at once, each with its buffers: 0.9 GB more on digits dm 20.)
    """
    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        skip = tf.where(tf.equal(epoch, first_epoch), tf.constant(done, tf.int64),
                        tf.constant(0, tf.int64))
        return epoch_dataset(ctx, manifest, config, validation, epoch, skip, steps,
                             dynamic_text_padding)

    batches = tf.data.Dataset.range(first_epoch, config.train.epochs + 1).flat_map(one_epoch)
    per_batch = ctx.get_per_replica_batch_size(config.train.batch_size)
    return batches.prefetch(max(2, PREFETCH_EXAMPLES // per_batch))
