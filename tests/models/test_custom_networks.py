"""Custom encoders and decoders (bmvae_tf/custom_networks.py): the contract, its one-line errors,
and "module:factory" names in configs and on the command line."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import bmvae_tf
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cli
from bmvae_tf.trainers import config as config_lib
from tests import synthetic

TINY = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8}
SPECS = synthetic.digits_like_modalities(3)  # digit [8, 8, 1], street [16, 16, 3], text [8]


class DigitEncoder(keras.layers.Layer):
    """A valid encoder of an [8, 8, 1] image: (loc, scale), each [batch, D]."""

    def __init__(self, latent_dim, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.heads = keras.layers.Dense(2 * latent_dim)

    def call(self, x):
        loc, scale = tf.split(self.heads(self.flatten(x)), 2, axis=-1)
        return loc, scale


class DigitDecoder(keras.layers.Layer):
    """A valid decoder of an [8, 8, 1] image: logits [batch, 8, 8, 1]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.out = keras.layers.Dense(64)

    def call(self, z):
        return tf.reshape(self.out(z), [-1, 8, 8, 1])


def make_network(role, spec, latent_dim):
    """A "module:factory" factory: tests.models.test_custom_networks:make_network."""
    assert spec.name == "digit"
    if role == "encoder":
        return DigitEncoder(latent_dim, name="factory_encoder")
    return DigitDecoder(name="factory_decoder")


class Returns(keras.layers.Layer):
    """A layer returning whatever `make(x)` builds from its input."""

    def __init__(self, make, **kwargs):
        super().__init__(**kwargs)
        self.make = make

    def call(self, x):
        return self.make(x)


def _rows(x):
    return tf.shape(x)[0]


def test_custom_layers_are_the_models_networks_and_train(tmp_path):
    encoder, decoder = DigitEncoder(6, name="my_encoder"), DigitDecoder(name="my_decoder")
    model = bmvae_tf.build_model("mmvae_ms", SPECS, encoders={"digit": encoder}, decoders={"digit": decoder},
                                 private_dim=2, seed=0, **TINY)
    assert model.encoders[0] is encoder and model.decoders[0] is decoder
    assert type(model.encoders[1]).__name__ == "ConvImageEncoder"  # the others stay built in
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [w.numpy().copy() for w in encoder.weights + decoder.weights]
    model.fit(synthetic.random_inputs(SPECS, 8), batch_size=8, epochs=1, verbose=0)
    after = [w.numpy() for w in encoder.weights + decoder.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    model.save_weights(str(tmp_path / "custom.weights.h5"))
    with pytest.raises(UserError, match=r"layer objects \(encoders=/decoders=\) saves its weights only"):
        model.save(str(tmp_path / "custom.keras"))


@pytest.mark.parametrize("role, layer, what", [
    ("encoders", Returns(lambda x: tf.zeros([_rows(x), 4]), name="one_tensor"),
     "it returned one tensor of shape [2, 4]; an encoder returns (loc, scale), each [batch, 4]"),
    ("encoders", Returns(lambda x: (tf.zeros([_rows(x), 4]), tf.zeros([_rows(x), 3])), name="narrow"),
     "scale has shape [2, 3], expected [2, 4]"),
    ("encoders", Returns(lambda x: (tf.zeros([_rows(x), 4], tf.int32),) * 2, name="ints"),
     "loc has dtype int32; it must be floating"),
    ("encoders", Returns(lambda x: (x, x, x), name="triple"), "it returned a tuple of 3"),
    ("encoders", Returns(lambda x: tf.reshape(x, [3, -1]), name="raises"),
     "calling it on float32 [2, 8, 8, 1] failed"),
    ("decoders", Returns(lambda z: tf.zeros([_rows(z), 64]), name="flat"),
     "its output has shape [2, 64], expected [2, 8, 8, 1]"),
    ("decoders", Returns(lambda z: (z, z), name="pair"), "it returned a tuple of 2; a decoder returns one tensor"),
])
def test_a_layer_breaking_the_contract_is_a_one_line_error_naming_it(role, layer, what):
    with pytest.raises(UserError) as error:
        bmvae_tf.build_model("mvae", SPECS, **{role: {"digit": layer}}, **TINY)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"modality 'digit': {role[:-1]} '{layer.name}' (Returns) breaks the "
                              f"{role[:-1]} contract: ")
    assert what in message


def test_a_sequence_decoder_must_return_logits_over_the_vocabulary():
    with pytest.raises(UserError, match=r"modality 'text': decoder .* shape \[2, 8\], expected \[2, 8, 28\]"):
        bmvae_tf.build_model("mvae", SPECS, decoders={"text": keras.layers.Dense(8)}, **TINY)


def test_encoders_name_real_modalities_and_real_layers():
    with pytest.raises(UserError, match=r"encoders: no modality 'image' in \['digit', 'street', 'text'\]"):
        bmvae_tf.build_model("mvae", SPECS, encoders={"image": DigitEncoder(4)}, **TINY)
    with pytest.raises(UserError, match="decoders: function is not a keras.layers.Layer"):
        bmvae_tf.build_model("mvae", SPECS, decoders={"digit": lambda z: z}, **TINY)


def test_a_factory_name_in_the_config_builds_the_users_layers():
    config = config_lib.from_dict({"model": {**TINY, "name": "bmvae_m",
                                             "networks": {"digit": f"{__name__}:make_network"}}})
    model = config_lib.build_model(config.model, SPECS)
    model.build_variables()
    assert model.encoders[0].name == "factory_encoder" and model.decoders[0].name == "factory_decoder"
    assert model.get_config()["networks"] == {"digit": f"{__name__}:make_network"}  # as written


@pytest.mark.parametrize("network, message", [
    ("no_such_module_xyz:make", "network 'no_such_module_xyz:make': cannot import 'no_such_module_xyz'"),
    (f"{__name__}:missing", f"network '{__name__}:missing': {__name__} has no function 'missing'"),
])
def test_a_bad_factory_name_is_a_one_line_error(network, message):
    config = config_lib.from_dict({"model": {**TINY, "networks": {"digit": network}}})
    with pytest.raises(UserError, match=message):
        config_lib.build_model(config.model, SPECS)


def test_a_network_that_is_neither_builtin_nor_a_factory_is_refused():
    with pytest.raises(UserError, match='model.networks values must be one of .* or a "module:factory" name'):
        config_lib.from_dict({"model": {"networks": {"digit": "resnet"}}})


@pytest.mark.slow
def test_the_cli_trains_and_loads_a_run_with_a_factory_network(tmp_path):
    data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
    synthetic.write_dataset(data_dir, num_train=32, num_test=16)
    code = cli.main(["train", "--data", data_dir, "--workdir", workdir, *synthetic.TINY_CLI,
                     "--set", "train.epochs=1", "--set", "train.batch_size=16",
                     "--set", f"model.networks.digit={__name__}:make_network"])
    assert code == 0
    run = bmvae_tf.load_run(workdir)
    assert isinstance(run.model.encoders[0], DigitEncoder)
    assert run.config.model.networks == {"digit": f"{__name__}:make_network"}
