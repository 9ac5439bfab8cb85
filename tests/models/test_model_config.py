"""Every model's Keras config round-trips, and its hyper-parameters are declared once, beside it."""

import dataclasses
import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf.models import MODELS, HyperParameterError
from bmvae_tf.models.bmvae_m import BMVAEM
from bmvae_tf.models.bmvae_p import BMVAEP
from bmvae_tf.models.mvae_ms import MVAEMS
from tests import synthetic

# A value other than the default for every field of every hyper-parameter section.
NON_DEFAULT = {
    "bmvae_m": dict(lambda_c=3.5, tau_low=0.25, tau_high=1.5),
    "bmvae_p": dict(lambda_zq=0.7, lambda_mq=0.2, lambda_mz=0.3, eta=0.25, beta_prior=0.8,
                    subset_weights="mean"),
    "mmvae": dict(dreg=True),
    "ms": dict(private_dim=2),
}


def _build(name, specs):
    cls, fixed = MODELS[name]
    kwargs = dict(synthetic.TINY_NETWORKS, posterior="gaussian", likelihood_scale=0.5,
                  networks={"street": "mlp"}, learn_prior=True, name=name, **fixed)
    if cls.IMPORTANCE_SAMPLED:
        kwargs["K"] = 3
    for section in cls.hyper_parameter_sections():
        kwargs.update(NON_DEFAULT[section])
    return cls(specs, 3, **kwargs)


def test_every_section_has_non_default_values():
    for section, hyper_parameters in {s: t for cls, _ in MODELS.values()
                                      for s, t in cls.hyper_parameter_sections().items()}.items():
        defaults = dataclasses.asdict(hyper_parameters())
        assert set(NON_DEFAULT[section]) == set(defaults), section
        assert all(NON_DEFAULT[section][k] != v for k, v in defaults.items()), section


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_round_trips_to_the_same_model(name):
    specs = synthetic.digits_like_modalities(3)
    model = _build(name, specs)
    config = model.get_config()
    for section in type(model).hyper_parameter_sections():
        assert {k: config[k] for k in NON_DEFAULT[section]} == NON_DEFAULT[section]
    assert ("K" in config) == type(model).IMPORTANCE_SAMPLED
    assert config["learn_prior"] is True

    rebuilt = type(model).from_config(json.loads(json.dumps(config)))       # JSON-serialisable
    assert type(rebuilt) is type(model)
    assert rebuilt.get_config() == config
    assert rebuilt.latent_dim == model.latent_dim

    inputs, seed = synthetic.random_inputs(specs, 4), tf.constant([5, 6])
    expected = model.loss_terms(inputs, seed)                                # builds the layers
    rebuilt.loss_terms(inputs, seed)
    rebuilt.set_weights(model.get_weights())
    got = rebuilt.loss_terms(inputs, seed)
    np.testing.assert_array_equal(got.per_example.numpy(), expected.per_example.numpy())
    assert float(got.global_term) == float(expected.global_term)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_constructor_defaults_are_the_dataclass_defaults(name):
    """The declaring class's __init__ takes each hyper-parameter with the dataclass's default."""
    cls, _ = MODELS[name]
    for klass in cls.__mro__:
        for hyper_parameters in vars(klass).get("HYPER_PARAMETERS", {}).values():
            parameters = inspect.signature(klass.__init__).parameters
            for field in dataclasses.fields(hyper_parameters):
                assert parameters[field.name].default == field.default, (klass, field.name)


@pytest.mark.parametrize("cls,kwargs,field", [
    (BMVAEM, dict(lambda_c=-1.0), "lambda_c"),
    (BMVAEM, dict(tau_low=0.0), "tau_low"),
    (BMVAEM, dict(tau_low=1.0, tau_high=0.5), "tau_high"),
    (BMVAEP, dict(lambda_mq=-0.1), "lambda_mq"),
    (BMVAEP, dict(eta=-1.0), "eta"),
    (BMVAEP, dict(beta_prior=0.0), "beta_prior"),
    (BMVAEP, dict(subset_weights="median"), "subset_weights"),
    (MVAEMS, dict(private_dim=0), "private_dim"),
])
def test_constructor_rejects_a_bad_hyper_parameter_by_name(cls, kwargs, field):
    with pytest.raises(HyperParameterError, match=f"^{field} must") as caught:
        cls(synthetic.digits_like_modalities(2), 3, posterior="gaussian", **kwargs)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
