"""The embedded Digits dataset: pure functions, no Beam and no I/O.

Source: the 1797 real 8x8 handwritten digits of `sklearn.datasets.load_digits` (pixels 0..16,
labels 0..9). Each example is a pair of two different source images of the same class, as Shi et
al. pair MNIST with SVHN, rendered into three modalities:

- `digit`  [8, 8, 1]   float32 in [0, 1]: the first source image, pixels / 16;
- `street` [16, 16, 3] float32 in [0, 1]: an SVHN-like rendering of the second source image
  (upsampled, coloured foreground on a coloured background, shifted, noisy);
- `text`   [8]         int64 token ids over `VOCAB`: the class name at a random offset.

The Beam job (`pipeline/build_digits.py`) computes the pair list in the driver with
`split_sources` and `make_pairs`, and renders each pair on the workers with `render_pair`.
Every random draw is keyed by the seed (and split and pair index), so the output does not depend
on how Beam bundles the work.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping

import numpy as np
from scipy import ndimage

from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import DigitsStream
from bmvae_tf.schema import DEFAULT_VALIDATION_FRACTION

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = len(CLASS_NAMES)
# Token 0 is padding by convention of the text decoders; the renderer pads with spaces instead
# (as MNIST-SVHN-Text does), so every position carries a real character.
VOCAB = ("<pad>", " ", *string.ascii_lowercase)
TEXT_LENGTH = 8

PIXEL_MAX = 16.0  # load_digits stores 4-bit intensities
DIGIT_SHAPE = (8, 8, 1)
STREET_SHAPE = (16, 16, 3)
STREET_ZOOM = STREET_SHAPE[0] // DIGIT_SHAPE[0]
MAX_SHIFT = 2  # street shifts (dy, dx) are uniform integers in [-MAX_SHIFT, MAX_SHIFT]
# Mean |fg - bg| over RGB. At 0.3 a supervised CNN read only 87% of street digits after 12 epochs
# and BMVAE_M's street expert learned little of the class; at 0.5 it reads 91%, about as legible
# as SVHN, while colours stay random.
MIN_CONTRAST = 0.5
NOISE_STD = 0.05

# A split's id (its position here) keys its random streams; validation came last, so train and
# test keep the ids (and the test split the records) they had before it existed.
SPLITS = ("train", "test", "validation")

# Per-example metadata written next to the modalities (key -> shape), in manifest order.
METADATA_SHAPES: Mapping[str, tuple[int, ...]] = {
    "street_fg": (3,), "street_bg": (3,), "street_shift": (2,), "text_pad": (1,),
    "digit_source": (1,), "street_source": (1,),
}

# The metadata that are ground-truth private factors, and the modality each belongs to: the street
# style (colours and shift) and the text padding carry nothing of the class. The manifest
# declares them (`factors`), and `bmvae analyze` checks that the latent dimensions the mixture
# weights call private carry them. The source indices are identities, not factors.
PRIVATE_FACTORS: Mapping[str, str] = {
    "street_fg": "street", "street_bg": "street", "street_shift": "street", "text_pad": "text",
}



@dataclasses.dataclass(frozen=True)
class Pair:
    """One example to render: two different source images of the same class.

    `index` is the position within the split; it keys the example's randomness and its shard.
    """

    split: str
    index: int
    label: int
    digit_source: int
    street_source: int


def split_id(split: str) -> int:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected one of {SPLITS})")
    return SPLITS.index(split)


def split_sources(num_images: int, test_fraction: float, seed: int,
                  validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> dict[str, np.ndarray]:
    """Splits the source images before pairing, so no source image is in two splits.

    The test images are drawn first, exactly as before validation splits existed (so the test
    split is unchanged by the carve); the validation images are then drawn out of the train
    images alone, from their own stream.

    Returns {"train", "validation", "test"}: sorted int64 source indices. With n_rest =
    floor((1 - test_fraction) * num_images) images outside test, round(validation_fraction *
    n_rest) of them are validation (1293 / 144 / 360 for 1797 images, 0.2 and 0.1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    n_rest = int(np.floor((1.0 - test_fraction) * num_images))
    if n_rest < 1 or n_rest >= num_images:
        raise UserError(f"test_fraction {test_fraction!r} leaves an empty split of {num_images} images")
    order = np.random.default_rng(seed).permutation(num_images)
    rest = np.sort(order[:n_rest])
    n_validation = int(round(validation_fraction * n_rest))
    if n_validation < 1 or n_validation >= n_rest:
        raise UserError(f"validation_fraction {validation_fraction!r} leaves an empty split of the "
                        f"{n_rest} train images")
    held = np.random.default_rng([seed, DigitsStream.VALIDATION]).permutation(rest)[:n_validation]
    return {"train": np.setdiff1d(rest, held), "validation": np.sort(held),
            "test": np.sort(order[n_rest:])}


def make_pairs(labels: np.ndarray, source_indices: np.ndarray, *, dm: int, seed: int,
               split: str) -> list[Pair]:
    """Pairs the source images of one split within each class (Shi et al.'s MNIST-SVHN recipe).

    For class c with source indices idx_c (n_c of them) the digit side is `dm` concatenated
    random permutations of idx_c and the street side `dm` independent ones, giving dm * n_c
    pairs; positions where both sides picked the same image are repaired so every pair shows
    two different images. The pairs of all classes are then shuffled, so a shard or a prefix of
    the split holds every class.

    Args:
      labels: [num_images] int class of every source image.
      source_indices: [n] the source images of this split.
      dm: how many times each source image appears on each side.
      seed: the dataset seed.
      split: "train", "validation" or "test".

    Returns:
      dm * n pairs, `Pair.index` running 0..dm*n-1 in list order.
    """
    if dm < 1:
        raise UserError(f"dm must be at least 1, got {dm!r}")
    labels = np.asarray(labels)
    source_indices = np.sort(np.asarray(source_indices, dtype=np.int64))
    rng = np.random.default_rng([seed, DigitsStream.PAIRING, split_id(split)])
    digit_parts, street_parts = [], []
    for c in range(NUM_CLASSES):
        idx_c = source_indices[labels[source_indices] == c]
        if len(idx_c) < 2:
            raise UserError(
                f"class {c} ({CLASS_NAMES[c]!r}) has {len(idx_c)} source image(s) in the {split} "
                "split; pairing needs at least 2 different images (change test_fraction or "
                "validation_fraction)")
        digit_side = np.concatenate([rng.permutation(idx_c) for _ in range(dm)])
        street_side = np.concatenate([rng.permutation(idx_c) for _ in range(dm)])
        digit_parts.append(digit_side)
        street_parts.append(repair_collisions(digit_side, street_side, rng))
    digit_all = np.concatenate(digit_parts)
    street_all = np.concatenate(street_parts)
    order = rng.permutation(len(digit_all))
    return [Pair(split=split, index=i, label=int(labels[digit_all[j]]),
                 digit_source=int(digit_all[j]), street_source=int(street_all[j]))
            for i, j in enumerate(order)]


def repair_collisions(digit_side: np.ndarray, street_side: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Returns street_side with no position equal to digit_side, its multiset of values kept.

    Each collision p (digit_side[p] == street_side[p] == v) swaps its street value with a random
    position q where neither side holds v. After the swap neither p nor q collides and no other
    position changed, so one pass repairs everything (a rotation among the collision positions
    can recreate collisions when two of them hold the same image). Such a q exists whenever the
    sides hold at least two distinct values: v fills at most 2 * dm - 1 of the dm * n_c positions.

    Args:
      digit_side: [P] source indices.
      street_side: [P] source indices, a permutation of digit_side's multiset.
      rng: the pairing stream; consumed only where collisions occur.
    """
    street = np.array(street_side, copy=True)
    for p in np.flatnonzero(digit_side == street):
        v = street[p]
        if digit_side[p] != v:  # already repaired as the partner of an earlier swap
            continue
        candidates = np.flatnonzero((digit_side != v) & (street != v))
        if len(candidates) == 0:
            raise ValueError(f"cannot pair source image {v}: its class has no other image")
        q = candidates[rng.integers(len(candidates))]
        street[p], street[q] = street[q], street[p]
    return street


# --------------------------------------------------------------------------------------------
# Rendering


def digit_image(source: np.ndarray) -> np.ndarray:
    """[8, 8] source pixels in 0..16 -> [8, 8, 1] float32 in [0, 1]."""
    return (np.asarray(source, np.float32) / PIXEL_MAX)[..., None]


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shifts [H, W] by (dy, dx) pixels (down, right), filling with zeros rather than wrapping."""
    h, w = image.shape
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def compose_street(source: np.ndarray, fg: np.ndarray, bg: np.ndarray,
                   shift: tuple[int, int]) -> np.ndarray:
    """The noise-free street image: [8, 8] pixels in 0..16 -> [16, 16, 3] float64 in [0, 1].

    The digit, upsampled bilinearly and shifted, is the alpha of `fg` [3] over `bg` [3].
    """
    alpha = np.clip(ndimage.zoom(np.asarray(source, np.float64) / PIXEL_MAX, STREET_ZOOM, order=1),
                    0.0, 1.0)
    alpha = shift_image(alpha, int(shift[0]), int(shift[1]))[..., None]
    return bg * (1.0 - alpha) + fg * alpha


def draw_street_style(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Random colours fg, bg [3] with mean |fg - bg| >= MIN_CONTRAST, and a shift (dy, dx)."""
    while True:  # terminates quickly: about 12% of uniform colour pairs have enough contrast
        fg, bg = rng.random(3), rng.random(3)
        if np.mean(np.abs(fg - bg)) >= MIN_CONTRAST:
            break
    dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
    return fg, bg, (int(dy), int(dx))


def encode_text(text: str) -> np.ndarray:
    """A string of TEXT_LENGTH characters from VOCAB -> [TEXT_LENGTH] int64 token ids."""
    if len(text) != TEXT_LENGTH:
        raise UserError(f"text {text!r} must have {TEXT_LENGTH} characters")
    try:
        return np.array([VOCAB.index(ch) for ch in text], np.int64)
    except ValueError:
        raise UserError(f"text {text!r} has characters outside the vocabulary") from None


def decode_text(tokens: np.ndarray) -> str:
    """[TEXT_LENGTH] token ids -> the string; padding tokens decode to nothing."""
    return "".join(VOCAB[int(t)] for t in np.asarray(tokens) if int(t) != 0)


def class_text(label: int, pad: int) -> str:
    """The class name after `pad` spaces, filled with spaces on the right to TEXT_LENGTH."""
    return (" " * pad + CLASS_NAMES[label]).ljust(TEXT_LENGTH)


def render_pair(pair: Pair, images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Renders one pair into a record for `schema.encode_example`.

    The randomness comes from default_rng([seed, stream, split id, pair index]) only, drawn in
    this order: street colours and shift, street noise, text padding.

    Args:
      pair: what to render.
      images: [num_images, 8, 8] all source images, pixels in 0..16.
      seed: the dataset seed.

    Returns:
      {"digit": [8, 8, 1] float32, "street": [16, 16, 3] float32, "text": [8] int64,
       "label": int, and the METADATA_SHAPES keys as float32 arrays}.
    """
    rng = np.random.default_rng([seed, DigitsStream.RENDER, split_id(pair.split), pair.index])
    fg, bg, shift = draw_street_style(rng)
    street = compose_street(images[pair.street_source], fg, bg, shift)
    street = np.clip(street + rng.normal(0.0, NOISE_STD, STREET_SHAPE), 0.0, 1.0)
    pad = int(rng.integers(0, TEXT_LENGTH - len(CLASS_NAMES[pair.label]) + 1))
    return {
        "digit": digit_image(images[pair.digit_source]),
        "street": street.astype(np.float32),
        "text": encode_text(class_text(pair.label, pad)),
        "label": pair.label,
        "street_fg": fg.astype(np.float32),
        "street_bg": bg.astype(np.float32),
        "street_shift": np.array(shift, np.float32),
        "text_pad": np.array([pad], np.float32),
        "digit_source": np.array([pair.digit_source], np.float32),
        "street_source": np.array([pair.street_source], np.float32),
    }
