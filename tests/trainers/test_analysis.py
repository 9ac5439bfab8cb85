"""Tests of trainers.analysis (`bmvae analyze`): the Section 7 maths on a synthetic latent space with
planted shared and private dimensions, then the command on a tiny run with planted weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from tests import synthetic
from bmvae_tf.trainers import analysis, cli

NAMES = ["a", "b", "c"]
NUM_CLASSES = 5
# dims 0, 1 private to a; dim 2 private to b; dims 3-7 shared (dim 3 leans to c, below 0.5).
PLANTED_WEIGHTS = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05],
                            [0.25, 0.25, 0.5], *[[1 / 3] * 3] * 4])


def test_normalised_weights_map_uniform_to_zero_and_one_hot_to_one():
    out = analysis.normalised_weights([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    np.testing.assert_allclose(out, [[0, 0, 0], [1, -0.5, -0.5], [0.25, -0.125, -0.125]], atol=1e-12)


def test_dimension_sets_find_the_planted_private_dimensions():
    sets = analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, threshold=0.5)
    assert sets.private == {"a": [0, 1], "b": [2], "c": []}
    assert sets.shared == [3, 4, 5, 6, 7]
    assert sets.to_json() == {"private": {"a": [1, 2], "b": [3], "c": []}, "shared": [4, 5, 6, 7, 8]}
    # dim 3's normalised weight for c is 0.25: private at a threshold of 0.25, not above it
    assert analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, threshold=0.25).private["c"] == [3]
    assert analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, threshold=0.26).private["c"] == []
    named = sets.named_sets()
    assert named["all"] == list(range(8)) and named["rest:a"] == [2, 3, 4, 5, 6, 7]
    with pytest.raises(UserError, match="threshold"):
        analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, threshold=0.0)


def _planted_latents(num: int, seed: int):
    """Encoder a's latents: shared dims 3-7 hold the class, dims 0, 1 a's style factors, dim 2
    b's (which a's encoder would not see; here it is noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(NUM_CLASSES, size=num)
    centres = np.random.default_rng(99).normal(0, 3, (NUM_CLASSES, 5))
    z = rng.normal(size=(num, 8))
    z[:, 3:] = centres[labels] + rng.normal(0, 0.3, (num, 5))
    factors = np.stack([z[:, 0] + rng.normal(0, 0.05, num), z[:, 1] ** 3], axis=1)  # one linear, one cubic
    return z, labels, factors


def _chance_tolerance(num: int) -> float:
    p = 1 / NUM_CLASSES
    return 4 * np.sqrt(p * (1 - p) / num)


def test_subvector_accuracy_finds_the_class_in_the_shared_dimensions_only():
    z_train, y_train, _ = _planted_latents(600, 0)
    z_test, y_test, _ = _planted_latents(1000, 1)
    sets = analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, 0.5).named_sets()
    table = analysis.subvector_accuracy({"a": z_train}, y_train, {"a": z_test}, y_test, sets)["a"]
    assert table["shared"] == 1.0 and table["all"] == 1.0 and table["rest:a"] == 1.0
    assert abs(table["private:a"] - 1 / NUM_CLASSES) < _chance_tolerance(1000)
    assert abs(table["private:b"] - 1 / NUM_CLASSES) < _chance_tolerance(1000)
    assert table["private:c"] is None  # no dimensions, no probe


def test_factor_r2_credits_the_dimension_that_carries_each_factor():
    z_train, _, f_train = _planted_latents(600, 0)
    z_test, _, f_test = _planted_latents(1000, 1)
    r2 = analysis.factor_r2(z_train, f_train, z_test, f_test)
    assert r2.shape == (8, 2)
    assert r2[0, 0] > 0.99 and r2[1, 1] > 0.999  # the cubic fits z^3 exactly
    others = np.delete(r2, [0, 1], axis=0)
    assert np.all(np.abs(others) < 0.03)
    assert r2[1, 0] < 0.03 and r2[0, 1] < 0.03
    assert analysis.carrying_dimensions(r2, 0.5) == [0, 1]
    assert analysis.carrying_dimensions(np.full((3, 1), np.nan), 0.1) == []


def test_planted_private_dimensions_have_perfect_precision_and_recall():
    z_train, _, f_train = _planted_latents(600, 0)
    z_test, _, f_test = _planted_latents(1000, 1)
    private = analysis.dimension_sets(PLANTED_WEIGHTS, NAMES, 0.5).private["a"]
    carrying = analysis.carrying_dimensions(analysis.factor_r2(z_train, f_train, z_test, f_test), 0.1)
    assert analysis.precision_recall(private, carrying) == {"true_positives": 2, "precision": 1.0,
                                                            "recall": 1.0}
    assert analysis.precision_recall([0, 1, 5], [1, 2]) == {"true_positives": 1, "precision": 1 / 3,
                                                           "recall": 0.5}
    assert analysis.precision_recall([], [1]) == {"true_positives": 0, "precision": None, "recall": 0.0}
    assert analysis.rank_correlation([0.9, 0.1, 0.5], [0.8, 0.0, 0.3]) == pytest.approx(1.0)
    assert analysis.rank_correlation([0.2, 0.2], [0.1, 0.3]) is None


def test_residualising_on_labels_removes_what_the_class_explains():
    rng = np.random.default_rng(3)
    labels = rng.integers(NUM_CLASSES, size=2000)
    z = np.stack([labels + rng.normal(0, 0.1, 2000), rng.normal(size=2000)], axis=1)  # class, style
    factor = (2.0 * labels + z[:, 1])[:, None]  # class-dependent offset plus the style
    half = slice(0, 1000), slice(1000, 2000)
    raw = analysis.factor_r2(z[half[0]], factor[half[0]], z[half[1]], factor[half[1]])
    f_train, f_test = analysis.residualise_on_labels(factor[half[0]], labels[half[0]],
                                                     factor[half[1]], labels[half[1]])
    centred = analysis.factor_r2(z[half[0]], f_train, z[half[1]], f_test)
    assert raw[0, 0] > 0.7  # the class dimension "predicts" the factor through the class
    assert abs(centred[0, 0]) < 0.05 and centred[1, 0] > 0.95


def test_swap_latents_replace_exactly_the_chosen_dimensions():
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    replacement = -np.ones((2, 4, 3), np.float32)
    out = analysis.swap_latents(base, replacement, [0, 2])
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[:, :, 1], np.repeat(base[:, 1:2], 4, axis=1))
    np.testing.assert_array_equal(out[:, :, [0, 2]], -1.0)


@pytest.mark.parametrize("kind, shape", [("image", (8, 8, 1)), ("sequence", (5,)), ("vector", (6,))])
def test_swap_grid_is_one_axes_with_a_cell_per_example_and_variant(kind, shape):
    """Each value is drawn into its own cell of one axes (`plots.draw_cell`): an 8 x 12 grid of
    subplots took 1.0-1.2 s to render, one axes 0.15 s."""
    from bmvae_tf.trainers.reporting import plots

    spec = schema.ModalitySpec(name="m", kind=kind, shape=shape, dtype="int64" if kind == "sequence" else "float32",
                               likelihood="categorical" if kind == "sequence" else "laplace",
                               vocab=("<pad>", " ", "a", "b") if kind == "sequence" else None)
    rng = np.random.default_rng(0)
    draw = (lambda *s: rng.integers(0, 4, size=s)) if kind == "sequence" else (lambda *s: rng.random(s))
    figure = plots.swap_grid_figure(spec, draw(3, *shape), draw(3, *shape), draw(3, 4, *shape), "t")
    assert len(figure.axes) == 1
    ax = figure.axes[0]
    drawn = {"image": len(ax.images), "sequence": len(ax.texts) - 6, "vector": len(ax.lines)}[kind]
    assert drawn == 3 * 6  # examples x (input, reconstruction, 4 variants); 6 column headers
    assert len(ax.patches) == 3 * 6  # every cell outlined
    assert plots.figure_png(figure).startswith(b"\x89PNG")


def test_factor_columns_name_each_component():
    names, values = analysis.factor_columns({"fg": np.arange(6).reshape(2, 3), "pad": np.array([[1], [2]])})
    assert names == ["fg[0]", "fg[1]", "fg[2]", "pad"]
    np.testing.assert_array_equal(values, [[0, 1, 2, 1], [3, 4, 5, 2]])


# ------------------------------------------------------------------------------------ the command


TINY = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 16], "sequence_width": 16}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """An untrained tiny BMVAE_M whose alpha plants dim 1 private to digit, dim 2 to text."""
    root = tmp_path_factory.mktemp("analyze")
    data_dir, workdir = str(root / "data"), str(root / "run")
    synthetic.write_dataset(data_dir, num_train=96, num_test=48, num_classes=4)
    logits = np.zeros((4, 3), np.float32)
    logits[0, 0] = logits[1, 2] = 6.0  # alpha ~ 0.995 on one modality
    synthetic.write_untrained_run(
        data_dir, workdir, model={"name": "bmvae_m", **TINY}, eval_settings={"batch_size": 32},
        history=[{"epoch": 1, "step": 3, "loss": 5.0, "val_loss": None, "seconds": 0.4}],
        prepare=lambda model: model.mixture_logits.assign(logits))
    return data_dir, workdir


def test_analyze_writes_the_planted_sets_tables_and_pictures(planted_run):
    _, workdir = planted_run
    result = analysis.analyze(workdir, factors={"noise_seed": "street"}, swap_examples=2, swap_samples=3)
    with open(os.path.join(workdir, "analysis", "analysis.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["weights_name"] == "alpha"
    assert result["dimensions"] == {"private": {"digit": [1], "street": [], "text": [2]}, "shared": [3, 4]}
    sub = result["subvector_accuracy"]
    assert list(sub) == ["digit", "street", "text", "digit+street+text"]
    assert sub["digit"]["private:street"] is None and 0.0 <= sub["digit"]["shared"] <= 1.0
    assert result["num_examples"]["subvector_accuracy"] == {"train": 96, "test": 48}
    assert set(result["factors"]) == {"noise_seed"} and len(result["factors"]["noise_seed"]["r2"]) == 4
    assert result["private_vs_factors"]["street"]["private"] == []
    assert result["files"]["swap_grids"] == {
        m: {"private_resampled": f"swap_{m}_private_resampled.png",
            "rest_resampled": f"swap_{m}_rest_resampled.png"} for m in ("digit", "text")}
    for name in ("mixture_weights.png", "factor_r2.png", "swap_digit_private_resampled.png",
                 "swap_text_rest_resampled.png"):
        with open(os.path.join(workdir, "analysis", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, "report.html")) as f:
        page = f.read()
    assert "Dimension sets from the normalised" in page and "Sub-vector latent accuracy" in page
    assert "outlined: private dimensions at normalised weight" in page  # the heatmap marks them
    assert "No metrics.json yet" in page  # analysed before evaluation: the report says so
    assert page.count("<figcaption>Dimension swap (Fig. 7)") == 4

    # At a threshold no weight reaches, nothing is private; the old grids go with the old sets.
    again = analysis.analyze(workdir, threshold=1.0, factors={}, swap_examples=1, swap_samples=1)
    assert again["dimensions"]["shared"] == [1, 2, 3, 4] and again["files"]["swap_grids"] == {}
    assert "factors" in again["skipped"]
    assert not [n for n in os.listdir(os.path.join(workdir, "analysis")) if n.startswith("swap_")]
    with open(os.path.join(workdir, "report.html")) as f:
        assert "Dimension swap" not in f.read()


def test_analyze_command_prints_the_sets_and_rejects_bad_input(planted_run, tmp_path, capsys):
    data_dir, workdir = planted_run
    assert cli.main(["analyze", "--workdir", workdir, "--swap-examples", "1", "--swap-samples", "1",
                     "--factor", "noise_seed=text"]) == 0
    out = capsys.readouterr().out
    assert "private to digit: [1]" in out and "private to text: [2]" in out and "shared: [3, 4]" in out

    assert cli.main(["analyze", "--workdir", workdir, "--factor", "colour=street"]) == 2
    assert "'colour' is not a metadata key" in capsys.readouterr().err
    assert cli.main(["analyze", "--workdir", workdir, "--threshold", "1.5"]) == 2
    assert "threshold must be in (0, 1]" in capsys.readouterr().err

    other = str(tmp_path / "mvae")
    synthetic.write_untrained_run(data_dir, other, model={"name": "mvae", **TINY})
    assert cli.main(["analyze", "--workdir", other]) == 2
    assert "has no mixture weights" in capsys.readouterr().err


def test_default_factors_are_the_ones_the_manifest_declares():
    digits_factors = {"street_fg": "street", "street_bg": "street", "street_shift": "street",
                      "text_pad": "text"}
    manifest = schema.Manifest(
        name="digits", modalities=tuple(synthetic.digits_like_modalities()), label=None,
        metadata_keys={"street_fg": (3,), "street_bg": (3,), "street_shift": (2,), "text_pad": (1,),
                       "digit_source": (1,)}, factors=digits_factors,
        splits={"train": schema.SplitInfo(("x",), 1)})
    assert analysis.default_factors(manifest) == digits_factors
    assert analysis.default_factors(dataclasses.replace(manifest, factors={})) == {}


def test_analyze_uses_the_factors_the_manifest_declares(planted_run, tmp_path):
    data_dir, workdir = planted_run
    undeclared = analysis.analyze(workdir, swap_examples=1, swap_samples=1)
    assert undeclared["factors"] is None
    assert "declares no ground-truth factors" in undeclared["skipped"]["factors"]

    declared = str(tmp_path / "declared")
    shutil.copytree(data_dir, declared)
    manifest = schema.read_manifest(declared)
    schema.write_manifest(declared, dataclasses.replace(manifest, factors={"noise_seed": "street"}))
    result = analysis.analyze(workdir, declared, swap_examples=1, swap_samples=1)
    assert "factors" not in result["skipped"]
    assert set(result["factors"]) == {"noise_seed"} and result["factors"]["noise_seed"]["modality"] == "street"
    assert list(result["private_vs_factors"]) == ["street"]
    assert result["files"]["factor_r2"] == "factor_r2.png"
