"""A keyed pseudo-random permutation of [0, size) computed element by element.

Beam jobs use it where they need a random order or a random subset of N items but must not
hold a list of N items: pairs numbered in a random order (MNIST-SVHN), the held-out test rows of
a user's arrays. Any piece of the permutation can be computed alone and agrees with the whole.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_FEISTEL_ROUNDS = 4


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute_index(x: np.ndarray, size: int, key: Sequence[int]) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, size), applied elementwise to x.

    A balanced Feistel network on the smallest even number of bits covering size - 1, with
    cycle walking (values that land outside [0, size) are permuted again until they land
    inside), which keeps it a bijection of [0, size).

    Args:
      x: int array with values in [0, size).
      size: the domain size P.
      key: ints keying the permutation.
    Returns:
      int64 array of x's shape.
    """
    x = np.asarray(x, np.int64)
    if np.any((x < 0) | (x >= size)):
        raise ValueError(f"values outside [0, {size})")
    if size <= 1:
        return x.copy()
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([*key, 1]).integers(
        0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64)
    with np.errstate(over="ignore"):
        out = x.astype(np.uint64)
        todo = np.ones(out.shape, bool)
        while todo.any():
            value = out[todo]
            left, right = value >> np.uint64(half), value & mask
            for k in keys:
                left, right = right, left ^ (_mix64(right ^ k) & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(size)
    return out.astype(np.int64)
