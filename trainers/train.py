"""The custom training loop: a per-replica step under `strategy.run`, checkpoints, history, logs.

The step is a single-replica view (as in Orbit / official.core): each replica computes its
examples' losses, sums them and divides by the GLOBAL batch size; global regularisers (the
mixture-weight KL) are divided by the replica count, so the all-reduced gradient equals the
single-device gradient of the mean objective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import keras
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from trainers import config as config_lib
from trainers import input_pipeline, run_dir, strategy as strategy_lib

log = logging.getLogger("bmvae.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainState:
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    epoch: tf.Variable
    checkpoint: tf.train.Checkpoint


def validation_split(manifest: schema.Manifest) -> str | None:
    """`validation` when the dataset has one, else `test` (monitoring only; never for selection
    of reported numbers)."""
    for name in ("validation", "test"):
        if name in manifest.splits:
            return name
    return None


def build_state(config: config_lib.Config, manifest: schema.Manifest,
                strategy: tf.distribute.Strategy) -> TrainState:
    """Model, optimizer and counters, created inside `strategy.scope()`.

    The optimizer is built before the first step: a Keras 3 optimizer first built inside a
    replica's tf.function fails under MirroredStrategy.
    """
    # Seeds the initial weights, so a run is reproducible from its config alone.
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        model = config_lib.build_model(config.model, manifest.modalities)
        run_dir.build_variables(model, manifest)
        optimizer = keras.optimizers.Adam(learning_rate=config.train.learning_rate,
                                          amsgrad=config.train.amsgrad)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = run_dir.model_checkpoint(model, optimizer=optimizer, step=step, epoch=epoch)
    return TrainState(model, optimizer, step, epoch, checkpoint)


def make_train_step(state: TrainState, strategy: tf.distribute.Strategy, global_batch: int,
                    seed: int):
    """A tf.function running one optimisation step on a distributed batch.

    Randomness is stateless: the step's seed is (seed, global step), read in the graph so the
    host never waits on the step counter; each replica folds in its replica id so replicas draw
    independent noise.
    """
    model, optimizer = state.model, state.optimizer
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch, seed):
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        replica_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int32))
        with tf.GradientTape() as tape:
            terms = model.loss_terms(batch, replica_seed)
            loss = tf.reduce_sum(terms.per_example) / global_batch + terms.global_term / replicas
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        step_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(state.step, tf.int32)])
        per_replica = strategy.run(replica_step, args=(batch, step_seed))
        state.step.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def make_eval_step(model):
    """Mean objective over a batch (per-example terms plus the global term)."""

    @tf.function
    def eval_step(batch, seed):
        terms = model.loss_terms(batch, seed)
        count = tf.cast(tf.shape(terms.per_example)[0], tf.float32)
        return tf.reduce_sum(terms.per_example) + count * terms.global_term, count

    return eval_step


def validation_loss(eval_step, manifest: schema.Manifest, split: str, batch_size: int, seed: int) -> float:
    """Mean objective over a split, with `eval_step` from make_eval_step (traced once per run)."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(input_pipeline.make_dataset(manifest, split, batch_size)):
        s, n = eval_step(batch, tf.constant([seed, i], tf.int32))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _write_history(paths: run_dir.RunPaths, history: list[dict]) -> None:
    schema.write_text_atomic(paths.history, "".join(json.dumps(h) + "\n" for h in history))


def resolve_config(workdir: str, data_dir: str | None, config_file: str | None,
                   overrides: list[str]) -> config_lib.Config:
    """The run's config: defaults < stored RUN/config.yaml (on resume) < --config < overrides.

    Rerunning an existing RUN resumes it; a different model section is refused, since the
    checkpoint would not fit it.
    """
    paths = run_dir.RunPaths(workdir)
    stored = run_dir.read_config(paths) if tf.io.gfile.exists(paths.config) else None
    data = config_lib.to_dict(stored) if stored is not None else {}
    if config_file:
        data = config_lib.merge(data, config_lib.load_yaml(config_file))
    data = config_lib.apply_overrides(data, overrides)
    if data_dir:
        data.setdefault("data", {})["dir"] = os.path.abspath(data_dir) if "://" not in data_dir else data_dir
    config = config_lib.from_dict(data, source=config_file or "--set")
    if not config.data.dir:
        raise UserError("--data: a dataset directory is required")
    if stored is not None and stored.model != config.model:
        old, new = dataclasses.asdict(stored.model), dataclasses.asdict(config.model)
        key = next(k for k in old if old[k] != new[k])
        raise UserError(f"{paths.config}: this run was trained with model.{key}={old[key]!r}, "
                        f"not {new[key]!r}; use a new --workdir")
    return config


def train(config: config_lib.Config, workdir: str, *,
          strategy: tf.distribute.Strategy | None = None) -> list[dict]:
    """Trains (or resumes) the run in `workdir`; returns the whole history, one dict per epoch."""
    paths = run_dir.RunPaths(workdir)
    manifest = schema.read_manifest(config.data.dir)
    strategy = strategy or strategy_lib.make_strategy(config.train.strategy)
    chief = strategy_lib.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.train.batch_size
    if global_batch % replicas:
        raise UserError(f"train.batch_size={global_batch} is not divisible by the "
                        f"{replicas} replicas of the {type(strategy).__name__}")
    input_pipeline.check_shards(manifest, "train")
    if manifest.split("train").count < global_batch:
        raise UserError(f"train.batch_size={global_batch} exceeds the {manifest.split('train').count} "
                        f"training examples of {config.data.dir}")

    # Training re-draws text paddings when asked; validation and evaluation read the stored text.
    repad = input_pipeline.use_dynamic_text_padding(config.data.dynamic_text_padding, manifest)
    state = build_state(config, manifest, strategy)
    manager = tf.train.CheckpointManager(state.checkpoint, paths.checkpoints,
                                         max_to_keep=config.train.checkpoints_to_keep)
    if manager.latest_checkpoint:
        state.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        log.info("resumed %s at epoch %d, step %d", manager.latest_checkpoint,
                 int(state.epoch.numpy()), int(state.step.numpy()))
    start_epoch = int(state.epoch.numpy())
    # History lines past the checkpoint belong to work that was lost; drop them.
    history = [h for h in run_dir.read_history(paths) if h["epoch"] <= start_epoch]
    if chief:
        tf.io.gfile.makedirs(paths.root)
        schema.write_text_atomic(paths.config, config_lib.dump_yaml(config))
        _write_history(paths, history)
    writer = tf.summary.create_file_writer(paths.logs) if chief else tf.summary.create_noop_writer()

    seed = config.train.seed
    train_step = make_train_step(state, strategy, global_batch, seed)
    eval_step = make_eval_step(state.model)
    val_split = validation_split(manifest)
    for epoch in range(start_epoch + 1, config.train.epochs + 1):
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx, e=epoch: input_pipeline.make_dataset(
                manifest, "train", ctx.get_per_replica_batch_size(global_batch), shuffle=True,
                seed=seed * 100003 + e, drop_remainder=True,
                shuffle_buffer=config.train.shuffle_buffer, input_context=ctx,
                dynamic_text_padding=repad))
        started = time.perf_counter()
        interval_start, interval_steps = started, 0
        losses = []
        first_step = int(state.step.numpy())
        for batch in dataset:
            losses.append(train_step(batch))
            interval_steps += 1
            if interval_steps == config.train.log_every_steps:
                step = first_step + len(losses)
                recent = float(tf.reduce_mean(losses[-interval_steps:]))
                _check_finite(recent, epoch, step, manager)
                elapsed = time.perf_counter() - interval_start
                log.info("epoch %d step %d loss %.4f  %.1f steps/s  %.0f examples/s", epoch, step,
                         recent, interval_steps / elapsed, interval_steps * global_batch / elapsed)
                interval_start, interval_steps = time.perf_counter(), 0
        loss = float(tf.reduce_mean(losses)) if losses else float("nan")
        _check_finite(loss, epoch, int(state.step.numpy()), manager)
        seconds = time.perf_counter() - started
        val_loss = (validation_loss(eval_step, manifest, val_split, config.eval.batch_size, seed)
                    if val_split else None)
        state.epoch.assign(epoch)
        if chief:
            manager.save(checkpoint_number=state.step)
        record = {"epoch": epoch, "step": int(state.step.numpy()), "loss": loss,
                  "val_loss": val_loss, "seconds": seconds}
        history.append(record)
        if chief:
            _write_history(paths, history)
            with writer.as_default(step=int(state.step.numpy())):
                tf.summary.scalar("loss", loss)
                if val_loss is not None:
                    tf.summary.scalar("val_loss", val_loss)
            writer.flush()
        log.info("epoch %d/%d  loss %.4f  val_loss %s  %.1fs (%.0f examples/s)", epoch,
                 config.train.epochs, loss, "n/a" if val_loss is None else f"{val_loss:.4f}", seconds,
                 len(losses) * global_batch / max(seconds, 1e-9))
    if start_epoch >= config.train.epochs:
        log.info("%s is already trained for %d epochs", workdir, start_epoch)
    return history


def _check_finite(loss: float, epoch: int, step: int, manager: tf.train.CheckpointManager) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"loss is {loss} at epoch {epoch}, step {step}; training stopped. The last good "
            f"checkpoint is {manager.latest_checkpoint or 'none (no epoch finished)'}; lower "
            f"train.learning_rate or check the data")

