"""Tiny MNIST and SVHN files in their published formats, written by the tests themselves.

Every image carries its own identity so tests can check what was paired: pixel [0, 0] of
channel 0 is index % 256, pixel [0, 1] is index // 256 and pixel [0, 2] is the digit; the other
pixels are random.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import scipy.io
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.pipeline import sources

# Per-class counts chosen so that n_c = min(#MNIST, #SVHN) switches side between classes, and one
# class (9) has no SVHN image at all in train.
MNIST_TRAIN_COUNTS = (3, 5, 2, 4, 3, 2, 6, 3, 2, 4)
SVHN_TRAIN_COUNTS = (4, 2, 3, 4, 1, 3, 2, 5, 2, 0)
MNIST_TEST_COUNTS = (2, 1, 2, 1, 2, 1, 2, 1, 2, 1)
SVHN_TEST_COUNTS = (1, 2, 1, 2, 1, 2, 1, 2, 1, 2)


def shuffled_labels(counts, seed: int) -> np.ndarray:
    """Labels with counts[c] of class c, in a random order."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def identity_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 [N, *shape] random images whose first pixels spell (index % 256, index // 256, label)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    index = np.arange(len(labels))
    images[:, 0, 0, 0] = index % 256
    images[:, 0, 1, 0] = index // 256
    images[:, 0, 2, 0] = labels
    return images


def image_identity(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source index, label) spelled by images [N, H, W, C] in [0, 1] or uint8."""
    pixels = np.asarray(images)
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255).astype(np.int64)
    pixels = pixels.astype(np.int64)
    return pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 1, 0], pixels[:, 0, 2, 0]


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file of unsigned bytes (MNIST's format), gzipped when `compress`."""
    array = np.asarray(array, np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(data)


def write_svhn_mat(path: str, images: np.ndarray, labels: np.ndarray, compress: bool = False) -> None:
    """SVHN's format 2: X uint8 [32, 32, 3, N], y double [N, 1] with digit 0 stored as 10."""
    y = np.where(labels == 0, 10, labels).astype(np.float64)[:, None]
    scipy.io.savemat(path, {"X": np.ascontiguousarray(np.transpose(images, (1, 2, 3, 0))), "y": y},
                     do_compression=compress)


def write_raw_source(directory: str, seed: int = 0) -> dict[str, np.ndarray]:
    """All six published files in `directory`; returns the labels {"mnist/train": [N], ...}."""
    os.makedirs(directory, exist_ok=True)
    labels = {}
    counts = {("mnist", "train"): MNIST_TRAIN_COUNTS, ("svhn", "train"): SVHN_TRAIN_COUNTS,
              ("mnist", "test"): MNIST_TEST_COUNTS, ("svhn", "test"): SVHN_TEST_COUNTS}
    for i, ((dataset, split), class_counts) in enumerate(counts.items()):
        y = shuffled_labels(class_counts, seed + i)
        images = identity_images(y, sources.IMAGE_SHAPES[dataset], seed + 10 + i)
        if dataset == "mnist":
            image_file, label_file = sources.MNIST_FILES[split]
            write_idx(os.path.join(directory, image_file), images[..., 0])
            write_idx(os.path.join(directory, label_file), y)
        else:
            # The published SVHN files are compressed; write train compressed, test not.
            write_svhn_mat(os.path.join(directory, sources.SVHN_FILES[split]), images, y,
                           compress=split == "train")
        labels[f"{dataset}/{split}"] = y
    return labels


def read_split(manifest: schema.Manifest, split: str) -> dict[str, np.ndarray]:
    """Every record of a built split, decoded, as arrays keyed by feature."""
    spec = schema.feature_spec(manifest)
    ds = (tf.data.TFRecordDataset(manifest.split_paths(split), compression_type=schema.COMPRESSION)
          .batch(1024).map(lambda x: schema.decode_parsed(manifest, tf.io.parse_example(x, spec))))
    batches = list(ds.as_numpy_iterator())
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def read_bytes(directory: str) -> dict[str, bytes]:
    """Every file of a directory, for byte-identity checks between builds."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}
