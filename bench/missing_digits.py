"""Digits with missing modalities (issue 16): a share of the rows misses `street`, as large a
share misses `text`, never both, rebuilt through `bmvae data build arrays`.

Exports a built Digits dataset (`bmvae data build digits`) to two .npz archives of the same rows,
with the same train / validation / test split (an explicit `split` array) and labels:
- OUT/digits_complete.npz: digit, street, text, label, split;
- OUT/digits_missing.npz: the same plus `present_street` and `present_text` (bool [N]). In each
  split, a seeded draw picks round(fraction * n) rows without `street` and as many other rows
  without `text`; the rest are fully observed. The missing rows' values stay in the arrays (the
  build never reads them and stores zeros).
With --build, it also builds OUT/complete and OUT/missing with `bmvae data build arrays`.

    bmvae data build digits --output data/digits
    python bench/missing_digits.py --digits data/digits --output data/digits_missing --build
    bmvae train --data data/digits_missing/missing --config configs/digits/bmvae_m.yaml --workdir runs/missing
    bmvae train --data data/digits_missing/complete --config configs/digits/bmvae_m.yaml --workdir runs/complete
    bmvae evaluate --workdir runs/missing
    bmvae evaluate --workdir runs/complete --data data/digits_missing/missing  # the same test rows

Evaluation scores the fully observed rows only (metrics.json's `examples_fully_observed`), so
the last line scores the model trained on complete data on exactly the rows the other is scored on.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

MODALITIES = ("digit", "street", "text")
MISSING = ("street", "text")  # the modalities rows may miss, each in `fraction` of the rows
DEFAULT_FRACTION = 0.3


def missing_masks(split: np.ndarray, fraction: float = DEFAULT_FRACTION, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """{"present_street", "present_text"}: bool [N]. Within each split value, a seeded
    permutation of its rows: the first round(fraction * n) miss street, the next as many miss text.

    Raises ValueError unless 0 <= fraction <= 0.5 (no row may miss both).
    """
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"fraction must be in [0, 0.5] (a row misses street or text, never both), "
                         f"got {fraction!r}")
    masks = {f"present_{name}": np.ones(len(split), bool) for name in MISSING}
    rng = np.random.default_rng([seed, 16])
    for value in sorted(set(split.tolist())):
        rows = rng.permutation(np.flatnonzero(split == value))
        k = int(round(fraction * len(rows)))
        masks["present_street"][rows[:k]] = False
        masks["present_text"][rows[k:2 * k]] = False
    return masks


def export_digits(data_dir: str) -> dict[str, np.ndarray]:
    """The Digits dataset at `data_dir` as arrays: its modalities in model units, `label` and
    `split` ('train'/'validation'/'test'), each split's records in stored order."""
    from bmvae_tf import schema
    from bmvae_tf.trainers import input_pipeline

    manifest = schema.read_manifest(data_dir)
    if tuple(manifest.modality_names) != MODALITIES or manifest.label is None:
        raise SystemExit(f"{data_dir}: expected the Digits dataset (modalities {list(MODALITIES)} and a "
                         f"label), found {manifest.modality_names}")
    parts = {key: [] for key in (*MODALITIES, "label", "split")}
    for split in schema.SPLITS:
        for batch in input_pipeline.make_dataset(manifest, split, 1024).as_numpy_iterator():
            for name in (*MODALITIES, "label"):
                parts[name].append(batch[name])
            parts["split"].append(np.full(len(batch["label"]), split))
    return {key: np.concatenate(values) for key, values in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", required=True, help="a dataset built by `bmvae data build digits`")
    parser.add_argument("--output", required=True, help="directory for the .npz files (and builds)")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                        help="share of each split's rows missing street, and (other rows) text")
    parser.add_argument("--seed", type=int, default=0, help="draws the missing rows")
    parser.add_argument("--build", action="store_true",
                        help="also run `bmvae data build arrays` into OUTPUT/complete and OUTPUT/missing")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    arrays = export_digits(args.digits)
    masks = missing_masks(arrays["split"], args.fraction, args.seed)
    paths = {"complete": os.path.join(args.output, "digits_complete.npz"),
             "missing": os.path.join(args.output, "digits_missing.npz")}
    np.savez(paths["complete"], **arrays)
    np.savez(paths["missing"], **arrays, **masks)
    for name in MISSING:
        print(f"{name}: missing in {int((~masks[f'present_{name}']).sum())} of {len(arrays['label'])} rows")
    print(f"wrote {paths['complete']} and {paths['missing']}")
    if args.build:
        from bmvae_tf.pipeline import build_arrays

        for kind, path in paths.items():
            manifest = build_arrays.build_arrays(os.path.join(args.output, kind), input_path=path,
                                                 name=f"digits_{kind}", sequences=("text",),
                                                 overwrite=True)
            print(f"built {manifest.directory}: {({k: v.count for k, v in manifest.splits.items()})}, "
                  f"fully observed test rows {manifest.fully_observed_count('test')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
