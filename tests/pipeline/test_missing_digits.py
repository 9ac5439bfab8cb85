"""bench/missing_digits.py: Digits with 30% of rows missing street and 30% missing text (never
both), rebuilt through `bmvae data build arrays` on the same rows and splits."""

import importlib.util
import os

import numpy as np
import pytest

from bmvae_tf import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script():
    spec = importlib.util.spec_from_file_location("missing_digits", os.path.join(ROOT, "bench", "missing_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_masks_hide_the_fraction_of_each_split_and_never_both():
    script = load_script()
    split = np.array(["train"] * 1000 + ["validation"] * 101 + ["test"] * 250)
    masks = script.missing_masks(split, 0.3, seed=4)
    street, text = ~masks["present_street"], ~masks["present_text"]
    assert not (street & text).any()
    for value, n in (("train", 1000), ("validation", 101), ("test", 250)):
        rows = split == value
        assert street[rows].sum() == text[rows].sum() == round(0.3 * n)
    assert not np.array_equal(masks["present_street"], script.missing_masks(split, 0.3, seed=5)["present_street"])
    with pytest.raises(ValueError, match="never both"):
        script.missing_masks(split, 0.6)


@pytest.mark.slow
def test_the_script_rebuilds_digits_with_missing_rows_on_the_same_splits(built, tmp_path):
    """`built`: Digits with dm=1 (tests/conftest.py)."""
    script = load_script()
    digits = built.manifest
    assert script.main(["--digits", digits.directory, "--output", str(tmp_path), "--build"]) == 0
    missing = schema.read_manifest(str(tmp_path / "missing"))
    complete = schema.read_manifest(str(tmp_path / "complete"))
    assert not complete.has_missing_rows and missing.has_missing_rows
    for split in schema.SPLITS:
        n = digits.split(split).count
        assert missing.split(split).count == complete.split(split).count == n
        hidden = round(0.3 * n)
        counts = missing.present_counts[split]
        assert counts.modalities == {"digit": n, "street": n - hidden, "text": n - hidden}
        assert counts.fully_observed == n - 2 * hidden
    assert [(m.name, m.kind, m.shape, m.vocab_size if m.kind == "sequence" else None) for m in missing.modalities] == [
        (m.name, m.kind, m.shape, m.vocab_size if m.kind == "sequence" else None) for m in digits.modalities]
    assert missing.modalities == complete.modalities
