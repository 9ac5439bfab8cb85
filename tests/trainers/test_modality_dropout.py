"""The training side of missing modalities: the loop and Keras fit pass a batch's `present` mask
to the model, and `train.modality_dropout` hides modalities through the same mask (issue 16)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import missing, schema
from bmvae_tf.errors import UserError
from bmvae_tf.noise import Noise
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir, train
from bmvae_tf.trainers.training import inputs
from bmvae_tf.trainers.training.trainer import Trainer
from tests import synthetic

TINY = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}
NAMES = ["digit", "street", "text"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("dropout"))
    synthetic.write_dataset(directory, num_train=64, num_test=32)
    return directory


# ---------------------------------------------------------------- the dropout draw

def test_dropout_never_hides_everything_and_hides_at_the_given_rate():
    rng = np.random.default_rng(0)
    rows = 20000
    present = rng.random((rows, 4)) < 0.8
    present[np.arange(rows), rng.integers(0, 4, rows)] = True         # at least one observed
    present[:1000] = True
    rate = 0.3
    kept = missing.modality_dropout(tf.constant(present), rate, Noise(tf.constant([1, 2]))).numpy()
    assert np.all(kept.any(axis=1)), "a row lost every modality"
    assert not np.any(kept & ~present), "dropout revealed a modality"
    observed = present.sum(axis=1)
    np.testing.assert_array_equal(kept[observed == 1], present[observed == 1])
    changed = (kept != present).any(axis=1)
    can = observed >= 2
    fraction = changed[can].mean()
    sigma = np.sqrt(rate * (1 - rate) / can.sum())
    assert abs(fraction - rate) < 5 * sigma, fraction
    # Every hidden subset is proper and non-empty; its size is uniform on 1 .. n - 1.
    hidden = (present & ~kept).sum(axis=1)
    assert np.all((hidden[changed] >= 1) & (hidden[changed] <= observed[changed] - 1))
    full = changed & (observed == 4)
    counts = np.bincount(hidden[full], minlength=4)[1:]
    np.testing.assert_allclose(counts / counts.sum(), [1 / 3] * 3, atol=0.05)
    # Which modality is hidden is uniform too.
    np.testing.assert_allclose((present & ~kept)[full].mean(axis=0), hidden[full].mean() / 4, atol=0.03)


def test_dropout_is_keyed_by_the_global_row():
    present = tf.ones([16, 3], tf.bool)
    seed = tf.constant([4, 9])
    whole = missing.modality_dropout(present, 0.7, Noise(seed)).numpy()
    second = missing.modality_dropout(present[8:], 0.7, Noise(seed, offset=8, global_batch=16)).numpy()
    np.testing.assert_array_equal(second, whole[8:])
    assert (whole != True).any()  # noqa: E712  (something was hidden)


def test_training_inputs_zero_what_they_hide():
    batch = synthetic.random_inputs(synthetic.digits_like_modalities(3), 32, seed=2)
    out, present = missing.training_inputs(NAMES, batch, tf.constant([0, 1]), 0, None, 0.9)
    present = present.numpy()
    assert (~present).any()
    for m, name in enumerate(NAMES):
        x, original = out[name].numpy(), batch[name].numpy()
        np.testing.assert_array_equal(x[present[:, m]], original[present[:, m]])
        assert not x[~present[:, m]].any()
    same, none = missing.training_inputs(NAMES, batch, tf.constant([0, 1]), 0, None, 0.0)
    assert same is batch and none is None


def test_config_validates_modality_dropout(dataset):
    assert config_lib.from_dict({"data": {"dir": dataset}}).train.modality_dropout == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="train.modality_dropout"):
            config_lib.from_dict({"data": {"dir": dataset}, "train": {"modality_dropout": bad}})


# ---------------------------------------------------------------- the loop and fit

def _trainer(dataset, name="bmvae_m", **train_settings):
    config = config_lib.from_dict({"data": {"dir": dataset}, "model": {**TINY, "name": name, "K": 2},
                                   "train": {"batch_size": 16, "seed": 3, **train_settings}})
    manifest = schema.read_manifest(dataset)
    trainer = Trainer(config, manifest, tf.distribute.get_strategy())
    return trainer, manifest, config


def _first_batch(manifest, config):
    validation = inputs.choose_validation(manifest, config.train)
    steps = inputs.steps_per_epoch(manifest, validation, 16)
    epoch = inputs.epoch_dataset(tf.distribute.InputContext(), manifest, config, validation, 1, 0,
                                 steps, False)
    return next(iter(epoch))


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_step_passes_the_batch_mask_to_the_model(dataset, jit_compile):
    trainer, manifest, config = _trainer(dataset)
    trainer.build_steps(16, jit_compile=jit_compile)
    batch = {k: v for k, v in _first_batch(manifest, config).items() if k != "present"}
    weights = [v.numpy() for v in trainer.model.trainable_variables]

    def loss(feed):
        for variable, value in zip(trainer.model.trainable_variables, weights):
            variable.assign(value)
        trainer.step.assign(0)
        return float(trainer.train_step(feed))

    plain = loss(batch)
    everything = loss({**batch, "present": tf.ones([16, 3], tf.bool)})
    np.testing.assert_array_max_ulp(np.float32(everything), np.float32(plain), maxulp=1)
    some = np.ones([16, 3], bool)
    some[::2, 1] = False
    hidden = dict(batch, street=tf.where(tf.constant(some[:, 1])[:, None, None, None], batch["street"], 0.0))
    assert loss({**hidden, "present": tf.constant(some)}) != plain
    # The evaluation step reads the mask too.
    full = trainer.eval_step(batch, tf.constant([0, 0]))[0]
    masked = trainer.eval_step({**hidden, "present": tf.constant(some)}, tf.constant([0, 0]))[0]
    assert float(full) != float(masked)


@pytest.mark.slow
def test_fit_with_dropout_follows_the_loop_with_dropout(dataset, tmp_path):
    """The loop and fit() draw the same dropout (keyed by the step's seed and the example's row)."""
    config = config_lib.from_dict({
        "data": {"dir": dataset}, "model": {**TINY, "name": "mmvae", "K": 2},
        "train": {"epochs": 1, "batch_size": 16, "seed": 3, "log_every_steps": 1,
                  "jit_compile": False, "modality_dropout": 0.5}})
    workdir = str(tmp_path / "run")
    train.train(config, workdir)
    loop_losses = [p["loss"] for p in run_dir.read_jsonl(run_dir.RunPaths(workdir).progress)]
    manifest = schema.read_manifest(dataset)

    def fit_losses(dropout):
        keras.utils.set_random_seed(3)
        model = config_lib.build_model(config.model, manifest.modalities)
        model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate), seed=3,
                      modality_dropout=dropout)
        validation = inputs.choose_validation(manifest, config.train)
        steps = inputs.steps_per_epoch(manifest, validation, 16)
        epoch = inputs.epoch_dataset(tf.distribute.InputContext(), manifest, config, validation, 1, 0,
                                     steps, False)
        means = []
        model.fit(epoch, epochs=1, verbose=0, callbacks=[keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: means.append(float(logs["loss"])))])
        return [means[0]] + [(k + 1) * means[k] - k * means[k - 1] for k in range(1, len(means))]

    np.testing.assert_allclose(fit_losses(0.5), loop_losses, rtol=1e-4)
    assert not np.allclose(fit_losses(0.0), loop_losses, rtol=1e-3)


def test_a_row_without_modality_stops_the_loop_with_a_user_error():
    from bmvae_tf.trainers.training import loop

    model = config_lib.build_model(config_lib.ModelConfig(**TINY, name="mvae"),
                                   synthetic.digits_like_modalities(3))
    batch = synthetic.random_inputs(synthetic.digits_like_modalities(3), 2)
    step = tf.function(lambda b, p: model.loss_terms(b, tf.constant([0, 0]), present=p).per_example)
    with pytest.raises(UserError, match=r"^DATA: a row of `present` has no modality present") as error:
        with loop.no_empty_rows("DATA"):
            step(batch, tf.constant([[True, False, False], [False, False, False]]))
    assert "\n" not in str(error.value)
