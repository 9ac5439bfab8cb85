"""The paper's configs in configs/: each loads, builds its model on data of its dataset's shapes,
and carries the paper's settings; the networks are those of Tables 3 and 8."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf.pipeline import build_cub, build_digits, build_mnist_svhn
from tests.synthetic import random_inputs
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
# Config folder -> the manifest (without splits) of the dataset its configs train on.
DATASETS = {
    "digits": lambda: build_digits.manifest_template(source={}, pipeline_options={}),
    "mnist_svhn": lambda: build_mnist_svhn.manifest_template("mnist-svhn", source={}, pipeline_options={}),
    "mnist_svhn_text": lambda: build_mnist_svhn.manifest_template("mnist-svhn-text", source={},
                                                                  pipeline_options={}),
    "cub": lambda: build_cub.manifest_template(source={}, pipeline_options={}),
}
# configs/search/ holds `bmvae tune`'s search spaces, not configs (tests/trainers/test_tune.py).
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*", "*.yaml"))
                      if os.path.basename(os.path.dirname(p)) != "search")


def load(path: str) -> config_lib.Config:
    return config_lib.from_dict(config_lib.load_yaml(path), source=path)


def test_every_config_folder_names_a_dataset():
    assert {os.path.basename(os.path.dirname(p)) for p in CONFIG_FILES} == set(DATASETS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_config_loads_and_builds_its_model_on_its_data(path):
    config = load(path)
    manifest = DATASETS[os.path.basename(os.path.dirname(path))]()
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    batch = random_inputs(manifest.modalities, batch=2, seed=1)
    terms = model.loss_terms(batch, tf.constant([0, 1], tf.int32))
    assert terms.per_example.shape == (2,)
    assert np.all(np.isfinite(terms.per_example.numpy())) and np.isfinite(float(terms.global_term))
    generated = model.generate(tf.zeros([2, model.latent_dim]))  # *_ms models: D_c + M D_s
    assert {k: tuple(v.shape) for k, v in generated.items()} == {
        m.name: (2, *m.shape) for m in manifest.modalities}


@pytest.mark.parametrize("name", ["bmvae_m", "mmvae"])
def test_mnist_svhn_configs_carry_section_6_1(name):
    config = load(os.path.join(CONFIGS, "mnist_svhn", f"{name}.yaml"))
    m, t = config.model, config.train
    assert (m.latent_dim, m.posterior, m.likelihood_scale, m.K) == (20, "laplace", 0.75, 30)
    assert (t.epochs, t.batch_size, t.learning_rate) == (30, 128, 1e-3)
    assert not m.likelihood_weights  # the manifest's 3072/784 and 1 apply


def test_mnist_svhn_text_configs_carry_section_6_3():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, "mnist_svhn_text", "*.yaml"))}
    assert {"bmvae_m", "bmvae_m_iwae", "bmvae_p", "bmvae_m_uniform", "bmvae_p_uniform", "mmvae", "mvae",
            "mmjsd", "mvae_ms", "mmvae_ms", "mmjsd_ms"} <= names
    for name in names:
        config = load(os.path.join(CONFIGS, "mnist_svhn_text", f"{name}.yaml"))
        assert (config.model.latent_dim, config.model.posterior) == (20, "gaussian"), name
        # "The modality-specific versions of MVAE, MMVAE and mmJSD are trained for 100 epochs."
        epochs = 100 if name.endswith("_ms") else 50
        assert (config.train.epochs, config.train.batch_size) == (epochs, 256), name
        assert config.model.name == (name if name != "bmvae_m_iwae" else "bmvae_m"), name
        assert config.data.dynamic_text_padding is None  # the dataset's default: on
    assert load(os.path.join(CONFIGS, "mnist_svhn_text", "bmvae_m.yaml")).model.K == 1
    assert load(os.path.join(CONFIGS, "mnist_svhn_text", "bmvae_m_iwae.yaml")).model.K > 1


def parameters(layer) -> int:
    return int(sum(np.prod(w.shape) for w in layer.weights))


def test_networks_are_those_of_tables_3_and_8():
    config = load(os.path.join(CONFIGS, "mnist_svhn_text", "bmvae_m.yaml"))
    manifest = DATASETS["mnist_svhn_text"]()
    model = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(model, manifest)
    encoders = dict(zip(manifest.modality_names, model.encoders))
    decoders = dict(zip(manifest.modality_names, model.decoders))
    # Layer by layer from the tables (weights + biases; kernel 4 convolutions have 16 or 4 taps).
    expected_encoders = {
        "mnist": 784 * 400 + 400 + 2 * (400 * 20 + 20),
        "svhn": (3 * 32 * 16 + 32) + (32 * 64 * 16 + 64) + (64 * 128 * 16 + 128) + 2 * (128 * 20 * 16 + 20),
        "text": (71 * 128 + 128) + 2 * (128 * 128 * 4 + 128) + 2 * (128 * 20 + 20),
    }
    expected_decoders = {
        "mnist": (20 * 400 + 400) + (400 * 784 + 784),
        "svhn": (20 * 128 * 16 + 128) + (128 * 64 * 16 + 64) + (64 * 32 * 16 + 32) + (32 * 3 * 16 + 3),
        "text": (20 * 128 + 128) + 2 * (128 * 128 * 4 + 128) + (128 * 71 + 71),
    }
    assert {k: parameters(v) for k, v in encoders.items()} == expected_encoders
    assert {k: parameters(v) for k, v in decoders.items()} == expected_decoders
    # Table 8's text decoder: the linear layer has no activation; the ReLUs follow the convolutions.
    import keras

    assert decoders["text"].dense.activation is keras.activations.linear
    assert decoders["text"].stem.activation is keras.activations.relu


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_mnist_svhn_and_cub_configs_learn_the_prior_as_shi_et_al(path):
    """Shi et al.'s MNIST-SVHN and CUB recipe trains with --learn-prior (SPEC section 6); the
    other configs keep the fixed prior."""
    folder = os.path.basename(os.path.dirname(path))
    assert load(path).model.learn_prior is (folder in ("mnist_svhn", "cub"))
