"""The custom training loop: a per-replica step under `strategy.run`, checkpoints, history, logs.

The step is a single-replica view (as in Orbit / official.core): each replica computes its
examples' losses, sums them and divides by the GLOBAL batch size; global regularisers (the
mixture-weight KL) are divided by the replica count, so the all-reduced gradient equals the
single-device gradient of the mean objective. Random draws are keyed by each example's row in
the global batch (bmvae_tf.noise), so a step on R replicas computes what one device would.

Fault tolerance: a checkpoint every `train.checkpoint_every_steps` steps and at each epoch's end
holds the weights, the optimizer, the step and the position in the epoch. Each epoch's input
order is a pure function of (seed, epoch), so a rerun replays the epoch up to the checkpoint
and continues from the exact step. A non-finite loss stops training before any checkpoint of
the diverged weights is written, and no checkpoint is written of weights that are not finite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time

import keras
import tensorflow as tf

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.noise import Noise
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir, strategy as strategy_lib

log = logging.getLogger("bmvae.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainState:
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable          # optimisation steps done
    epoch: tf.Variable         # epochs finished
    epoch_step: tf.Variable    # steps done in the unfinished epoch
    epoch_loss_sum: tf.Variable  # their summed losses, so a resumed epoch reports its whole mean
    best_val_loss: tf.Variable  # for early stopping
    bad_epochs: tf.Variable    # epochs since the best validation loss
    stopped: tf.Variable       # 1 once early stopping ended the run
    checkpoint: tf.train.Checkpoint


@dataclasses.dataclass(frozen=True)
class Validation:
    """Where validation examples come from: a split, or a held-out fraction of `train`."""

    split: str
    holdout_fraction: float = 0.0

    @property
    def description(self) -> str:
        if self.holdout_fraction:
            return f"{self.holdout_fraction:g} of the train split held out"
        return f"the {self.split} split"


def choose_validation(manifest: schema.Manifest, train_config: config_lib.TrainConfig) -> Validation | None:
    """`validation` when the dataset has it; else a held-out fraction of train when configured;
    else `test` for monitoring only. Early stopping never selects on the test split."""
    if "validation" in manifest.splits:
        return Validation("validation")
    if train_config.validation_fraction > 0:
        return Validation("train", train_config.validation_fraction)
    if train_config.early_stopping_patience:
        raise UserError(
            f"train.early_stopping_patience: {manifest.directory} has no validation split; set "
            f"train.validation_fraction (e.g. 0.1) to hold out part of the train split")
    return Validation("test") if "test" in manifest.splits else None


def build_state(config: config_lib.Config, manifest: schema.Manifest,
                strategy: tf.distribute.Strategy) -> TrainState:
    """Model, optimizer and counters, created inside `strategy.scope()`.

    The optimizer is built before the first step: a Keras 3 optimizer first built inside a
    replica's tf.function fails under MirroredStrategy.
    """
    # Seeds the initial weights, so a run is reproducible from its config alone.
    keras.utils.set_random_seed(config.train.seed)
    previous_policy = keras.mixed_precision.global_policy()
    if config.train.mixed_precision:
        # Layers take their policy when they are built; the maths outside them stays float32.
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = config_lib.build_model(config.model, manifest.modalities)
            run_dir.build_variables(model, manifest)
            optimizer = keras.optimizers.Adam(learning_rate=config.train.learning_rate,
                                              amsgrad=config.train.amsgrad)
            if config.train.mixed_precision:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
            counter = lambda name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
            step, epoch, epoch_step, bad_epochs, stopped = (
                counter(n) for n in ("global_step", "epoch", "epoch_step", "bad_epochs", "stopped"))
            best_val_loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="best_val_loss")
            epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss_sum")
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    checkpoint = run_dir.model_checkpoint(
        model, optimizer=optimizer, step=step, epoch=epoch, epoch_step=epoch_step,
        epoch_loss_sum=epoch_loss_sum, best_val_loss=best_val_loss, bad_epochs=bad_epochs,
        stopped=stopped)
    return TrainState(model, optimizer, step, epoch, epoch_step, epoch_loss_sum, best_val_loss,
                      bad_epochs, stopped, checkpoint)


def make_train_step(state: TrainState, strategy: tf.distribute.Strategy, global_batch: int,
                    seed: int, *, jit_compile: bool = False):
    """A tf.function running one optimisation step on a distributed batch.

    Randomness is stateless: the step's seed is (seed, global step), read in the graph so the
    host never waits on the step counter. Replica r holds global rows [r b, (r + 1) b) of the
    batch and draws their noise (bmvae_tf.noise), so the step does not depend on the split.
    With jit_compile the loss and gradients are XLA-compiled; the optimizer update, which
    all-reduces across replicas, stays outside the compiled function.
    """
    model, optimizer = state.model, state.optimizer
    replicas = strategy.num_replicas_in_sync
    per_replica = global_batch // replicas
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def loss_and_grads(batch, seed, offset):
        noise = Noise(seed, offset=offset, global_batch=global_batch)
        with tf.GradientTape() as tape:
            terms = model.loss_terms(batch, noise)
            loss = tf.reduce_sum(terms.per_example) / global_batch + terms.global_term / replicas
            # mixed_float16: scale the loss so float16 gradients do not underflow; the
            # LossScaleOptimizer unscales them and skips steps whose gradients overflow.
            scaled = optimizer.scale_loss(loss) if scales_loss else loss
        return loss, tape.gradient(scaled, model.trainable_variables)

    if jit_compile:
        loss_and_grads = tf.function(loss_and_grads, jit_compile=True)

    def replica_step(batch, seed):
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        offset = tf.cast(replica_id, tf.int32) * per_replica
        loss, grads = loss_and_grads(batch, seed, offset)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(batch):
        step_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(state.step, tf.int32)])
        per_replica_loss = strategy.run(replica_step, args=(batch, step_seed))
        state.step.assign_add(1)
        state.epoch_step.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    # Exposed so tests can check that the XLA-compiled part is not retraced either.
    train_step.compiled_loss_and_grads = loss_and_grads if jit_compile else None
    return train_step


def make_eval_step(model):
    """Mean objective over a batch (per-example terms plus the global term)."""

    @tf.function
    def eval_step(batch, seed):
        terms = model.loss_terms(batch, seed)
        count = tf.cast(tf.shape(terms.per_example)[0], tf.float32)
        return tf.reduce_sum(terms.per_example) + count * terms.global_term, count

    return eval_step


def validation_loss(eval_step, manifest: schema.Manifest, validation: Validation, batch_size: int,
                    seed: int) -> float:
    """Mean objective over the validation examples, with `eval_step` from make_eval_step."""
    total, count = 0.0, 0.0
    dataset = input_pipeline.make_dataset(manifest, validation.split, batch_size,
                                          holdout_fraction=validation.holdout_fraction, holdout=True)
    for i, batch in enumerate(dataset):
        s, n = eval_step(batch, tf.constant([seed, i], tf.int32))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise UserError(f"{manifest.directory}: no validation examples in {validation.description}")
    return total / count


def steps_per_epoch(manifest: schema.Manifest, validation: Validation | None, global_batch: int) -> int:
    """Full global batches per epoch; a held-out fraction is taken out of the count (its exact
    size depends on record hashes, so this is the expected size; epochs repeat the data and
    take exactly this many steps)."""
    count = manifest.split("train").count
    if validation is not None and validation.split == "train":
        count = int(count * (1.0 - validation.holdout_fraction))
    return count // global_batch


def _write_jsonl(path: str, records: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _read_jsonl(path: str) -> list[dict]:
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


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


class _Checkpoints:
    """Checkpoint managers. Under MultiWorkerMirroredStrategy every worker must take part in a
    save; only the chief writes RUN/checkpoints, the others write to a scratch directory that
    is deleted after each save."""

    def __init__(self, state: TrainState, paths: run_dir.RunPaths, chief: bool, task_id: int,
                 keep: int):
        self.chief = chief
        directory = paths.checkpoints if chief else os.path.join(paths.root, f".worker-{task_id}")
        self.directory = directory
        self.latest = tf.train.CheckpointManager(state.checkpoint, directory, max_to_keep=keep)
        self.best = tf.train.CheckpointManager(
            state.checkpoint, os.path.join(directory, run_dir.BEST), max_to_keep=1)
        self.restore_from = tf.train.latest_checkpoint(paths.checkpoints)

    def save(self, step: int, best: bool = False) -> None:
        (self.best if best else self.latest).save(checkpoint_number=step)
        if not self.chief:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def last_good(self) -> str:
        return tf.train.latest_checkpoint(self.latest.directory) or "none"


class _Progress:
    """A progress bar on a terminal, plain log lines otherwise; steps and examples per second.

    Keras' Progbar writes to stdout, so whether stdout is a terminal decides which; the log lines
    go to the logging handlers (stderr from the CLI).
    """

    def __init__(self, steps: int, global_batch: int, epoch: int, epochs: int, done: int):
        self.bar = (keras.utils.Progbar(steps, unit_name="step",
                                        stateful_metrics=("loss", "steps/s", "examples/s"))
                    if sys.stdout.isatty() else None)
        self.global_batch, self.epoch, self.epochs = global_batch, epoch, epochs
        self.done = done
        self.mark, self.mark_step = time.perf_counter(), done

    def update(self, done: int, step: int, loss: float) -> dict:
        elapsed = time.perf_counter() - self.mark
        rate = (done - self.mark_step) / max(elapsed, 1e-9)
        record = {"epoch": self.epoch, "step": step, "loss": loss, "steps_per_second": rate,
                  "examples_per_second": rate * self.global_batch}
        if self.bar is not None:
            self.bar.update(done, values=self._bar_values(loss, rate), finalize=False)
        else:
            log.info("epoch %d/%d step %d loss %.4f  %.1f steps/s  %.0f examples/s", self.epoch,
                     self.epochs, step, loss, rate, rate * self.global_batch)
        self.mark, self.mark_step = time.perf_counter(), done
        return record

    def finish(self, done: int, loss: float, seconds: float) -> None:
        """Closes the bar with the epoch's mean loss and its average rates."""
        if self.bar is not None:
            rate = (done - self.done) / max(seconds, 1e-9)
            self.bar.update(done, values=self._bar_values(loss, rate), finalize=True)

    def _bar_values(self, loss: float, rate: float) -> list:
        return [("loss", loss), ("steps/s", rate), ("examples/s", rate * self.global_batch)]


def train(config: config_lib.Config, workdir: str, *,
          strategy: tf.distribute.Strategy | None = None, write_report: bool = False) -> list[dict]:
    """Trains (or resumes) the run in `workdir`; returns the whole history, one dict per epoch.

    write_report: the chief also writes RUN/report.html (training curves so far; `evaluate` and
    `analyze` rewrite it with their tables and plots)."""
    return run_training(config, workdir, strategy=strategy, write_report=write_report)[0]


def run_training(config: config_lib.Config, workdir: str, *,
                 strategy: tf.distribute.Strategy | None = None,
                 write_report: bool = False) -> tuple[list[dict], TrainState]:
    """`train`, also returning the in-memory state (each worker's own copy of the weights)."""
    t = config.train
    # First: MultiWorkerMirroredStrategy must be made before the runtime starts.
    strategy = strategy or strategy_lib.make_strategy(t.strategy)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    paths = run_dir.RunPaths(workdir)
    manifest = schema.read_manifest(config.data.dir)
    chief = strategy_lib.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = t.batch_size
    if global_batch % replicas:
        raise UserError(f"train.batch_size={global_batch} is not divisible by the "
                        f"{replicas} replicas of the {type(strategy).__name__}")
    input_pipeline.check_shards(manifest, "train")
    validation = choose_validation(manifest, t)
    steps = steps_per_epoch(manifest, validation, global_batch)
    if steps < 1:
        raise UserError(f"train.batch_size={global_batch} exceeds the {manifest.split('train').count} "
                        f"training examples of {config.data.dir}")

    # Training re-draws text paddings when asked; validation and evaluation read the stored text.
    repad = input_pipeline.use_dynamic_text_padding(config.data.dynamic_text_padding, manifest)
    state = build_state(config, manifest, strategy)
    checkpoints = _Checkpoints(state, paths, chief, strategy_lib.task_id(strategy), t.checkpoints_to_keep)
    if checkpoints.restore_from:
        state.checkpoint.restore(checkpoints.restore_from).assert_existing_objects_matched()
        log.info("resumed %s at epoch %d, step %d", checkpoints.restore_from,
                 int(state.epoch.numpy()) + 1, int(state.step.numpy()))
    finished, restored_step = int(state.epoch.numpy()), int(state.step.numpy())
    # Records past the checkpoint belong to work that was lost; drop them.
    history = [h for h in run_dir.read_history(paths) if h["epoch"] <= finished]
    progress_log = [p for p in _read_jsonl(paths.progress) if p["step"] <= restored_step]
    if chief:
        tf.io.gfile.makedirs(paths.root)
        atomic.write_text(paths.config, config_lib.dump_yaml(config))
        _write_jsonl(paths.history, history)
        _write_jsonl(paths.progress, progress_log)
    writer = tf.summary.create_file_writer(paths.logs) if chief else tf.summary.create_noop_writer()

    seed = t.seed
    jit_compile = config_lib.resolve_jit_compile(t, t.epochs * steps)
    if t.jit_compile is None:
        log.info("XLA %s (train.jit_compile: null, %d steps)", "on" if jit_compile else "off", t.epochs * steps)
    train_step = make_train_step(state, strategy, global_batch, seed, jit_compile=jit_compile)
    eval_step = make_eval_step(state.model)
    if validation is not None:
        log.info("validation on %s", validation.description)

    def check_finite(losses: list, epoch: int) -> float:
        """The mean of `losses`; stops training, before anything is saved, if one is not finite."""
        value = float(tf.reduce_mean(losses))
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} in epoch {epoch} at or before step {int(state.step.numpy())}; "
                f"training stopped. The last good checkpoint is {checkpoints.last_good}; lower "
                f"train.learning_rate or check the data")
        return value

    def save(step: int, *, also_best: bool = False) -> None:
        """Saves the step's checkpoint (and the best one), unless an update has made a weight
        non-finite: a step's loss is computed before its update, so a finite loss does not
        prove finite weights."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in state.model.trainable_variables])
        if not bool(finite):
            raise TrainingDiverged(
                f"a weight became NaN or Inf by step {step}; training stopped. The last good "
                f"checkpoint is {checkpoints.last_good}; lower train.learning_rate or check the data")
        if also_best:
            checkpoints.save(step, best=True)
        checkpoints.save(step)

    for epoch in range(finished + 1, t.epochs + 1):
        if int(state.stopped.numpy()):
            break
        done = int(state.epoch_step.numpy())
        resumed_steps, resumed_loss_sum = done, float(state.epoch_loss_sum.numpy())
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx, e=epoch, d=done: _epoch_dataset(ctx, manifest, config, validation, e, d, steps,
                                                        repad))
        started = time.perf_counter()
        progress = _Progress(steps, global_batch, epoch, t.epochs, done)
        losses, unchecked = [], []
        step = int(state.step.numpy())  # counted on the host after this: no sync per step
        for batch in dataset:
            loss = train_step(batch)
            losses.append(loss)
            unchecked.append(loss)
            done += 1
            step += 1
            if done % t.log_every_steps == 0 or (progress.bar is not None and done % 10 == 0):
                value = check_finite(unchecked, epoch)
                unchecked = []
                record = progress.update(done, step, value)
                if done % t.log_every_steps == 0:
                    progress_log.append(record)
                    if chief:
                        _write_jsonl(paths.progress, progress_log)
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and done < steps:
                if unchecked:
                    check_finite(unchecked, epoch)
                    unchecked = []
                state.epoch_loss_sum.assign(resumed_loss_sum + float(tf.reduce_sum(losses)))
                save(step)
        if losses:
            check_finite(losses, epoch)
        steps_run = resumed_steps + len(losses)
        loss_sum = resumed_loss_sum + (float(tf.reduce_sum(losses)) if losses else 0.0)
        loss = loss_sum / steps_run if steps_run else float("nan")
        seconds = time.perf_counter() - started
        progress.finish(done, loss, seconds)
        val_loss = (validation_loss(eval_step, manifest, validation, config.eval.batch_size, seed)
                    if validation is not None else None)
        improved = _early_stopping_update(state, t, val_loss, validation)
        state.epoch.assign(epoch)
        state.epoch_step.assign(0)
        state.epoch_loss_sum.assign(0.0)
        step = int(state.step.numpy())
        save(step, also_best=improved)
        record = {"epoch": epoch, "step": step, "loss": loss, "val_loss": val_loss, "seconds": seconds}
        if int(state.stopped.numpy()):
            record["stopped_early"] = True
        history.append(record)
        if chief:
            _write_jsonl(paths.history, history)
            with writer.as_default(step=step):
                tf.summary.scalar("loss", loss)
                if val_loss is not None:
                    tf.summary.scalar("val_loss", val_loss)
            writer.flush()
        log.info("epoch %d/%d  loss %.4f  val_loss %s  %.1fs (%.0f examples/s)", epoch, t.epochs, loss,
                 "n/a" if val_loss is None else f"{val_loss:.4f}", seconds,
                 (steps - progress.done) * global_batch / max(seconds, 1e-9))
        if record.get("stopped_early"):
            log.info("early stopping: no improvement of the validation loss for %d epochs; best %.4f",
                     t.early_stopping_patience, float(state.best_val_loss.numpy()))
    if len(history) == finished:
        log.info("%s is already trained (%d epochs%s)", workdir, finished,
                 ", stopped early" if int(state.stopped.numpy()) else "")
    if write_report and chief:
        from bmvae_tf.trainers.reporting import report  # matplotlib, only when a report is asked for

        log.info("wrote %s", report.write_run_report(workdir))
    return history, state


def _early_stopping_update(state: TrainState, t: config_lib.TrainConfig, val_loss: float | None,
                           validation: Validation | None) -> bool:
    """Tracks the best validation loss; returns whether this epoch is the new best. Sets
    `stopped` after `patience` epochs without an improvement larger than min_delta."""
    if not t.early_stopping_patience or val_loss is None or validation.split == "test":
        return False
    if val_loss < float(state.best_val_loss.numpy()) - t.early_stopping_min_delta:
        state.best_val_loss.assign(val_loss)
        state.bad_epochs.assign(0)
        return True
    state.bad_epochs.assign_add(1)
    if int(state.bad_epochs.numpy()) >= t.early_stopping_patience:
        state.stopped.assign(1)
    return False


def _epoch_dataset(ctx: tf.distribute.InputContext, manifest: schema.Manifest,
                   config: config_lib.Config, validation: Validation | None, epoch: int, done: int,
                   steps: int, dynamic_text_padding: bool) -> tf.data.Dataset:
    """Epoch `epoch`'s batches for one input pipeline, from global step `done` of the epoch on.

    The order is a pure function of (seed, epoch). Each pipeline feeds
    num_replicas / num_input_pipelines replicas, one batch each per step; the data repeat and
    every pipeline takes exactly `steps` steps' worth, so workers with unequal shards stay in
    lockstep.
    """
    t = config.train
    per_pipeline = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    holdout = validation.holdout_fraction if validation is not None and validation.split == "train" else 0.0
    dataset = input_pipeline.make_dataset(
        manifest, "train", ctx.get_per_replica_batch_size(t.batch_size), shuffle=True,
        seed=t.seed * 100003 + epoch, repeat=True, drop_remainder=True, shuffle_buffer=t.shuffle_buffer,
        input_context=ctx, holdout_fraction=holdout, holdout=False, skip_batches=done * per_pipeline,
        dynamic_text_padding=dynamic_text_padding)
    return dataset.take((steps - done) * per_pipeline)
