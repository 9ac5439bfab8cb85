"""Your own encoders and decoders: any Keras layer that keeps the network contract.

The contract (the built-in networks of `bmvae_tf.networks` keep it too):

- An **encoder** of modality m maps x_m, [batch, *shape] (float32; int64 token ids for
  sequences), to `(loc, scale)`: two floating tensors, each [batch, D], the location and the raw
  scale of the expert q(z | x_m). D is the model's expert width (`latent_dim`; D_c + D_s for the
  *_ms models). The raw scale may be any real number: the model maps it to a positive scale
  (softplus for Gaussian experts, as for the built-in networks).
- A **decoder** of modality m maps latents [batch, D] to the parameters of its likelihood, one
  floating tensor: [batch, *shape] for images (logits of the mean, which is their sigmoid) and
  vectors (the mean), [batch, length, vocab] logits for sequences.

Three ways to give them:
- Python: `bmvae_tf.build_model(..., encoders={"image": layer}, decoders={"image": layer})`, or a
  `CustomNetworks(encoder=..., decoder=...)` as a modality's value in a model's `networks`.
- Config files and the CLI: `model.networks: {image: "my_package.nets:make"}`, where
  `make(role, spec, latent_dim)` returns a Keras layer; role is "encoder" or "decoder", spec the
  modality's `ModalitySpec`, latent_dim the expert width D for encoders and None for decoders
  (which, like the built-in ones, take their input width from their first call).

`check_networks` calls every network once on zeros when the model builds its variables; a layer
that breaks the contract is a UserError naming the modality, the layer and what it returned.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Sequence

import keras
import tensorflow as tf

from bmvae_tf.errors import UserError
from bmvae_tf.schema import ModalitySpec

ROLES = ("encoder", "decoder")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class CustomNetworks:
    """A modality's own layers; None keeps the built-in network `fallback` for that role."""

    encoder: Any = None
    decoder: Any = None
    fallback: str = "auto"

    def get_config(self):
        """Keras asks when saving a whole model (`model.save`, `ModelCheckpoint`): layer objects
        are not a config; their weights save with `save_weights`."""
        raise UserError("a model whose networks are layer objects (encoders=/decoders=) saves "
                        "its weights only: use save_weights or ModelCheckpoint(save_weights_only=True), "
                        "or name the network as \"module:factory\" in model.networks")

    def __post_init__(self):
        for role in ROLES:
            layer = getattr(self, role)
            if layer is not None and not isinstance(layer, keras.layers.Layer):
                raise UserError(f"{role}s: {type(layer).__name__} is not a keras.layers.Layer; "
                                f"an {role} is a Keras layer keeping the {role} contract")


def is_factory_name(network: Any) -> bool:
    """Whether `network` names a factory, "module:function"."""
    return isinstance(network, str) and bool(_FACTORY.match(network))


def load_factory(name: str):
    """The function a "module:function" name points to (imported now)."""
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model.networks: network {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UserError(f"model.networks: network {name!r}: {module_name} has no function {function_name!r}")
    return factory


def custom_layer(spec: ModalitySpec, network: Any, role: str, latent_dim: int | None):
    """The user's layer for this modality and role, or None when `network` is a built-in name
    (or a CustomNetworks without a layer for this role)."""
    if isinstance(network, CustomNetworks):
        return getattr(network, role)
    if is_factory_name(network):
        layer = load_factory(network)(role, spec, latent_dim)
        if not isinstance(layer, keras.layers.Layer):
            raise UserError(f"modality {spec.name!r}: network {network!r} returned a "
                            f"{type(layer).__name__} for the {role}, not a keras.layers.Layer")
        return layer
    return None


def builtin_name(network: Any) -> str:
    """The built-in network that serves where no custom layer is given."""
    return network.fallback if isinstance(network, CustomNetworks) else network


# ------------------------------------------------------------------------- the contract
def _culprit(spec: ModalitySpec, role: str, layer) -> str:
    return (f"modality {spec.name!r}: {role} {layer.name!r} ({type(layer).__name__}) breaks the "
            f"{role} contract")


def _described(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if tf.is_tensor(value) or isinstance(value, keras.KerasTensor):
        return f"one tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _first_line(error: Exception) -> str:
    """The informative line of an error (Keras puts "Exception encountered ..." first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception encountered", "Arguments received"))]
    return (useful or lines or [type(error).__name__])[0][:300]


def _call(spec: ModalitySpec, role: str, layer, x):
    try:
        return layer(x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's layer: any failure is named as theirs
        raise UserError(f"{_culprit(spec, role, layer)}: calling it on {x.dtype.name} "
                        f"{list(x.shape)} failed: {_first_line(e)}") from None


def _check_tensor(spec: ModalitySpec, role: str, layer, what: str, value, expected: Sequence[int]) -> None:
    where = _culprit(spec, role, layer)
    if not tf.is_tensor(value) and not isinstance(value, keras.KerasTensor):
        raise UserError(f"{where}: {what} is {_described(value)}, not a tensor")
    dtype = tf.as_dtype(value.dtype)
    if not dtype.is_floating:
        raise UserError(f"{where}: {what} has dtype {dtype.name}; it must be floating")
    if list(value.shape) != list(expected):
        raise UserError(f"{where}: {what} has shape {list(value.shape)}, expected {list(expected)} "
                        f"([batch, {', '.join(str(s) for s in expected[1:])}])")


def decoder_output_shape(spec: ModalitySpec) -> tuple[int, ...]:
    """The shape of one example's likelihood parameters."""
    return (*spec.shape, spec.vocab_size) if spec.kind == "sequence" else tuple(spec.shape)


def check_encoder(spec: ModalitySpec, layer, expert_dim: int, batch: int = 2) -> None:
    x = tf.zeros([batch, *spec.shape], tf.int64 if spec.dtype == "int64" else tf.float32)
    out = _call(spec, "encoder", layer, x)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise UserError(f"{_culprit(spec, 'encoder', layer)}: it returned {_described(out)}; an "
                        f"encoder returns (loc, scale), each [batch, {expert_dim}]")
    for what, value in zip(("loc", "scale"), out):
        _check_tensor(spec, "encoder", layer, what, value, [batch, expert_dim])


def check_decoder(spec: ModalitySpec, layer, latent_dim: int, batch: int = 2) -> None:
    out = _call(spec, "decoder", layer, tf.zeros([batch, latent_dim]))
    if isinstance(out, (tuple, list)):
        raise UserError(f"{_culprit(spec, 'decoder', layer)}: it returned {_described(out)}; a "
                        f"decoder returns one tensor of likelihood parameters")
    _check_tensor(spec, "decoder", layer, "its output", out, [batch, *decoder_output_shape(spec)])


def check_networks(modalities: Sequence[ModalitySpec], encoders, decoders, expert_dims: Sequence[int],
                   decoder_dims: Sequence[int]) -> None:
    """Calls every encoder, then every decoder, once on zeros (building its variables, in the
    order a forward pass and `generate` would, so a seed gives the same initial weights) and
    checks the contract; UserError naming the first modality and layer that breaks it."""
    for spec, encoder, expert_dim in zip(modalities, encoders, expert_dims):
        check_encoder(spec, encoder, expert_dim)
    for spec, decoder, decoder_dim in zip(modalities, decoders, decoder_dims):
        check_decoder(spec, decoder, decoder_dim)
