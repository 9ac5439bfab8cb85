"""Every model trains and evaluates through the CLI on a four-modality arrays dataset (15 subsets)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from bmvae_tf import schema
from bmvae_tf.models import MODELS
from bmvae_tf.schema import subset_key, subset_names
from tests import synthetic
from bmvae_tf.trainers import cli

TINY = ["--set", "model.latent_dim=4", "--set", "model.hidden_units=[16]",
        "--set", "model.channels=[8,8,8]", "--set", "model.sequence_width=8",
        "--set", "train.batch_size=32", "--set", "model.K=2",
        "--set", "eval.max_examples=64", "--set", "eval.classifier_epochs=1",
        "--set", "eval.random_samples=50", "--set", "eval.log_likelihood_samples=8",
        "--set", "eval.log_likelihood_examples=16", "--set", "eval.robustness_noise_levels=[0,1]"]


@pytest.fixture(scope="module")
def four_modalities(tmp_path_factory):
    """A users'-arrays dataset of four modalities of every kind, built by `bmvae data build arrays`
    from an .npz: an 8x8 image, a 16x16x3 uint8 image, a token sequence and a vector, each a
    noisy copy of its class's prototype."""
    rng = np.random.default_rng(0)
    n, classes = 160, 4
    label = rng.integers(0, classes, n)
    digit = rng.uniform(size=(classes, 8, 8))[label] + 0.1 * rng.normal(size=(n, 8, 8))
    photo = rng.integers(0, 256, size=(classes, 16, 16, 3))[label] + rng.integers(-20, 21, (n, 16, 16, 3))
    tokens = rng.integers(0, 12, size=(classes, 6))[label]
    tokens = np.where(rng.uniform(size=tokens.shape) < 0.1, rng.integers(0, 12, tokens.shape), tokens)
    values = {"digit": np.clip(digit, 0, 1).astype(np.float32),
              "photo": np.clip(photo, 0, 255).astype(np.uint8), "tokens": tokens,
              "feat": rng.normal(size=(classes, 5))[label] + 0.3 * rng.normal(size=(n, 5)),
              "label": label}
    root = tmp_path_factory.mktemp("four")
    np.savez(root / "four.npz", **values)
    directory = str(root / "data")
    assert cli.main(["data", "build", "arrays", "--input", str(root / "four.npz"), "--output", directory,
                     "--sequence", "tokens", "--test-fraction", "0.4", "--", "--runner=FnApiRunner"]) == 0
    manifest = schema.read_manifest(directory)
    assert [m.kind for m in manifest.modalities] == ["image", "image", "sequence", "vector"]
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_then_evaluate_every_model_on_four_modalities(name, four_modalities, tmp_path):
    run = str(tmp_path / name)
    assert cli.main(["train", "--data", four_modalities, "--workdir", run, "--model", name,
                     "--epochs", "1", *TINY]) == 0
    assert cli.main(["evaluate", "--workdir", run]) == 0
    with open(f"{run}/metrics.json") as f:
        metrics = json.load(f)
    names = metrics["modalities"]
    expected = [subset_key(s) for s in subset_names(names)]
    assert len(expected) == 15
    assert list(metrics["latent_accuracy"]) == expected
    assert list(metrics["log_likelihood"]) == expected
    assert all(0.0 <= v <= 1.0 for v in metrics["latent_accuracy"].values())
    # every target given every non-empty subset of the other three: 4 * 7
    assert len(metrics["coherence"]) == 28
    assert all(math.isfinite(v) for v in metrics["log_likelihood"].values()), metrics["log_likelihood"]
    weights = metrics["mixture_weights"]
    if name.startswith("bmvae"):
        assert len(weights) == 4 and all(len(row) == 4 for row in weights)
        assert all(abs(sum(row) - 1.0) < 1e-5 for row in weights)
    assert metrics["model"] == name
    assert list(metrics["robustness"]["relative"]) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_receives_its_configured_hyper_parameters(name):
    from bmvae_tf.trainers import config as config_lib

    config = config_lib.from_dict(config_lib.apply_overrides({}, [
        f"model.name={name}", "model.latent_dim=5", "model.K=3", "model.ms.private_dim=2",
        "model.bmvae_m.lambda_c=7", "model.bmvae_p.eta=0.25", "model.mmvae.dreg=true",
        "model.bmvae_p.subset_weights=mean", "model.learn_prior=true"]))
    model = config_lib.build_model(config.model, synthetic.digits_like_modalities(3))
    assert model.learn_prior and model.prior_scale_logits is not None
    # Every importance-sampled model (BMVAE_M and the MMVAE family) must take the configured K.
    if name.startswith(("bmvae_m", "mmvae")):
        assert model.K == 3
    if name.startswith("mmvae"):
        assert model.dreg
    if name == "bmvae_m":
        assert model.lambda_c == 7
    if name == "bmvae_p":
        assert model.eta == 0.25
    shared = 5 if not name.endswith("_ms") else 5 + 3 * 2
    assert model.latent_dim == shared
    # The same for every section the class declares, whatever its name: each field reaches the
    # model as configured, and K goes to every model that importance-samples.
    built = model.get_config()
    for section in type(model).hyper_parameter_sections():
        for key, value in dataclasses.asdict(getattr(config.model, section)).items():
            assert built[key] == value or (value is None and built[key] == 1 / 3), (section, key)
    assert built.get("K") == (3 if type(model).IMPORTANCE_SAMPLED else None)


def test_every_hyper_parameter_section_is_the_models_own_dataclass():
    """model.<section> of the trainer config is the dataclass the models declare, so defaults and
    checks live beside the model only."""
    from bmvae_tf.trainers import config as config_lib

    fields = {f.name: f for f in dataclasses.fields(config_lib.ModelConfig)}
    for cls, _ in MODELS.values():
        for section, hyper_parameters in cls.hyper_parameter_sections().items():
            assert fields[section].type in (hyper_parameters, hyper_parameters.__name__), section
            assert getattr(config_lib.ModelConfig(), section) == hyper_parameters()


@pytest.mark.parametrize("key,value", [
    ("model.bmvae_m.lambda_c", -1), ("model.bmvae_m.tau_low", 0), ("model.bmvae_m.tau_high", 0.1),
    ("model.bmvae_p.lambda_zq", -1), ("model.bmvae_p.lambda_mq", -0.5), ("model.bmvae_p.eta", -0.25),
    ("model.bmvae_p.beta_prior", 0), ("model.ms.private_dim", 0)])
def test_a_bad_hyper_parameter_is_a_user_error_naming_its_key(key, value):
    from bmvae_tf.errors import UserError
    from bmvae_tf.trainers import config as config_lib

    with pytest.raises(UserError, match=rf"{key} must be .*, got {value}"):
        config_lib.from_dict(config_lib.apply_overrides({}, [f"{key}={value}"]))


@pytest.mark.parametrize("key,value,message", [
    ("model.bmvae_p.subset_weights", "median", "must be one of sample, mean"),
    ("model.learn_prior", "1", "must be true or false")])
def test_subset_weights_and_learn_prior_are_checked_by_the_config(key, value, message):
    from bmvae_tf.errors import UserError
    from bmvae_tf.trainers import config as config_lib

    with pytest.raises(UserError, match=rf"{key} {message}"):
        config_lib.from_dict(config_lib.apply_overrides({}, [f"{key}={value}"]))
    assert config_lib.from_dict({}).model.learn_prior is False
    assert config_lib.from_dict({}).model.bmvae_p.subset_weights == "sample"
