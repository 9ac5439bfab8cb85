"""Keras `fit()` and `evaluate()` for every model of the zoo, mixed into `MultimodalVAE`.

`train_step` and `test_step` compute the same `loss_terms` objective as the CLI's custom loop
(`bmvae_tf.trainers.training.steps`), with the same keyed noise: the step's seed is
(seed, optimizer steps done), as the loop's is (train.seed, global step), and under a
`tf.distribute` strategy replica r keys its noise by the global rows it holds, so a step draws
what one device would. The validation loss of batch i is drawn from (seed, i), as the loop's is.
So one epoch of `fit()` on the loop's batches follows the loop's loss trajectory.

    model.compile(optimizer=keras.optimizers.Adam(1e-3), seed=0)
    model.fit(train, validation_data=test, epochs=5, callbacks=[keras.callbacks.EarlyStopping()])

The loss is `sum(per_example) / global batch + global_term / replicas` on each replica, whose
gradients the optimizer sums over replicas: the gradient of the mean objective. The logged
`loss` is the mean objective (as the loop's history reports it); beside it fit() and evaluate()
log each of the model's loss terms (`LossTerms.metrics`: bound, reconstruction, KL terms, ...,
what the loop writes to TensorBoard), averaged over the examples of the epoch. The custom loop stays the CLI's
engine: it adds exact mid-epoch resume, run directories and the run's records.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bmvae_tf import custom_networks, missing
from bmvae_tf.noise import Noise


class KerasFit:
    """Mixin of `MultimodalVAE` (placed before keras.Model): train_step, test_step and a
    `compile` that takes the noise seed and builds every variable before the first step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fit_seed = 0
        self.modality_dropout = 0.0
        # The mean objective; and how many test batches this evaluation has seen (keys their noise).
        self.objective_tracker = keras.metrics.Mean(name="loss")
        self.test_batches = keras.metrics.Sum(name="test_batches", dtype="float32")
        # {loss term: its mean}, made by `compile` once the model's terms are known. Set past
        # Keras's tracking: the model is built (and its state locked) by then, and these are
        # logs, not state a checkpoint should hold.
        object.__setattr__(self, "term_trackers", {})

    def compile(self, optimizer="adam", *, seed: int = 0, modality_dropout: float = 0.0, loss=None,
                **kwargs):
        """keras.Model.compile, with `seed` (int >= 0) keying the training and validation noise,
        and `modality_dropout` (a probability, 0: off), the loop's `train.modality_dropout`.

        A batch's `present` mask (bool [B, M], the reader's) reaches the objective; a batch
        without one has every modality observed.

        The objective is the model's own (`loss_terms`): passing `loss` is an error. Every
        variable is created here (encoders, decoders and the optimizer's slots), so the model
        can be compiled inside `strategy.scope()` and fit under it.
        """
        if loss is not None:
            raise ValueError(f"{type(self).__name__}.compile: the model trains on its own objective "
                             f"(loss_terms); do not pass loss={loss!r}")
        if int(seed) < 0:
            raise ValueError(f"{type(self).__name__}.compile: seed must be >= 0, got {seed}")
        if not 0.0 <= float(modality_dropout) <= 1.0:
            raise ValueError(f"{type(self).__name__}.compile: modality_dropout must be in [0, 1], "
                             f"got {modality_dropout}")
        super().compile(optimizer=optimizer, **kwargs)
        self.fit_seed = int(seed)
        self.modality_dropout = float(modality_dropout)
        self.build_variables()
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        object.__setattr__(self, "term_trackers", {
            name: keras.metrics.Mean(name=name) for name in self.loss_term_names()})

    @property
    def metrics(self):
        # Keras resets, aggregates over replicas and logs what this lists.
        return [*super().metrics, *self.term_trackers.values()]

    def loss_term_names(self) -> list[str]:
        """The keys of the model's `LossTerms.metrics`, read from one pass on a zero example
        (they depend on the model's class and options, not on the data)."""
        terms = self.loss_terms(self._zero_example(), Noise(tf.constant([0, 0], tf.int32)))
        return list(terms.metrics)

    def build_variables(self) -> None:
        """Creates every variable: checks each network's contract on zeros
        (`custom_networks.check_networks`, a UserError naming a layer that breaks it), then
        encodes zeros of each modality and decodes zero latents (Keras builds layers on their
        first call; fit must not build them inside a step)."""
        z = tf.zeros([1, self.latent_dim])
        widths = [int(self.decoder_latents(i, z).shape[-1]) for i in range(len(self.modalities))]
        custom_networks.check_networks(self.modalities, self.encoders, self.decoders, widths, widths)
        self(self._zero_example())
        self.generate(tf.zeros([1, self.latent_dim]))

    def _zero_example(self) -> dict:
        """One all-zero example {modality: [1, *shape]} in the dtypes the model takes."""
        return {m.name: tf.zeros([1, *m.shape], tf.int64 if m.dtype == "int64" else tf.float32)
                for m in self.modalities}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy, Keras averages the first batch over the replicas to trace an unbuilt
        # model, which batch["present"] (bool) cannot take; `compile` built every variable.
        if all(layer.built for layer in self._flatten_layers()):
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    # ---------------------------------------------------------------- steps
    def _keyed(self, data, seed: tf.Tensor, dropout: float = 0.0):
        """(inputs, their present mask or None, this replica's keyed noise, the global batch
        size, replicas); with `dropout`, modality dropout applied as in the loop's step."""
        inputs = data[0] if isinstance(data, (tuple, list)) else data
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32) if context is not None else 0
        batch = tf.shape(inputs[self.modalities[0].name])[0]
        global_batch = batch * replicas
        noise = Noise(seed, offset=replica_id * batch, global_batch=global_batch)
        inputs, present = missing.training_inputs(self.modality_names, inputs, seed, replica_id * batch,
                                                  global_batch, dropout)
        return inputs, present, noise, tf.cast(global_batch, tf.float32), replicas

    def train_step(self, data):
        step_seed = tf.stack([tf.constant(self.fit_seed, tf.int32),
                              tf.cast(self.optimizer.iterations, tf.int32)])
        inputs, present, noise, global_batch, replicas = self._keyed(data, step_seed, self.modality_dropout)
        scales_loss = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(inputs, noise, present=present)
            loss = tf.reduce_sum(terms.per_example) / global_batch + terms.global_term / replicas
            scaled = self.optimizer.scale_loss(loss) if scales_loss else loss
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        # Keras averages each replica's result: replica shares times R average to their sum.
        self.objective_tracker.update_state(loss * replicas)
        return self._logs(terms, inputs)

    def test_step(self, data):
        batch_seed = tf.stack([tf.constant(self.fit_seed, tf.int32),
                               tf.cast(self.test_batches.result(), tf.int32)])
        inputs, present, noise, _, _ = self._keyed(data, batch_seed)
        terms = self.loss_terms(inputs, noise, present=present)
        # Each example counts once, with the global term once per example (as the loop's eval_step).
        self.objective_tracker.update_state(terms.per_example + terms.global_term)
        self.test_batches.update_state(1.0)
        return self._logs(terms, inputs)

    def _logs(self, terms, inputs) -> dict:
        """The loss, and each loss term's batch mean weighted by the batch's examples, so that an
        epoch's value is the mean over its examples, a short last batch included."""
        weight = tf.cast(tf.shape(inputs[self.modalities[0].name])[0], tf.float32)
        for name, value in terms.metrics.items():
            self.term_trackers[name].update_state(tf.cast(value, tf.float32), sample_weight=weight)
        return {"loss": self.objective_tracker.result(),
                **{name: tracker.result() for name, tracker in self.term_trackers.items()}}
