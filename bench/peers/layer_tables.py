"""The paper's MNIST-SVHN networks (Table 3; SPEC 6) as a plain layer table both frameworks build.

Pure Python: no TensorFlow, no torch. The MultiVae worker (multivae_worker.py) builds its torch
modules from these tables; tests/bench/test_peers.py checks that bmvae_tf/networks.py builds the
same layers (weight shapes, in order), so the two frameworks time the same networks.

A layer is a tuple:
    ("dense", in_features, out_features, activation)
    ("conv", in_channels, out_channels, kernel, stride, padding, activation)      Conv2d / Conv2D
    ("deconv", in_channels, out_channels, kernel, stride, padding, activation)    transposed
padding is in pixels per side (torch's convention). Keras's "same" with kernel 4 and stride 2 on
an even side pads 1 on each side, and a "valid" layer pads 0, so the outputs have the same sizes.
Every encoder ends in two heads (loc and the raw scale) that read the same trunk; `heads` holds
one of them (the other is a copy). Decoders return the likelihood's parameters; the image mean
is their sigmoid (bmvae_tf.distributions.likelihood), which the torch decoder applies itself,
because MultiVae's Laplace likelihood reads the mean straight from the decoder.
"""

from __future__ import annotations

import math

LATENT = 20
HIDDEN = 400
CHANNELS = (32, 64, 128)
MNIST_SHAPE = (28, 28, 1)     # height, width, channels, as our reader yields it
SVHN_SHAPE = (32, 32, 3)


def mnist_encoder(latent: int = LATENT, hidden: int = HIDDEN) -> dict:
    size = math.prod(MNIST_SHAPE)
    return {"trunk": [("dense", size, hidden, "relu")], "heads": ("dense", hidden, latent, None),
            "flatten_input": True}


def mnist_decoder(latent: int = LATENT, hidden: int = HIDDEN) -> dict:
    size = math.prod(MNIST_SHAPE)
    return {"layers": [("dense", latent, hidden, "relu"), ("dense", hidden, size, None)],
            "output_shape": MNIST_SHAPE}


def svhn_encoder(latent: int = LATENT, channels=CHANNELS) -> dict:
    c_in, trunk = SVHN_SHAPE[2], []
    for c in channels:                                   # 32 -> 16 -> 8 -> 4
        trunk.append(("conv", c_in, c, 4, 2, 1, "relu"))
        c_in = c
    return {"trunk": trunk, "heads": ("conv", c_in, latent, 4, 1, 0, None), "flatten_input": False}


def svhn_decoder(latent: int = LATENT, channels=CHANNELS) -> dict:
    widths = list(channels)[::-1]                        # 128, 64, 32
    layers = [("deconv", latent, widths[0], 4, 1, 0, "relu")]          # 1x1 -> 4x4
    for c_in, c_out in zip(widths, widths[1:]):
        layers.append(("deconv", c_in, c_out, 4, 2, 1, "relu"))          # 4 -> 8 -> 16
    layers.append(("deconv", widths[-1], SVHN_SHAPE[2], 4, 2, 1, None))  # 16 -> 32
    return {"layers": layers, "output_shape": SVHN_SHAPE}


def networks() -> dict:
    """{modality: {"encoder": ..., "decoder": ...}} in manifest order (mnist, svhn)."""
    return {"mnist": {"encoder": mnist_encoder(), "decoder": mnist_decoder()},
            "svhn": {"encoder": svhn_encoder(), "decoder": svhn_decoder()}}


def weight_shapes(layer: tuple) -> list[tuple[int, ...]]:
    """The layer's weights in Keras's layout (kernel, bias): Dense [in, out]; Conv2D
    [k, k, in, out]; Conv2DTranspose [k, k, out, in]."""
    kind = layer[0]
    if kind == "dense":
        _, n_in, n_out, _ = layer
        return [(n_in, n_out), (n_out,)]
    _, c_in, c_out, k, _, _, _ = layer
    if kind == "conv":
        return [(k, k, c_in, c_out), (c_out,)]
    if kind == "deconv":
        return [(k, k, c_out, c_in), (c_out,)]
    raise ValueError(f"unknown layer kind {kind!r}")


def layers_of(part: dict) -> list[tuple]:
    """Every weight layer of an encoder (trunk, loc head, scale head) or decoder, in order."""
    if "layers" in part:
        return list(part["layers"])
    return [*part["trunk"], part["heads"], part["heads"]]


def parameter_count(part: dict) -> int:
    return sum(math.prod(s) for layer in layers_of(part) for s in weight_shapes(layer))


def conv_side(side: int, layer: tuple) -> int:
    """The output side of a conv or deconv layer on a square input of `side`."""
    kind, _, _, k, s, p, _ = layer
    if kind == "conv":
        return (side + 2 * p - k) // s + 1
    return (side - 1) * s - 2 * p + k


def total_parameters(learn_prior: bool, latent: int = LATENT) -> int:
    """Every trainable weight of the two-modality model: networks and the learned prior's scale."""
    return sum(parameter_count(part) for nets in networks().values() for part in nets.values()) + (
        latent if learn_prior else 0)
