"""bench/six_view_digits.py: six noisy partial views of each digit, each under its own shift."""

import os
import sys

import numpy as np

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import four_view_digits  # noqa: E402
import six_view_digits  # noqa: E402


def _shifts(image: np.ndarray) -> list[np.ndarray]:
    """The nine images of `image` shifted by (dy, dx) in {-1, 0, 1}^2 with zero fill."""
    out = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            padded = np.pad(image, 1)
            out.append(padded[1 - dy:9 - dy, 1 - dx:9 - dx])
    return out


def test_each_view_is_its_crop_of_a_shifted_digit(monkeypatch):
    monkeypatch.setattr(six_view_digits, "PIXEL_NOISE", 0.0)
    monkeypatch.setattr(four_view_digits, "PROFILE_NOISE", 0.0)
    rng = np.random.default_rng(0)
    digit = rng.uniform(0.1, 1.0, size=(40, 8, 8, 1)).astype(np.float32)
    views = six_view_digits.views(digit, np.random.default_rng(3))
    assert {k: v.shape for k, v in views.items()} == {
        "profile": (40, 16), "pixels": (40, 64), "top": (40, 32), "bottom": (40, 32),
        "left": (40, 32), "right": (40, 32)}
    assert all(v.dtype == np.float32 for v in views.values())
    crops = {"pixels": np.s_[:, :], "top": np.s_[:4, :], "bottom": np.s_[4:, :],
             "left": np.s_[:, :4], "right": np.s_[:, 4:]}
    used = {name: set() for name in crops}
    for i in range(len(digit)):
        candidates = _shifts(digit[i, ..., 0])
        for name, crop in crops.items():
            matches = [k for k, c in enumerate(candidates) if np.allclose(c[crop].ravel(), views[name][i])]
            assert matches, (name, i)
            used[name].add(matches[0])
    # Each view draws its own shift: over 40 rows every view meets several of the nine.
    assert all(len(shifts) >= 4 for shifts in used.values())
    assert not np.allclose(views["top"], views["pixels"][:, :32])  # independent shifts


def test_views_carry_their_own_noise():
    rng = np.random.default_rng(0)
    digit = np.zeros((500, 8, 8, 1), np.float32)
    views = six_view_digits.views(digit, rng)
    for name in ("pixels", "top", "bottom", "left", "right"):
        assert abs(float(views[name].std()) - six_view_digits.PIXEL_NOISE) < 0.02
    assert abs(float(views["profile"].std()) - four_view_digits.PROFILE_NOISE) < 0.03
    assert abs(np.corrcoef(views["top"][:, 0], views["pixels"][:, 0])[0, 1]) < 0.15
