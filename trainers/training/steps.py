"""The optimisation step under `strategy.run`, and the evaluation step.

The step is a single-replica view (as in Orbit / official.core): each replica computes its
examples' losses, sums them and divides by the GLOBAL batch size; global regularisers (the
mixture-weight KL) are divided by the replica count, so the all-reduced gradient equals the
single-device gradient of the mean objective. Random draws are keyed by each example's row in
the global batch (bmvae_tf.noise), so a step on R replicas computes what one device would.
"""

from __future__ import annotations

from typing import Protocol

import keras
import tensorflow as tf

from bmvae_tf import missing
from bmvae_tf.noise import Noise


class StepState(Protocol):
    """What a step reads and updates (a `trainer.Trainer` has it all)."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable        # optimisation steps done
    epoch_step: tf.Variable  # steps done in the unfinished epoch


def make_train_step(trainer: StepState, strategy: tf.distribute.Strategy, global_batch: int,
                    seed: int, *, jit_compile: bool = False, modality_dropout: float = 0.0):
    """A tf.function running one optimisation step on a distributed batch; returns the loss.

    Randomness is stateless: the step's seed is (seed, global step), read in the graph so the
    host never waits on the step counter. Replica r holds global rows [r b, (r + 1) b) of the
    batch and draws their noise (bmvae_tf.noise), so the step does not depend on the split.
    With jit_compile the loss and gradients are XLA-compiled; the optimizer update, which
    all-reduces across replicas, stays outside the compiled function. The batch's `present`
    mask goes to the model, after `modality_dropout` (`bmvae_tf.missing.training_inputs`).
    """
    model, optimizer = trainer.model, trainer.optimizer
    replicas = strategy.num_replicas_in_sync
    per_replica = global_batch // replicas
    scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def loss_and_grads(batch, seed, offset):
        noise = Noise(seed, offset=offset, global_batch=global_batch)
        inputs, present = missing.training_inputs(model.modality_names, batch, seed, offset,
                                                  global_batch, modality_dropout)
        with tf.GradientTape() as tape:
            terms = model.loss_terms(inputs, noise, present=present)
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
        step_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(trainer.step, tf.int32)])
        per_replica_loss = strategy.run(replica_step, args=(batch, step_seed))
        trainer.step.assign_add(1)
        trainer.epoch_step.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

    # Exposed so tests can check that the XLA-compiled part is not retraced either.
    train_step.compiled_loss_and_grads = loss_and_grads if jit_compile else None
    return train_step


def make_eval_step(model):
    """(sum of the objective over a batch, its example count): per-example terms plus the
    global term once per example."""

    @tf.function
    def eval_step(batch, seed):
        terms = model.loss_terms(batch, seed, present=missing.batch_present(batch))
        count = tf.cast(tf.shape(terms.per_example)[0], tf.float32)
        return tf.reduce_sum(terms.per_example) + count * terms.global_term, count

    return eval_step


def make_terms_step(trainer: StepState, strategy: tf.distribute.Strategy, global_batch: int, seed: int,
                    *, modality_dropout: float = 0.0):
    """A tf.function: the model's `LossTerms.metrics` (bound, reconstruction, KL, ...) on a
    distributed batch, averaged over replicas, with the noise the next `train_step(batch)` draws.
    Call it just before that step to log the step's terms.

    A forward pass of its own rather than extra outputs of the training step: a tensor the step
    also read would change how TensorFlow's graph optimiser groups the loss's sums, and so its
    last bit. The training step stays exactly as it was.
    """
    model = trainer.model
    per_replica = global_batch // strategy.num_replicas_in_sync

    def replica_terms(batch, seed):
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        offset = tf.cast(replica_id, tf.int32) * per_replica
        noise = Noise(seed, offset=offset, global_batch=global_batch)
        inputs, present = missing.training_inputs(model.modality_names, batch, seed, offset,
                                                  global_batch, modality_dropout)
        return {name: tf.cast(value, tf.float32)
                for name, value in model.loss_terms(inputs, noise, present=present).metrics.items()}

    @tf.function
    def terms_step(batch):
        step_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(trainer.step, tf.int32)])
        terms = strategy.run(replica_terms, args=(batch, step_seed))
        # Each replica's metrics are means over its (equal) share of the batch.
        return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                for name, value in terms.items()}

    return terms_step


def make_eval_terms_step(model):
    """{name: the model's LossTerms.metrics on a batch}, with the validation loss's noise: a pass
    of its own beside `eval_step`, for the reason `make_terms_step` gives."""

    @tf.function
    def eval_terms_step(batch, seed):
        terms = model.loss_terms(batch, seed, present=missing.batch_present(batch))
        return {name: tf.cast(value, tf.float32) for name, value in terms.metrics.items()}

    return eval_terms_step
