"""A six-view vector set for modality dropout: six noisy partial views of each digit.

Reads a built digits dataset (`bmvae data build digits`) and writes an .npz for `bmvae data build
arrays` with its train/validation/test rows (a `split` array) and six float32 vector modalities,
each taken from the 8x8 digit image under its own random shift of up to one pixel (zero fill)
and its own Gaussian noise, so every view has private style:

    pixels   64  the whole image, noise sd 0.3
    profile  16  row sums then column sums, noise sd 0.5 (as bench/four_view_digits.py)
    top      32  rows 0-3, noise sd 0.3
    bottom   32  rows 4-7
    left     32  columns 0-3
    right    32  columns 4-7

Each half carries only part of the class (a 7 and a 1 share a right half), so single-view cross
generation is harder than from the whole image: the regime where, with BMVAE_M at M = 6, the
decoders rarely see a latent drawn from one expert alone (README, "Modality dropout").

    python bench/six_view_digits.py --data data/digits --output six_view.npz --max-train 6000
    bmvae data build arrays --input six_view.npz --output data/six_view
"""

from __future__ import annotations

import sys

import numpy as np

from four_view_digits import arguments, exported_rows, profile, shifted, write_npz  # bench/

PIXEL_NOISE = 0.3


def views(digit: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """[N, 8, 8, 1] intensities in [0, 1] -> the six views, float32 [N, D] each."""
    images = digit[..., 0]
    crops = {"pixels": np.s_[:, :, :], "top": np.s_[:, :4, :], "bottom": np.s_[:, 4:, :],
             "left": np.s_[:, :, :4], "right": np.s_[:, :, 4:]}
    out = {"profile": profile(digit, rng)}
    for name, crop in crops.items():
        part = shifted(images, rng)[crop].reshape(len(images), -1)
        out[name] = (part + rng.normal(0.0, PIXEL_NOISE, size=part.shape)).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.split("\n\n")[0], argv)
    exported = exported_rows(args)
    out = views(exported["digit"], np.random.default_rng(args.seed))
    out["label"] = exported["label"].astype(np.int64)
    out["split"] = exported["split"]
    write_npz(args.output, out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
