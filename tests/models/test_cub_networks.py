"""The CUB networks of Table 6 (bmvae_tf.networks: feature_mlp, sentence_cnn) and their config."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import networks, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import config as config_lib

FEATURES = schema.ModalitySpec("image", "vector", (2048,))
CAPTION = schema.ModalitySpec("caption", "sequence", (32,), "int64", "categorical",
                              vocab=tuple(f"w{i}" for i in range(50)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_feature_mlp_halves_2048_to_256_with_elu_and_mirrors_it():
    encoder = networks.build_encoder(FEATURES, 128, "feature_mlp")
    decoder = networks.build_decoder(FEATURES, "feature_mlp")
    loc, raw_scale = encoder(tf.random.normal([3, 2048]))
    assert loc.shape == raw_scale.shape == (3, 128)
    assert decoder(loc).shape == (3, 2048)
    assert [layer.units for layer in encoder.hidden] == [1024, 512, 256]
    assert [layer.units for layer in decoder.hidden] == [256, 512, 1024]
    assert all(layer.activation.__name__ == "elu" for layer in encoder.hidden + decoder.hidden)


def test_sentence_cnn_maps_32_tokens_to_the_latent_and_back_to_logits():
    encoder = networks.build_encoder(CAPTION, 16, "sentence_cnn")
    decoder = networks.build_decoder(CAPTION, "sentence_cnn")
    tokens = tf.constant(np.random.default_rng(0).integers(0, 50, (4, 32)))
    loc, raw_scale = encoder(tokens)
    assert loc.shape == raw_scale.shape == (4, 16)
    assert decoder(loc).shape == (4, 32, 50)
    # The shapes of Table 6: [32, 128, 1] -> [16, 64, 32] -> [8, 32, 64] -> [4, 16, 128]
    # -> [4, 8, 256] -> [4, 4, 512].
    h = encoder.embedding(tf.cast(tokens, tf.int32))[..., None]
    shapes = []
    for conv in encoder.convs:
        h = conv(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(16, 64, 32), (8, 32, 64), (4, 16, 128), (4, 8, 256), (4, 4, 512)]


def test_cub_networks_refuse_modalities_they_do_not_fit():
    with pytest.raises(ValueError, match="sentence_cnn.*sequences, not vectors"):
        networks.build_encoder(FEATURES, 8, "sentence_cnn")
    short = schema.ModalitySpec("text", "sequence", (8,), "int64", "categorical", vocab=("a", "b"))
    with pytest.raises(ValueError, match="length 32, got 8"):
        networks.build_decoder(short, "sentence_cnn")
    with pytest.raises(UserError, match="model.networks values must be one of"):
        config_lib.from_dict({"model": {"networks": {"image": "transformer"}}})


@pytest.mark.parametrize("name, model, epochs", [("bmvae_m", "bmvae_m", 30), ("bmvae_p", "bmvae_p", 30),
                                                 ("mmvae", "mmvae", 50)])
def test_cub_configs_follow_the_paper(name, model, epochs):
    config = config_lib.from_dict(config_lib.load_yaml(os.path.join(REPO, "configs", "cub", f"{name}.yaml")))
    assert config.model.name == model and config.train.epochs == epochs
    assert config.model.latent_dim == 128
    assert config.model.networks == {"image": "feature_mlp", "caption": "sentence_cnn"}
    built = config_lib.build_model(config.model, [FEATURES, CAPTION])
    assert built.latent_dim == 128
