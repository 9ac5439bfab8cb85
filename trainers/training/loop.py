"""The training loop: a controller that runs epochs of a `Trainer` (Orbit's Controller role).

It composes small helpers: `History` (history.jsonl, progress.jsonl, TensorBoard's epoch
scalars), `summaries` (the loss terms, learning rate and per-epoch images in TensorBoard),
`NonFiniteGuard`, `EarlyStopping` and `Progress`. Checkpoints come every
`train.checkpoint_every_steps` steps and at each epoch's end; a non-finite loss stops training
before any checkpoint of the diverged weights is written, and no checkpoint is written of
weights that are not finite.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from typing import Callable

import tensorflow as tf

from bmvae_tf import atomic, missing, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir
from bmvae_tf.trainers.training import cluster, global_state, inputs, lock, summaries
from bmvae_tf.trainers.training import strategy as strategy_lib
from bmvae_tf.trainers.training.early_stopping import EarlyStopping
from bmvae_tf.trainers.training.history import History
from bmvae_tf.trainers.training.nonfinite import NonFiniteGuard
from bmvae_tf.trainers.training.progress import Progress, format_loss
from bmvae_tf.trainers.training.trainer import Trainer

log = logging.getLogger("bmvae.train")


def run_training(config: config_lib.Config, workdir: str, *,
                 strategy: tf.distribute.Strategy | None = None,
                 write_report: bool = False,
                 on_epoch: Callable[[dict], None] | None = None) -> tuple[list[dict], Trainer]:
    """Trains (or resumes) the run in `workdir`; returns the whole history (one dict per epoch)
    and the trainer (each worker's own copy of the weights).

    Op determinism and the dtype policy are set for the run only (`global_state`).
    write_report: the chief also writes RUN/report.html (training curves so far; `evaluate` and
    `analyze` rewrite it with their tables and plots).
    on_epoch: called with each finished epoch's history record, after it is checkpointed and
    recorded (`bmvae tune` reports val_loss to its pruner here; an exception it raises stops
    the run, which stays resumable from that epoch).
    """
    run_dir.check_run_directory(workdir)
    # First: MultiWorkerMirroredStrategy must be made before the runtime starts.
    if strategy is None:
        with cluster.waiting_for_peers(config.train):  # a peer that never starts: exit 2
            strategy = strategy_lib.make_strategy(config.train.strategy)
    # The chief is the run directory's one writer; other workers write only their scratch copies.
    chief = strategy_lib.is_chief(strategy)
    with lock.run_lock(workdir) if chief else contextlib.nullcontext():
        if chief:
            run_dir.remove_stale_temporaries(run_dir.RunPaths(workdir))
        with global_state.run_settings(config.train):
            controller = Controller(config, workdir, strategy, on_epoch=on_epoch)
            history = controller.run()
        if write_report and chief:
            from bmvae_tf.trainers.reporting import report  # matplotlib, only when asked for

            log.info("wrote %s", report.write_run_report(workdir))
    return history, controller.trainer


def plan_epochs(config: config_lib.Config, manifest: schema.Manifest,
                strategy: tf.distribute.Strategy) -> tuple[inputs.Validation | None, int]:
    """(where validation examples come from, steps per epoch), after checking that the global
    batch divides between the replicas and fits in the training data."""
    global_batch, replicas = config.train.batch_size, strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise UserError(f"train.batch_size={global_batch} is not divisible by the "
                        f"{replicas} replicas of the {type(strategy).__name__}")
    input_pipeline.check_shards(manifest, "train")
    validation = inputs.choose_validation(manifest, config.train)
    steps = inputs.steps_per_epoch(manifest, validation, global_batch)
    if steps < 1:
        raise UserError(f"train.batch_size={global_batch} exceeds the {manifest.split('train').count} "
                        f"training examples of {config.data.dir}")
    return validation, steps


@contextlib.contextmanager
def no_empty_rows(data_dir: str):
    """A batch row with no modality present (the model's check, bmvae_tf.missing) becomes a
    one-line UserError naming the dataset instead of TensorFlow's traceback."""
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        if missing.NO_MODALITY not in (e.message or ""):
            raise
        raise UserError(f"{data_dir}: {missing.NO_MODALITY} (an example with every modality "
                        f"missing); drop such rows from the dataset") from None


class Controller:
    """Runs the epochs of one run: opens the run directory, resumes the trainer from its latest
    checkpoint, and for each epoch trains, validates, checkpoints and records."""

    def __init__(self, config: config_lib.Config, workdir: str, strategy: tf.distribute.Strategy,
                 on_epoch: Callable[[dict], None] | None = None):
        t = config.train
        self.config, self.workdir, self.strategy = config, workdir, strategy
        self.on_epoch = on_epoch
        self.paths = run_dir.RunPaths(workdir)
        self.manifest = schema.read_manifest(config.data.dir)
        self.chief = strategy_lib.is_chief(strategy)
        self.validation, self.steps = plan_epochs(config, self.manifest, strategy)
        # Training re-draws text paddings when asked; validation and evaluation read the stored text.
        self.repad = input_pipeline.use_dynamic_text_padding(config.data.dynamic_text_padding,
                                                             self.manifest)
        self.trainer = trainer = Trainer(config, self.manifest, strategy)
        restored = trainer.restore_or_initialize(self.paths)
        if restored:
            log.info("resumed %s at epoch %d, step %d", restored, trainer.finished_epochs + 1,
                     trainer.global_step)
        self.finished = trainer.finished_epochs
        if self.chief:
            tf.io.gfile.makedirs(self.paths.root)
            atomic.write_text(self.paths.config, config_lib.dump_yaml(config))
        self.history = History(self.paths, self.chief, finished_epochs=self.finished,
                               restored_step=trainer.global_step)
        jit_compile = config_lib.resolve_jit_compile(t, t.epochs * self.steps)
        if t.jit_compile is None:
            log.info("XLA %s (train.jit_compile: null, %d steps)", "on" if jit_compile else "off",
                     t.epochs * self.steps)
        trainer.build_steps(t.batch_size, jit_compile=jit_compile)
        if self.validation is not None:
            log.info("validation on %s", self.validation.description)
        self.guard = NonFiniteGuard(trainer)
        selects = self.validation is not None and self.validation.selects
        self.early_stopping = EarlyStopping(
            t.early_stopping_patience if selects else 0, t.early_stopping_min_delta,
            best_val_loss=trainer.best_val_loss, bad_epochs=trainer.bad_epochs, stopped=trainer.stopped)
        # The model's loss terms, computed on the batch of every log step, of each epoch's last
        # step and of the run's first step (where `terms_step` is traced, with the train step,
        # before the progress clock starts): TensorBoard's `train/<term>`, history's "terms".
        self.epoch_terms, self.step_terms = summaries.TermMeans(), {}
        self._terms_traced = False
        self._batches = None  # the iterator over the epochs' batches, opened by the first epoch
        self.images = self._model_images() if self.chief else None

    def _model_images(self) -> summaries.ModelImages:
        """TensorBoard's per-epoch pictures, of the first validation examples when there are any."""
        examples = None
        if self.validation is not None:
            examples = summaries.read_examples(
                inputs.validation_dataset(self.manifest, self.validation, summaries.IMAGE_EXAMPLES),
                self.manifest.modality_names)
        return summaries.ModelImages(self.trainer.model, self.manifest.modalities, examples,
                                     self.config.train.seed)

    def run(self) -> list[dict]:
        """Trains the epochs not yet done; returns the whole history."""
        # A damaged shard: one error naming it (only train and validation are read, and checked).
        try:
            with input_pipeline.reading(self.manifest, inputs.splits_read(self.validation)), \
                    no_empty_rows(self.config.data.dir):
                for epoch in range(self.finished + 1, self.config.train.epochs + 1):
                    if self.early_stopping.stopped:
                        break
                    loss, seconds, progress = self._train_epoch(epoch)
                    self._end_epoch(epoch, loss, seconds, progress)
        finally:
            self._batches = None  # stops reading ahead (after early stopping, or an error)
        if len(self.history.epochs) == self.finished:
            log.info("%s is already trained (%d epochs%s)", self.workdir, self.finished,
                     ", stopped early" if self.early_stopping.stopped else "")
        return self.history.epochs

    def _train_epoch(self, epoch: int) -> tuple[float, float, Progress]:
        """Runs epoch `epoch` from where its checkpoint left it; returns (the epoch's mean loss,
        including the steps before a resume; seconds; its progress)."""
        t, trainer = self.config.train, self.trainer
        done = int(trainer.epoch_step.numpy())
        resumed_steps, resumed_loss_sum = done, float(trainer.epoch_loss_sum.numpy())
        started = time.perf_counter()
        if self._batches is None:
            self._batches = self._open_batches(epoch, done)
        progress = Progress(self.steps, t.batch_size, epoch, t.epochs, done)
        losses = []
        step = trainer.global_step  # counted on the host after this: no sync per step
        self.epoch_terms.clear()
        # Exactly this epoch's batches: the iterator goes on into the next epoch.
        for batch in itertools.islice(self._batches, self.steps - done):
            if self._logs_terms(done + 1):
                self.step_terms = trainer.terms_step(batch)  # before the step: the step's noise
                self.epoch_terms.add(self.step_terms)
            loss = trainer.train_step(batch)
            losses.append(loss)
            self.guard.add(loss)
            done += 1
            step += 1
            progress.tick(done)
            self._log_progress(epoch, done, step, progress)
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and done < self.steps:
                self.guard.check_pending(epoch)
                trainer.epoch_loss_sum.assign(resumed_loss_sum + float(tf.reduce_sum(losses)))
                self._save(step)
        self.guard.check_epoch(losses, epoch)
        steps_run = resumed_steps + len(losses)
        loss_sum = resumed_loss_sum + (float(tf.reduce_sum(losses)) if losses else 0.0)
        loss = loss_sum / steps_run if steps_run else float("nan")
        seconds = time.perf_counter() - started
        progress.finish(done, loss)
        return loss, seconds, progress

    def _open_batches(self, epoch: int, done: int):
        """One iterator over the batches of every epoch left, from step `done` of `epoch` (the
        first one this run trains) on; the loop takes each epoch's steps from it in turn, so the
        next epoch's reading starts before the current one ends (`inputs.epochs_dataset`)."""
        return iter(self.strategy.distribute_datasets_from_function(functools.partial(
            inputs.epochs_dataset, manifest=self.manifest, config=self.config,
            validation=self.validation, first_epoch=epoch, done=done, steps=self.steps,
            dynamic_text_padding=self.repad)))

    def _logs_terms(self, done: int) -> bool:
        """Whether step `done` of the epoch computes the loss terms."""
        first, self._terms_traced = not self._terms_traced, True
        return first or done % self.config.train.log_every_steps == 0 or done == self.steps

    def _log_progress(self, epoch: int, done: int, step: int, progress: Progress) -> None:
        """Every `train.log_every_steps` steps a log line and a progress record; on a terminal
        the bar also moves every 10 steps. Either checks the losses since the last check."""
        logs = done % self.config.train.log_every_steps == 0
        if logs or (progress.bar is not None and done % 10 == 0):
            record = progress.update(done, step, self.guard.check_pending(epoch))
            if logs:
                self.history.add_progress(record)
                scalars = {"train/loss": record["loss"],
                           **{f"train/{name}": float(v) for name, v in self.step_terms.items()},
                           "learning_rate": summaries.learning_rate(self.trainer.optimizer)}
                summaries.write_scalars(self.history.writer, step, scalars)

    def _end_epoch(self, epoch: int, loss: float, seconds: float, progress: Progress) -> None:
        """Validates, updates early stopping, checkpoints the finished epoch and records it."""
        t, trainer = self.config.train, self.trainer
        val_loss, val_terms = (trainer.validate(self.validation, self.config.eval.batch_size)
                               if self.validation is not None else (None, {}))
        improved = self.early_stopping.update(val_loss)
        trainer.finish_epoch(epoch)
        step = trainer.global_step
        self._save(step, best=improved)
        record = {"epoch": epoch, "step": step, "loss": loss, "val_loss": val_loss, "seconds": seconds,
                  "terms": {**self.epoch_terms.means("train/"),
                            **{f"val/{name}": value for name, value in val_terms.items()}}}
        if self.early_stopping.stopped:
            record["stopped_early"] = True
        self.history.add_epoch(record)
        if self.images is not None and self._draws_images(epoch):
            self.images.write(self.history.writer, step)
            self.history.writer.flush()
        rate = progress.final_rate
        log.info("epoch %d/%d  loss %s  val_loss %s  %.1fs (%s examples/s)", epoch, t.epochs,
                 format_loss(loss), format_loss(val_loss), seconds,
                 "n/a" if rate is None else f"{rate * t.batch_size:.4g}")
        if record.get("stopped_early"):
            log.info("early stopping: no improvement of the validation loss for %d epochs; best %.4f",
                     t.early_stopping_patience, self.early_stopping.best)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def _draws_images(self, epoch: int) -> bool:
        """Whether TensorBoard's pictures are drawn after `epoch`: every `train.images_every_epochs`
        epochs, and after the run's last epoch (the last planned, or the one early stopping ends)."""
        every = self.config.train.images_every_epochs
        last = epoch == self.config.train.epochs or self.early_stopping.stopped
        return last or (every > 0 and epoch % every == 0)

    def _save(self, step: int, *, best: bool = False) -> None:
        """Checkpoint `step` (and the best one), unless a weight is no longer finite."""
        self.guard.check_weights(step)
        self.trainer.save(step, best=best)
