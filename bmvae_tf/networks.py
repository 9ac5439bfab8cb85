"""Encoders and decoders, chosen by modality kind (SPEC 6 gives the paper's Tables 3 and 8).

Encoders map one modality [batch, *shape] to (loc, raw_scale), each [batch, D]. Decoders map
latents [batch, D] to likelihood parameters: [batch, *shape] for images and vectors, logits
[batch, L, V] for sequences.

- images: a CNN when the image is square with side 4 * 2^n (n >= 1), else an MLP. The CNN is
  Table 3's SVHN network: stride-2 convolutions (kernel 4) down to 4x4, a kernel-4 head, and the
  mirror image in transposed convolutions.
- sequences: Table 8's text network: one-hot tokens as channels, 1-D convolutions.
- vectors: an MLP (Table 3's MNIST network has one hidden layer of 400).
- your own layers (`custom_networks`): a `CustomNetworks` or a "module:factory" name.
- CUB (Table 6, after Shi et al.'s code), chosen by name in `model.networks`:
  `feature_mlp` for ResNet feature vectors (widths halving 2048-1024-512-256 with ELU, and the
  mirror image), `sentence_cnn` for captions of 32 tokens (a 128-d embedding read as a
  one-channel 32 x 128 image by 2-D convolutions, and the mirror image ending in a linear map to
  the vocabulary). Table 6 puts BatchNorm after each convolution; ours have none, because the
  training loop does not call layers in training mode, where BatchNorm would only apply its
  initial statistics. Shi et al. tie the output map to the embedding; ours are separate.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import tensorflow as tf

from bmvae_tf import custom_networks
from bmvae_tf.schema import ModalitySpec

NETWORKS = ("auto", "mlp", "cnn", "feature_mlp", "sentence_cnn")
SENTENCE_CNN_LENGTH = 32
SENTENCE_CNN_EMBEDDING = 128


def conv_depth(side: int) -> int:
    """Number of stride-2 halvings from `side` down to 4, or 0 if `side` is not 4 * 2^n."""
    if side < 8 or side % 4:
        return 0
    n = math.log2(side // 4)
    return int(n) if n == int(n) else 0


def resolve_network(spec: ModalitySpec, network: str = "auto") -> str:
    if network not in NETWORKS:
        raise ValueError(f"modality {spec.name!r}: network {network!r} is not one of {NETWORKS}")
    fits = {"feature_mlp": "vector", "sentence_cnn": "sequence"}
    if network in fits:
        if spec.kind != fits[network]:
            raise ValueError(f"modality {spec.name!r}: network {network!r} is for {fits[network]}s, "
                             f"not {spec.kind}s")
        if network == "sentence_cnn" and spec.shape[0] != SENTENCE_CNN_LENGTH:
            raise ValueError(f"modality {spec.name!r}: sentence_cnn needs sequences of length "
                             f"{SENTENCE_CNN_LENGTH}, got {spec.shape[0]}")
        return network
    if spec.kind == "sequence":
        return "sequence"
    if spec.kind == "vector":
        return "mlp"
    height, width, _ = spec.shape
    cnn_ok = height == width and conv_depth(height) > 0
    if network == "cnn" and not cnn_ok:
        raise ValueError(f"modality {spec.name!r}: a CNN needs a square image of side 4*2^n, "
                         f"got {list(spec.shape)}")
    if network == "auto":
        return "cnn" if cnn_ok else "mlp"
    return network


class MLPEncoder(keras.layers.Layer):
    def __init__(self, latent_dim: int, hidden_units: Sequence[int] = (400,), **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.hidden_units = tuple(hidden_units)
        self.flatten = keras.layers.Flatten()
        self.hidden = [keras.layers.Dense(u, activation="relu") for u in self.hidden_units]
        self.loc_head = keras.layers.Dense(latent_dim, name="loc")
        self.scale_head = keras.layers.Dense(latent_dim, name="raw_scale")

    def call(self, x):
        h = self.flatten(tf.cast(x, self.compute_dtype))
        for layer in self.hidden:
            h = layer(h)
        return self.loc_head(h), self.scale_head(h)


class MLPDecoder(keras.layers.Layer):
    def __init__(self, output_shape: Sequence[int], hidden_units: Sequence[int] = (400,), **kwargs):
        super().__init__(**kwargs)
        self.target_shape = tuple(output_shape)
        self.hidden = [keras.layers.Dense(u, activation="relu") for u in hidden_units]
        self.out = keras.layers.Dense(math.prod(self.target_shape))

    def call(self, z):
        h = z
        for layer in self.hidden:
            h = layer(h)
        return tf.reshape(self.out(h), [-1, *self.target_shape])


class ConvImageEncoder(keras.layers.Layer):
    """Table 3's SVHN encoder, generalised to square images of side 4 * 2^n."""

    def __init__(self, latent_dim: int, side: int, channels: Sequence[int] = (32, 64, 128), **kwargs):
        super().__init__(**kwargs)
        depth = conv_depth(side)
        if depth == 0 or depth > len(channels):
            raise ValueError(f"no CNN for side {side} with channels {list(channels)}")
        self.convs = [keras.layers.Conv2D(c, 4, strides=2, padding="same", activation="relu")
                      for c in channels[:depth]]
        self.loc_head = keras.layers.Conv2D(latent_dim, 4, padding="valid", name="loc")
        self.scale_head = keras.layers.Conv2D(latent_dim, 4, padding="valid", name="raw_scale")

    def call(self, x):
        h = tf.cast(x, self.compute_dtype)
        for conv in self.convs:
            h = conv(h)
        return tf.squeeze(self.loc_head(h), [1, 2]), tf.squeeze(self.scale_head(h), [1, 2])


class ConvImageDecoder(keras.layers.Layer):
    """Table 3's SVHN decoder: a kernel-4 transposed conv to 4x4, then stride-2 ones up to size."""

    def __init__(self, output_shape: Sequence[int], channels: Sequence[int] = (32, 64, 128), **kwargs):
        super().__init__(**kwargs)
        side, _, out_channels = output_shape
        depth = conv_depth(side)
        if depth == 0 or depth > len(channels):
            raise ValueError(f"no CNN for side {side} with channels {list(channels)}")
        widths = list(channels[:depth])[::-1]  # e.g. 128, 64, 32
        self.stem = keras.layers.Conv2DTranspose(widths[0], 4, padding="valid", activation="relu")
        self.ups = [keras.layers.Conv2DTranspose(w, 4, strides=2, padding="same", activation="relu")
                    for w in widths[1:]]
        self.out = keras.layers.Conv2DTranspose(out_channels, 4, strides=2, padding="same")

    def call(self, z):
        h = self.stem(z[:, None, None, :])
        for up in self.ups:
            h = up(h)
        return self.out(h)


class SequenceEncoder(keras.layers.Layer):
    """Table 8's text encoder: one-hot [L, V] as V channels; conv k1, then k4 stride 2 to length 4,
    then a k4 valid conv to length 1, ReLU after each; linear heads."""

    def __init__(self, latent_dim: int, vocab_size: int, length: int, width: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        layers = [keras.layers.Conv1D(width, 1, activation="relu")]
        current = length
        while current > 4 and current % 2 == 0:
            layers.append(keras.layers.Conv1D(width, 4, strides=2, padding="same", activation="relu"))
            current //= 2
        if current == 4:
            layers.append(keras.layers.Conv1D(width, 4, padding="valid", activation="relu"))
        self.convs = layers
        self.flatten = keras.layers.Flatten()
        self.loc_head = keras.layers.Dense(latent_dim, name="loc")
        self.scale_head = keras.layers.Dense(latent_dim, name="raw_scale")

    def call(self, tokens):
        h = tf.one_hot(tf.cast(tokens, tf.int32), self.vocab_size, dtype=self.compute_dtype)
        for conv in self.convs:
            h = conv(h)
        h = self.flatten(h)
        return self.loc_head(h), self.scale_head(h)


class SequenceDecoder(keras.layers.Layer):
    """Table 8's text decoder: linear to width, transposed conv k4 to length 4 (when the length
    halves down to 4), stride-2 transposed convs back up, ReLU, conv k1 to V logits."""

    def __init__(self, vocab_size: int, length: int, width: int = 128, **kwargs):
        super().__init__(**kwargs)
        halvings, current = 0, length
        while current > 4 and current % 2 == 0:
            halvings, current = halvings + 1, current // 2
        self.start_length = current
        # Linear, as Sutter et al.'s DecoderText: the ReLUs follow the transposed convolutions.
        self.dense = keras.layers.Dense(width)
        if current == 4:
            self.stem = keras.layers.Conv1DTranspose(width, 4, padding="valid", activation="relu")
        else:  # lengths that do not halve to 4 start from a dense layer of the whole length
            self.stem = keras.layers.Dense(current * width, activation="relu")
        self.width = width
        self.ups = [keras.layers.Conv1DTranspose(width, 4, strides=2, padding="same", activation="relu")
                    for _ in range(halvings)]
        self.out = keras.layers.Conv1D(vocab_size, 1)

    def call(self, z):
        h = self.dense(z)
        if self.start_length == 4:
            h = self.stem(h[:, None, :])
        else:
            h = tf.reshape(self.stem(h), [-1, self.start_length, self.width])
        for up in self.ups:
            h = up(h)
        return self.out(h)


class FeatureEncoder(keras.layers.Layer):
    """Table 6's image-feature encoder: Dense layers halving the width with ELU from the input
    size down to 256 (2048-1024-512-256), then linear heads."""

    def __init__(self, latent_dim: int, input_dim: int, bottleneck: int = 256, **kwargs):
        super().__init__(**kwargs)
        widths, width = [], input_dim // 2
        while width >= bottleneck:
            widths.append(width)
            width //= 2
        self.hidden = [keras.layers.Dense(w, activation="elu") for w in widths]
        self.loc_head = keras.layers.Dense(latent_dim, name="loc")
        self.scale_head = keras.layers.Dense(latent_dim, name="raw_scale")

    def call(self, x):
        h = tf.cast(x, self.compute_dtype)
        for layer in self.hidden:
            h = layer(h)
        return self.loc_head(h), self.scale_head(h)


class FeatureDecoder(keras.layers.Layer):
    """Table 6's image-feature decoder: 256-512-1024 with ELU, then linear to the feature size."""

    def __init__(self, output_dim: int, bottleneck: int = 256, **kwargs):
        super().__init__(**kwargs)
        widths, width = [], bottleneck
        while width < output_dim:
            widths.append(width)
            width *= 2
        self.hidden = [keras.layers.Dense(w, activation="elu") for w in widths]
        self.out = keras.layers.Dense(output_dim)

    def call(self, z):
        h = z
        for layer in self.hidden:
            h = layer(h)
        return self.out(h)


class SentenceCNNEncoder(keras.layers.Layer):
    """Table 6's caption encoder: tokens [B, 32] -> embedding [B, 32, 128, 1]; Conv2D 32, 64, 128
    (kernel 4, stride 2) to [4, 16], then 256, 512 (kernel (1, 4), stride (1, 2)) to [4, 4], ReLU
    after each; kernel-4 valid convolutions as heads."""

    def __init__(self, latent_dim: int, vocab_size: int, base_channels: int = 32, **kwargs):
        super().__init__(**kwargs)
        c = base_channels
        self.embedding = keras.layers.Embedding(vocab_size, SENTENCE_CNN_EMBEDDING)
        self.convs = [keras.layers.Conv2D(w, 4, strides=2, padding="same", activation="relu")
                      for w in (c, 2 * c, 4 * c)]
        self.convs += [keras.layers.Conv2D(w, (1, 4), strides=(1, 2), padding="same", activation="relu")
                       for w in (8 * c, 16 * c)]
        self.loc_head = keras.layers.Conv2D(latent_dim, 4, padding="valid", name="loc")
        self.scale_head = keras.layers.Conv2D(latent_dim, 4, padding="valid", name="raw_scale")

    def call(self, tokens):
        h = self.embedding(tf.cast(tokens, tf.int32))[..., None]
        for conv in self.convs:
            h = conv(h)
        return tf.squeeze(self.loc_head(h), [1, 2]), tf.squeeze(self.scale_head(h), [1, 2])


class SentenceCNNDecoder(keras.layers.Layer):
    """Table 6's caption decoder: transposed convolutions mirroring the encoder from [1, 1] to a
    one-channel [32, 128] (ReLU), then a linear map of each position's 128 values to the
    vocabulary: logits [B, 32, V]."""

    def __init__(self, vocab_size: int, base_channels: int = 32, **kwargs):
        super().__init__(**kwargs)
        c = base_channels
        self.stem = keras.layers.Conv2DTranspose(16 * c, 4, padding="valid", activation="relu")
        self.ups = [keras.layers.Conv2DTranspose(w, (1, 4), strides=(1, 2), padding="same",
                                                 activation="relu") for w in (8 * c, 4 * c)]
        self.ups += [keras.layers.Conv2DTranspose(w, 4, strides=2, padding="same", activation="relu")
                     for w in (2 * c, c, 1)]
        self.out = keras.layers.Dense(vocab_size)

    def call(self, z):
        h = self.stem(z[:, None, None, :])
        for up in self.ups:
            h = up(h)
        return self.out(h[..., 0])


def build_encoder(spec: ModalitySpec, latent_dim: int, network="auto",
                  hidden_units: Sequence[int] = (400,), channels: Sequence[int] = (32, 64, 128),
                  sequence_width: int = 128) -> keras.layers.Layer:
    """The encoder of one modality. network: a name of NETWORKS, a "module:factory" name or a
    `custom_networks.CustomNetworks` (the user's layers, kept as they are)."""
    custom = custom_networks.custom_layer(spec, network, "encoder", latent_dim)
    if custom is not None:
        return custom
    kind = resolve_network(spec, custom_networks.builtin_name(network))
    name = f"encoder_{spec.name}"
    if kind == "feature_mlp":
        return FeatureEncoder(latent_dim, spec.shape[0], name=name)
    if kind == "sentence_cnn":
        return SentenceCNNEncoder(latent_dim, spec.vocab_size, name=name)
    if kind == "sequence":
        return SequenceEncoder(latent_dim, spec.vocab_size, spec.shape[0], sequence_width, name=name)
    if kind == "cnn":
        return ConvImageEncoder(latent_dim, spec.shape[0], channels, name=name)
    return MLPEncoder(latent_dim, hidden_units, name=name)


def build_decoder(spec: ModalitySpec, network="auto",
                  hidden_units: Sequence[int] = (400,), channels: Sequence[int] = (32, 64, 128),
                  sequence_width: int = 128) -> keras.layers.Layer:
    """The decoder of one modality; it takes its latent width from its first call. network: as
    for `build_encoder`."""
    custom = custom_networks.custom_layer(spec, network, "decoder", None)
    if custom is not None:
        return custom
    kind = resolve_network(spec, custom_networks.builtin_name(network))
    name = f"decoder_{spec.name}"
    if kind == "feature_mlp":
        return FeatureDecoder(spec.shape[0], name=name)
    if kind == "sentence_cnn":
        return SentenceCNNDecoder(spec.vocab_size, name=name)
    if kind == "sequence":
        return SequenceDecoder(spec.vocab_size, spec.shape[0], sequence_width, name=name)
    if kind == "cnn":
        return ConvImageDecoder(spec.shape, channels, name=name)
    return MLPDecoder(spec.shape, hidden_units, name=name)
