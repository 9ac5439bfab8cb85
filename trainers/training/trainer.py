"""The trainer: one run's model, optimizer, counters, step functions and checkpoints.

As Orbit's StandardTrainer, it knows how to take a step and how to save and restore itself; the
loop (`loop.Controller`) decides when. A checkpoint holds the weights, the optimizer, the step
and the position in the epoch, so a rerun continues from the exact step (`inputs` replays the
epoch's order up to it).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil

import keras
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import NoSpaceLeft, UserError
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.training import global_state, inputs, steps
from bmvae_tf.trainers.training import strategy as strategy_lib

log = logging.getLogger("bmvae.train")


class Trainer:
    """Model, optimizer and counters, created inside `strategy.scope()`.

    Counters (int64 unless noted), all in the checkpoint:
      step: optimisation steps done; epoch: epochs finished; epoch_step: steps done in the
      unfinished epoch; epoch_loss_sum (float64): their summed losses, so a resumed epoch reports
      its whole mean; best_val_loss (float64), bad_epochs, stopped: early stopping's state.

    The optimizer is built before the first step: a Keras 3 optimizer first built inside a
    replica's tf.function fails under MirroredStrategy.
    """

    def __init__(self, config: config_lib.Config, manifest: schema.Manifest,
                 strategy: tf.distribute.Strategy):
        self.config, self.manifest, self.strategy = config, manifest, strategy
        t = config.train
        # Seeds the initial weights, so a run is reproducible from its config alone.
        keras.utils.set_random_seed(t.seed)
        with global_state.dtype_policy(t.mixed_precision), strategy.scope():
            self.model = config_lib.build_model(config.model, manifest.modalities)
            run_dir.build_variables(self.model, manifest)
            optimizer = keras.optimizers.Adam(learning_rate=t.learning_rate, amsgrad=t.amsgrad)
            if t.mixed_precision:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(self.model.trainable_variables)
            self.optimizer = optimizer
            counter = lambda name: tf.Variable(0, dtype=tf.int64, trainable=False, name=name)
            self.step, self.epoch, self.epoch_step, self.bad_epochs, self.stopped = (
                counter(n) for n in ("global_step", "epoch", "epoch_step", "bad_epochs", "stopped"))
            self.best_val_loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False,
                                             name="best_val_loss")
            self.epoch_loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                              name="epoch_loss_sum")
        self.checkpoint = run_dir.model_checkpoint(
            self.model, optimizer=self.optimizer, step=self.step, epoch=self.epoch,
            epoch_step=self.epoch_step, epoch_loss_sum=self.epoch_loss_sum,
            best_val_loss=self.best_val_loss, bad_epochs=self.bad_epochs, stopped=self.stopped)
        self.checkpoints: _Managers | None = None
        self.train_step = self.eval_step = self.terms_step = self.eval_terms_step = None

    # -- steps

    def build_steps(self, global_batch: int, *, jit_compile: bool) -> None:
        """Makes `train_step(batch) -> loss`, `eval_step(batch, seed) -> (sum, count)` and the
        forward passes that log the model's LossTerms.metrics: `terms_step(batch)` (before the
        train step of the same batch) and `eval_terms_step(batch, seed)`."""
        seed, dropout = self.config.train.seed, self.config.train.modality_dropout
        self.train_step = steps.make_train_step(self, self.strategy, global_batch, seed,
                                                jit_compile=jit_compile, modality_dropout=dropout)
        self.eval_step = steps.make_eval_step(self.model)
        self.terms_step = steps.make_terms_step(self, self.strategy, global_batch, seed,
                                                modality_dropout=dropout)
        self.eval_terms_step = steps.make_eval_terms_step(self.model)

    def validation_loss(self, validation: inputs.Validation, batch_size: int) -> float:
        """Mean objective over the validation examples."""
        return self.validate(validation, batch_size, terms=False)[0]

    def validate(self, validation: inputs.Validation, batch_size: int, *,
                 terms: bool = True) -> tuple[float, dict[str, float]]:
        """(mean objective, {metric: mean of the model's LossTerms.metrics, if `terms`}) over the
        validation examples; each batch's metrics count with its number of examples."""
        seed = self.config.train.seed
        total, count, sums = 0.0, 0.0, {}
        for i, batch in enumerate(inputs.validation_dataset(self.manifest, validation, batch_size)):
            batch_seed = tf.constant([seed, i], tf.int32)
            s, n = self.eval_step(batch, batch_seed)
            total, count = total + float(s), count + float(n)
            for name, value in (self.eval_terms_step(batch, batch_seed) if terms else {}).items():
                sums[name] = sums.get(name, 0.0) + float(value) * float(n)
        if count == 0:
            raise UserError(f"{self.manifest.directory}: no validation examples in "
                            f"{validation.description}")
        return total / count, {name: value / count for name, value in sums.items()}

    # -- counters

    @property
    def global_step(self) -> int:
        return int(self.step.numpy())

    @property
    def finished_epochs(self) -> int:
        return int(self.epoch.numpy())

    def finish_epoch(self, epoch: int) -> None:
        """Marks `epoch` done: the next checkpoint resumes at the start of the next one."""
        self.epoch.assign(epoch)
        self.epoch_step.assign(0)
        self.epoch_loss_sum.assign(0.0)

    # -- checkpoints

    def restore_or_initialize(self, paths: run_dir.RunPaths) -> str | None:
        """Opens the checkpoint managers of RUN/checkpoints and restores the latest checkpoint
        there; returns its path, or None for a new run."""
        self.checkpoints = _Managers(self.checkpoint, paths, strategy_lib.is_chief(self.strategy),
                                     strategy_lib.task_id(self.strategy),
                                     self.config.train.checkpoints_to_keep)
        restore_from = tf.train.latest_checkpoint(paths.checkpoints)
        if restore_from:
            run_dir.restore_checkpoint(self.checkpoint, restore_from, self.manifest)
        return restore_from

    def save(self, step: int, *, best: bool = False) -> None:
        """Saves checkpoint `step` (to RUN/checkpoints/best too when `best`)."""
        if best:
            self.checkpoints.save(step, best=True)
        self.checkpoints.save(step)

    @property
    def last_good_checkpoint(self) -> str:
        return self.checkpoints.last_good if self.checkpoints is not None else "none"


class _Managers:
    """Checkpoint managers. Under MultiWorkerMirroredStrategy every worker must take part in a
    save; only the chief writes RUN/checkpoints, the others write to a scratch directory that
    is deleted after each save."""

    def __init__(self, checkpoint: tf.train.Checkpoint, paths: run_dir.RunPaths, chief: bool,
                 task_id: int, keep: int):
        self.chief = chief
        directory = paths.checkpoints if chief else os.path.join(paths.root, f".worker-{task_id}")
        self.directory = directory
        self.latest = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
        self.best = tf.train.CheckpointManager(
            checkpoint, os.path.join(directory, run_dir.BEST), max_to_keep=1)

    def save(self, step: int, best: bool = False) -> None:
        manager = self.best if best else self.latest
        try:
            manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            # A failed save leaves its ckpt-N_temp directory; the state file still names the
            # last good checkpoint, which stays the run's state.
            self._remove_temporaries(manager.directory)
            message = e.message if isinstance(e, tf.errors.OpError) else str(e)
            if "No space left" in message or getattr(e, "errno", None) == errno.ENOSPC:
                raise NoSpaceLeft(manager.directory) from None
            raise
        finally:
            if not self.chief:
                shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _remove_temporaries(directory: str) -> None:
        for name in tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []:
            if name.rstrip("/").endswith("_temp"):
                tf.io.gfile.rmtree(os.path.join(directory, name.rstrip("/")))

    @property
    def last_good(self) -> str:
        return tf.train.latest_checkpoint(self.latest.directory) or "none"
