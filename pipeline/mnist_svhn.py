"""MNIST-SVHN (Shi et al.) and MNIST-SVHN-Text (Sutter et al.): pure pairing and text logic.

Validation: before pairing, `validation_indices` holds out a seeded validation_fraction of each
class's train images of each dataset; the train split pairs the other train images, the
validation split pairs the held-out ones, and the test split pairs the test images exactly as
before validation splits existed.

Pairing (Shi et al.'s `rand_match_on_idx`, every split alike): for each class c, take the
first n_c = min(#MNIST of class c, #SVHN of class c, max_d) indices of each dataset in index
order among the split's images; the MNIST side of the class is dm concatenated random permutations of its n_c indices
and the SVHN side dm independent ones, giving dm * n_c pairs of the same class.

Pairs are numbered class by class ("class-major position") and then renumbered by a keyed
pseudo-random permutation of [0, P) (`permute_index`), so every shard and every stretch of a
shard holds all classes in random order, while each pair's number is computed alone, without a
list of all pairs anywhere. The Beam job only ever holds the per-class index lists.

Text (Sutter et al.): the English digit name placed at a random start in
[0, TEXT_LENGTH - 1 - len(name)] of TEXT_LENGTH spaces, as token ids over ALPHABET, the 71
symbols of their character models (a-z, 0-9, punctuation with '-' listed twice, space, newline);
a token is the symbol's first position in ALPHABET, as their `alphabet.find`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from bmvae_tf.errors import UserError
from bmvae_tf.pipeline.permutation import permute_index
from bmvae_tf.random_streams import MnistSvhnStream

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(CLASS_NAMES)
# A split's id (its position here) keys its random streams; validation came last, so train and
# test keep their ids (and the test split its records) from before validation splits existed.
SPLITS = ("train", "test", "validation")
# The source split each split's images come from: validation is carved out of the train images.
SOURCE_SPLIT = {"train": "train", "validation": "train", "test": "test"}
MNIST_SHAPE = (28, 28, 1)
SVHN_SHAPE = (32, 32, 3)

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{} \n"
assert len(ALPHABET) == 71
VOCAB = tuple(ALPHABET)
TEXT_LENGTH = 8
SPACE_TOKEN = ALPHABET.index(" ")

DATASET_IDS = {"mnist": 1, "svhn": 2}  # key the validation draw of each source dataset
DEFAULT_MAX_D = 10000
DEFAULT_DM = {"mnist-svhn": 30, "mnist-svhn-text": 20}



def split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return SPLITS.index(split)


@dataclasses.dataclass(frozen=True)
class ClassPlan:
    """The pairs of one class in one split, before they are drawn.

    mnist, svhn: [n] the first n source indices of the class in each dataset, ascending.
    offset: class-major position of the class's first pair; total: pairs in the split (P).
    """

    split: str
    label: int
    mnist: np.ndarray
    svhn: np.ndarray
    offset: int
    total: int

    @property
    def n(self) -> int:
        return len(self.mnist)


def first_indices(labels: np.ndarray, label: int, n: int, pool: np.ndarray | None = None) -> np.ndarray:
    """The first n indices (ascending) whose label is `label`, among `pool` (sorted source
    indices; None: all): [n] int64."""
    labels = np.asarray(labels)
    candidates = np.arange(len(labels)) if pool is None else np.asarray(pool, np.int64)
    return candidates[labels[candidates] == label][:n].astype(np.int64)


def class_counts(mnist_labels: np.ndarray, svhn_labels: np.ndarray, max_d: int,
                 pools: Mapping[str, np.ndarray | None] | None = None) -> list[int]:
    """n_c = min(#MNIST of class c, #SVHN of class c, max_d) for c = 0..9, counting only the
    images in `pools` ({"mnist": indices or None, "svhn": ...}; None: every image)."""
    pools = pools or {}
    mnist = _pooled(mnist_labels, pools.get("mnist"))
    svhn = _pooled(svhn_labels, pools.get("svhn"))
    return [int(min(np.sum(mnist == c), np.sum(svhn == c), max_d)) for c in range(NUM_CLASSES)]


def _pooled(labels: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    labels = np.asarray(labels)
    return labels if pool is None else labels[np.asarray(pool, np.int64)]


def class_plans(mnist_labels: np.ndarray, svhn_labels: np.ndarray, *, split: str, dm: int,
                max_d: int, pools: Mapping[str, np.ndarray | None] | None = None) -> list[ClassPlan]:
    """One ClassPlan per class with n_c >= 1, in class order; P = dm * sum_c n_c.

    Args:
      mnist_labels: [N_mnist] int labels of the MNIST source split, in index order.
      svhn_labels: [N_svhn] int labels of the SVHN source split (0..9, 10 already mapped to 0).
      pools: {"mnist": sorted indices, "svhn": ...}, the images this split may pair (the
        validation images, or the train images without them); None pairs every image.
    """
    pools = pools or {}
    counts = class_counts(mnist_labels, svhn_labels, max_d, pools)
    total = dm * sum(counts)
    plans, offset = [], 0
    for c, n in enumerate(counts):
        if n == 0:
            continue
        plans.append(ClassPlan(split, c, first_indices(mnist_labels, c, n, pools.get("mnist")),
                               first_indices(svhn_labels, c, n, pools.get("svhn")), offset, total))
        offset += dm * n
    return plans


def validation_indices(labels: np.ndarray, fraction: float, *, seed: int, dataset: str) -> np.ndarray:
    """The train images of one dataset held out for validation: of the n_c images of class c,
    round(fraction * n_c) (at least one when n_c >= 2, and never all of them), drawn from stream
    (seed, VALIDATION, dataset, c). Sorted int64 indices."""
    labels = np.asarray(labels)
    held = []
    for c in range(NUM_CLASSES):
        idx_c = np.flatnonzero(labels == c)
        k = min(max(int(round(fraction * len(idx_c))), 1), len(idx_c) - 1) if len(idx_c) >= 2 else 0
        rng = np.random.default_rng([seed, MnistSvhnStream.VALIDATION, DATASET_IDS[dataset], c])
        held.append(rng.permutation(idx_c)[:k])
    return np.sort(np.concatenate(held)).astype(np.int64)


def expand_plan(plan: ClassPlan, *, dm: int, seed: int, with_text: bool
                ) -> dict[str, np.ndarray]:
    """Draws a class's dm * n pairs.

    Returns {"index": [dm*n] pair numbers in [0, P) (unique over the split), "mnist": [dm*n],
    "svhn": [dm*n] source indices, "text_start": [dm*n] (only with_text)}.
    Depends only on (seed, split, class), so workers can draw classes in any order.
    """
    rng = np.random.default_rng([seed, MnistSvhnStream.PAIRING, split_id(plan.split), plan.label])
    mnist_parts, svhn_parts = [], []
    for _ in range(dm):  # as rand_match_on_idx: one permutation of each side per round
        mnist_parts.append(rng.permutation(plan.mnist))
        svhn_parts.append(rng.permutation(plan.svhn))
    positions = plan.offset + np.arange(dm * plan.n, dtype=np.int64)
    out = {"index": permute_index(positions, plan.total, (seed, MnistSvhnStream.ORDER, split_id(plan.split))),
           "mnist": np.concatenate(mnist_parts), "svhn": np.concatenate(svhn_parts)}
    if with_text:
        text_rng = np.random.default_rng([seed, MnistSvhnStream.TEXT, split_id(plan.split), plan.label])
        out["text_start"] = text_rng.integers(0, max_text_start(plan.label) + 1, size=dm * plan.n)
    return out


# --------------------------------------------------------------------------------------------
# Text


def max_text_start(label: int) -> int:
    """The largest start of class `label`'s name: TEXT_LENGTH - 1 - len(name) (Sutter et al.)."""
    return TEXT_LENGTH - 1 - len(CLASS_NAMES[label])


def text_tokens(label: int, start: int) -> np.ndarray:
    """[TEXT_LENGTH] int64 token ids: the class name at `start`, spaces elsewhere."""
    if not 0 <= start <= max_text_start(label):
        raise ValueError(f"start {start} outside [0, {max_text_start(label)}] for {CLASS_NAMES[label]!r}")
    tokens = np.full(TEXT_LENGTH, SPACE_TOKEN, np.int64)
    tokens[start:start + len(CLASS_NAMES[label])] = [ALPHABET.index(ch) for ch in CLASS_NAMES[label]]
    return tokens


def decode_text(tokens: np.ndarray) -> str:
    """Token ids -> the string of their symbols."""
    return "".join(VOCAB[int(t)] for t in np.asarray(tokens))


def text_padding_spec(modality: str = "text", start_metadata: str = "text_pad") -> dict:
    """The manifest's `text_padding` entry: how the reader may re-draw a text's padding.

    A text there is one word of non-space tokens in spaces, ending before the last position;
    `trainers.input_pipeline` moves the word to a uniformly drawn start in
    [0, length - 1 - len(word)] when dynamic_text_padding is on (the default for this dataset).
    """
    return {"modality": modality, "space_token": SPACE_TOKEN, "length": TEXT_LENGTH,
            "start_metadata": start_metadata, "dynamic_default": True}


def check_labels(labels: Mapping[str, np.ndarray]) -> None:
    """Every label must be a digit 0..9 (sources map SVHN's 10 to 0 before this)."""
    for where, values in labels.items():
        values = np.asarray(values)
        if values.size and (values.min() < 0 or values.max() >= NUM_CLASSES):
            raise UserError(f"{where}: labels must be digits 0..9, found "
                            f"{int(values.min())}..{int(values.max())}")
