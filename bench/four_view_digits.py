"""A four-modality set for the model comparison: the digits dataset plus a fourth view.

Reads a built digits dataset (`bmvae data build digits`) split by split and writes an .npz for
`bmvae data build arrays` with the same train/validation/test rows (its `split` array) and four
modalities: `digit` and `street` (float32 images, exactly as in the digits records), `text` (its tokens)
and `profile`, a 16-vector of the digit's row and column ink sums after a random shift of up to
one pixel, with Gaussian noise (sd 0.5 ink). The profile carries the class (it is a projection of
the digit) with private style (the shift, the noise) of its own, so every model sees M = 4.

    python bench/four_view_digits.py --data data/digits --output four_view.npz [--max-train N]
    bmvae data build arrays --input four_view.npz --output data/four_view --sequence text

--max-train keeps the first N train rows (a cheaper comparison); validation and test stay whole
unless --max-test is given.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from missing_digits import export_digits  # bench/: the digits export, in stored order

PROFILE_NOISE = 0.5
SPLITS = ("train", "validation", "test")


def shifted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 8, 8] -> [N, 8, 8]: each image shifted by its own (dy, dx) in {-1, 0, 1}^2, zero fill."""
    out = np.zeros_like(images)
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(images), 2))):
        out[i] = np.roll(np.roll(images[i], dy, axis=0), dx, axis=1)
        if dy:
            out[i, (0 if dy > 0 else -1), :] = 0.0
        if dx:
            out[i, :, (0 if dx > 0 else -1)] = 0.0
    return out


def profile(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 8, 8, 1] intensities in [0, 1] -> [N, 16] float32: row sums then column sums of the
    image shifted by (dy, dx) in {-1, 0, 1}^2 (zero fill), plus N(0, PROFILE_NOISE^2)."""
    moved = shifted(digit[..., 0], rng)
    sums = np.concatenate([moved.sum(axis=2), moved.sum(axis=1)], axis=1)
    return (sums + rng.normal(0.0, PROFILE_NOISE, size=sums.shape)).astype(np.float32)


def arguments(description: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line both multi-view scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="a built digits dataset directory")
    parser.add_argument("--output", required=True, help="the .npz to write")
    parser.add_argument("--max-train", type=int, default=0, help="keep the first N train rows (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="keep the first N test rows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def exported_rows(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The digits export (`export_digits`) cut to the first --max-train / --max-test rows of
    those splits (validation whole)."""
    exported = export_digits(args.data)
    limits = {"train": args.max_train, "test": args.max_test}
    keep = np.zeros(len(exported["split"]), bool)
    for split in SPLITS:
        rows = np.flatnonzero(exported["split"] == split)
        keep[rows[:limits.get(split) or len(rows)]] = True
    return {key: value[keep] for key, value in exported.items()}


def write_npz(path: str, out: dict[str, np.ndarray]) -> None:
    """Publishes `out` at `path` whole (a temporary name, then a rename) and says what it holds."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    counts = {split: int(np.sum(out["split"] == split)) for split in SPLITS}
    print(f"{path}: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS)
          + "; " + ", ".join(f"{k} {out[k].dtype}{list(out[k].shape[1:])}" for k in sorted(out)))


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.split("\n\n")[0], argv)
    out = exported_rows(args)
    out["profile"] = profile(out["digit"], np.random.default_rng(args.seed))
    for key in ("digit", "street"):  # float32 in the digits records: kept exactly
        out[key] = out[key].astype(np.float32)
    out["text"] = out["text"].astype(np.int64)
    out["label"] = out["label"].astype(np.int64)
    write_npz(args.output, out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
