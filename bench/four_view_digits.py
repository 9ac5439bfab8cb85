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


def profile(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 8, 8, 1] intensities in [0, 1] -> [N, 16] float32: row sums then column sums of the
    image shifted by (dy, dx) in {-1, 0, 1}^2 (zero fill), plus N(0, PROFILE_NOISE^2)."""
    images = digit[..., 0]
    shifted = np.zeros_like(images)
    shifts = rng.integers(-1, 2, size=(len(images), 2))
    for i, (dy, dx) in enumerate(shifts):
        shifted[i] = np.roll(np.roll(images[i], dy, axis=0), dx, axis=1)
        if dy:
            shifted[i, (0 if dy > 0 else -1), :] = 0.0
        if dx:
            shifted[i, :, (0 if dx > 0 else -1)] = 0.0
    sums = np.concatenate([shifted.sum(axis=2), shifted.sum(axis=1)], axis=1)
    return (sums + rng.normal(0.0, PROFILE_NOISE, size=sums.shape)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a built digits dataset directory")
    parser.add_argument("--output", required=True, help="the .npz to write")
    parser.add_argument("--max-train", type=int, default=0, help="keep the first N train rows (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="keep the first N test rows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    exported = export_digits(args.data)
    limits = {"train": args.max_train, "test": args.max_test}
    keep = np.zeros(len(exported["split"]), bool)
    for split in SPLITS:
        rows = np.flatnonzero(exported["split"] == split)
        keep[rows[:limits.get(split) or len(rows)]] = True
    out = {key: value[keep] for key, value in exported.items()}
    counts = {split: int(np.sum(out["split"] == split)) for split in SPLITS}
    out["profile"] = profile(out["digit"], rng)
    for key in ("digit", "street"):  # float32 in the digits records: kept exactly
        out[key] = out[key].astype(np.float32)
    out["text"] = out["text"].astype(np.int64)
    out["label"] = out["label"].astype(np.int64)
    tmp = args.output + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, args.output)
    print(f"{args.output}: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS)
          + "; " + ", ".join(f"{k} {out[k].dtype}{list(out[k].shape[1:])}" for k in sorted(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
