"""Rows that miss a modality (issue 16 item 4, the data side): `present_NAME` arrays and
--nan-as-missing in `bmvae data build arrays`, the per-record mask, the manifest's counts,
statistics of present rows only, the reader's batch["present"] and evaluation's fully observed rows."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import arrays, build_arrays
from bmvae_tf.trainers import input_pipeline

IN_PROCESS = ["--runner=FnApiRunner"]
N = 60
NAMES = ["vec", "img", "tok"]


def missing_arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """`tok` (always present) spells the row number in its first token; `vec` misses the rows
    that are all NaN (and a few by mask), `img` the rows its mask says, never both in one row."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    vec = rng.normal(5.0, 3.0, size=(n, 3))
    vec_nan = rows % 5 == 1
    vec[vec_nan] = np.nan
    present_img = rows % 4 != 2
    present_vec = rows % 7 != 3
    # Garbage in rows marked missing: never read into statistics or records.
    vec[~present_vec] = 1e6
    img = rng.uniform(size=(n, 4, 4)).astype(np.float32)
    img[~present_img] = 7.0  # read into the value range, it would make the images [0, 255] ones
    tok = rng.integers(0, 5, size=(n, 3))
    tok[:, 0] = rows
    return {"vec": vec, "img": img, "tok": tok, "present_img": present_img, "present_vec": present_vec,
            "label": rng.integers(0, 3, n)}


def expected_present(values: dict) -> np.ndarray:
    """[N, 3] bool in manifest order (vec, img, tok), as the builder must decide it."""
    vec_present = values["present_vec"] & ~np.isnan(values["vec"]).all(axis=1)
    return np.stack([vec_present, values["present_img"], np.ones(len(vec_present), bool)], axis=1)


def read_all(manifest: schema.Manifest, split: str, **options) -> dict[str, np.ndarray]:
    dataset = input_pipeline.make_dataset(manifest, split, 16, input_pipeline.ReadOptions(**options))
    batches = list(dataset.as_numpy_iterator())
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    values = missing_arrays()
    path = str(tmp_path_factory.mktemp("npz") / "holes.npz")
    np.savez(path, **values)
    return path, values


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    path, _ = source
    return build_arrays.build_arrays(str(tmp_path_factory.mktemp("holes")), input_path=path,
                                     sequences=("tok",), seed=2, nan_as_missing=True, beam_args=IN_PROCESS)


def test_masks_round_trip_through_the_job_and_the_reader(built, source):
    _, values = source
    present = expected_present(values)
    assert built.modality_names == NAMES and built.has_missing_rows
    seen = []
    for split in schema.SPLITS:
        data = read_all(built, split)
        rows = data["tok"][:, 0]
        seen.extend(rows.tolist())
        assert data["present"].dtype == bool and data["present"].shape == (len(rows), 3)
        np.testing.assert_array_equal(data["present"], present[rows])
        # Absent rows are zeros; present rows carry their values in model units.
        assert not data["vec"][~present[rows, 0]].any() and not data["img"][~present[rows, 1]].any()
        np.testing.assert_array_equal(data["img"][present[rows, 1]][..., 0],
                                      values["img"][rows][present[rows, 1]])
        counts = built.present_counts[split]
        assert counts.modalities == dict(zip(NAMES, present[rows].sum(axis=0).tolist()))
        assert counts.fully_observed == built.fully_observed_count(split) == int(present[rows].all(axis=1).sum())
    assert sorted(seen) == list(range(N))
    on_disk = json.load(open(schema.manifest_path(built.directory)))
    assert on_disk["format_version"] == schema.MISSING_ROWS_FORMAT_VERSION
    assert on_disk["present_counts"]["train"] == built.present_counts["train"].to_json()
    assert schema.read_manifest(built.directory).present_counts == built.present_counts


def test_statistics_use_the_present_train_rows_only(built, source):
    _, values = source
    train_rows = read_all(built, "train")["tok"][:, 0]
    used = train_rows[expected_present(values)[train_rows, 0]]
    assert 0 < len(used) < len(train_rows)
    stats = built.modality("vec").standardization
    raw = values["vec"][used]
    assert stats["count"] == len(used)
    np.testing.assert_allclose(stats["offset"], raw.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["scale"], raw.std(axis=0), rtol=1e-12)
    data = read_all(built, "train")
    kept = expected_present(values)[data["tok"][:, 0], 0]
    np.testing.assert_allclose(data["vec"][kept], (raw - stats["offset"]) / stats["scale"], atol=1e-5)
    # The image's value range ignores the 7s of its missing rows: still an image in [0, 1].
    assert built.modality("img").standardization is None
    assert built.modality("tok").vocab_size == N


def test_a_complete_dataset_reads_as_all_present_and_writes_version_1(source, tmp_path):
    _, values = source
    complete = {k: v for k, v in values.items() if not k.startswith("present_")}
    complete["vec"] = np.nan_to_num(complete["vec"])
    path = str(tmp_path / "complete.npz")
    np.savez(path, **complete)
    manifest = build_arrays.build_arrays(str(tmp_path / "out"), input_path=path, sequences=("tok",),
                                         seed=2, beam_args=IN_PROCESS)
    assert not manifest.has_missing_rows and manifest.present_counts == {}
    on_disk = json.load(open(schema.manifest_path(manifest.directory)))
    assert on_disk["format_version"] == schema.FORMAT_VERSION and "present_counts" not in on_disk
    assert "present" not in schema.feature_spec(manifest)
    data = read_all(manifest, "test")
    assert data["present"].dtype == bool and data["present"].shape == (manifest.split("test").count, 3)
    assert data["present"].all()
    assert manifest.fully_observed_count("test") == manifest.split("test").count
    # The evaluation filter keeps every row of a complete dataset.
    assert len(read_all(manifest, "test", fully_observed=True)["tok"]) == manifest.split("test").count


def test_the_evaluation_filter_keeps_the_fully_observed_rows(built, source):
    _, values = source
    for split in schema.SPLITS:
        data = read_all(built, split, fully_observed=True)
        assert len(data["tok"]) == built.fully_observed_count(split) > 0
        assert data["present"].all()
        assert expected_present(values)[data["tok"][:, 0]].all()
        limited = read_all(built, split, fully_observed=True)  # take counts kept rows
        assert len(limited["tok"]) == built.fully_observed_count(split)
    first_two = list(input_pipeline.make_dataset(built, "test", 1, input_pipeline.ReadOptions(
        fully_observed=True), take=2).as_numpy_iterator())
    assert [b["present"].all() for b in first_two] == [True, True]


def test_evaluation_reads_fully_observed_rows_and_records_their_count(built):
    from bmvae_tf.trainers import config as config_lib
    from bmvae_tf.trainers import run_dir
    from bmvae_tf.trainers.evaluation.context import EvalContext
    from bmvae_tf.trainers.evaluation.metrics import Metrics

    for split in schema.EVALUATION_SPLITS:
        context = EvalContext(model=None, manifest=built, eval=config_lib.EvalConfig(batch_size=8), seed=0,
                              paths=run_dir.RunPaths("unused"), history=[], split=split,
                              metrics=Metrics("m", built.name, NAMES, 0, None, split=split))
        assert context.metrics.to_json()["examples_fully_observed"] == built.fully_observed_count(split)
        scored = sum(int(b["tok"].shape[0]) for b in context.batches("test"))
        assert scored == built.fully_observed_count(split) < built.split(split).count
        assert context.train_count == built.fully_observed_count("train")
    old = Metrics("m", "d", ["a"], 1, None).to_json()
    assert "examples_fully_observed" not in old  # not written unless an evaluation set it
    assert Metrics.from_json(old).examples_fully_observed is None


def test_the_mask_alone_marks_missing_rows_and_nan_in_them_is_not_read(tmp_path):
    """Without --nan-as-missing, NaN in a row its mask calls missing is accepted (never read)."""
    values = missing_arrays()
    values["present_vec"] = values["present_vec"] & ~np.isnan(values["vec"]).all(axis=1)
    path = str(tmp_path / "masked.npz")
    np.savez(path, **values)
    plan = arrays.plan_arrays(path, sequences=("tok",), seed=2)
    present = expected_present(values)
    counts = {split: c.modalities["vec"] for split, c in plan.present_counts.items()}
    assert sum(counts.values()) == int(present[:, 0].sum())
    assert plan.masks == {"vec": "present_vec", "img": "present_img"}


def one_line_error(path, values, match, **kwargs):
    np.savez(path, **values)
    with pytest.raises(UserError, match=match) as caught:
        arrays.plan_arrays(path, sequences=("tok",), **kwargs)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("change, match, nan_as_missing", [
    (lambda v: v.update(present_imgs=np.ones(N, bool)),
     r"key 'present_imgs' is the mask of modality 'imgs', which the archive does not have", True),
    (lambda v: v.update(present_img=v["present_img"].astype(np.int64)),
     r"key 'present_img' must be booleans of shape \[N\].*got <i8 \[60\]", True),
    (lambda v: v.update(present_img=np.ones((N, 2), bool)),
     r"key 'present_img' must be booleans of shape \[N\].*\[60, 2\]", True),
    (lambda v: v.update(present_img=np.ones(N - 1, bool)), r"key 'present_img' has 59 examples", True),
    (lambda v: v.update(present_img=np.where(np.arange(N) == 6, False, v["present_img"]),
                        present_vec=np.where(np.arange(N) == 6, False, v["present_vec"]),
                        present_tok=np.arange(N) != 6),
     r"example 6 has no modality present", True),
    (lambda v: None, r"key 'vec' holds nan at example 1; values must be finite \(a missing row: mark it "
                     r"in present_vec, or make it all NaN and pass --nan-as-missing\)", False),
    (lambda v: v["vec"].__setitem__((4, 2), np.nan),
     r"key 'vec' is partly NaN at example 4 \(1 of 3 values\); --nan-as-missing takes only rows", True),
    (lambda v: v["vec"].__setitem__((4, 2), np.inf), r"key 'vec' holds inf at example 4", True),
])
def test_bad_missing_rows_are_one_line_errors(tmp_path, change, match, nan_as_missing):
    values = missing_arrays()
    change(values)
    one_line_error(str(tmp_path / "bad.npz"), values, match, nan_as_missing=nan_as_missing)


def test_the_manifest_checks_its_present_counts():
    specs = (schema.ModalitySpec("a", "vector", (2,), likelihood="gaussian"),
             schema.ModalitySpec("b", "vector", (2,), likelihood="gaussian"))
    counts = {"train": schema.PresentCounts({"a": 8, "b": 7}, 5)}
    manifest = schema.Manifest("m", specs, {"train": schema.SplitInfo(("x",), 10)}, present_counts=counts)
    manifest.validate()
    assert schema.Manifest.from_json(manifest.to_json()).present_counts == counts
    bad = {
        "modalities.a: 11 rows, the split has 10": dict(present_counts={"train": schema.PresentCounts({"a": 11, "b": 7}, 5)}),
        "fully_observed": dict(present_counts={"train": schema.PresentCounts({"a": 8, "b": 7}, 8)}),
        "every modality": dict(present_counts={"train": schema.PresentCounts({"a": 8}, 5)}),
        "every split": dict(splits={"train": schema.SplitInfo(("x",), 10), "test": schema.SplitInfo(("y",), 3)}),
        "reserved": dict(modalities=(specs[0], dataclasses.replace(specs[1], name="present"))),
    }
    for match, change in bad.items():
        with pytest.raises(schema.SchemaError, match=match):
            dataclasses.replace(manifest, **change).validate()
    as_json = manifest.to_json()
    as_json["format_version"] = schema.FORMAT_VERSION
    with pytest.raises(schema.SchemaError, match="format_version 1 goes with no present_counts"):
        schema.Manifest.from_json(as_json)
    del as_json["present_counts"]
    as_json["format_version"] = schema.MISSING_ROWS_FORMAT_VERSION
    with pytest.raises(schema.SchemaError, match="format_version 2 goes with present_counts"):
        schema.Manifest.from_json(as_json)


def test_records_write_zeros_for_absent_modalities_and_refuse_an_empty_mask():
    specs = (schema.ModalitySpec("a", "vector", (2,), likelihood="gaussian"),
             schema.ModalitySpec("s", "sequence", (3,), "int64", "categorical", vocab=("x", "y")))
    manifest = schema.Manifest("m", specs, {"train": schema.SplitInfo(("x",), 1)},
                               present_counts={"train": schema.PresentCounts({"a": 1, "s": 0}, 0)})
    serialized = schema.encode_example(manifest, {"a": np.array([1.0, 2.0]), "s": np.array([np.nan]),
                                                  "present": np.array([True, False])})
    parsed = schema.decode_parsed(manifest, tf.io.parse_example([serialized], schema.feature_spec(manifest)))
    assert parsed["present"].numpy().tolist() == [[True, False]]
    assert parsed["s"].numpy().tolist() == [[0, 0, 0]] and parsed["a"].numpy().tolist() == [[1.0, 2.0]]
    with pytest.raises(schema.SchemaError, match="record has no modality present"):
        schema.encode_example(manifest, {"a": np.zeros(2), "present": np.array([False, False])})
    with pytest.raises(schema.SchemaError, match="must be 2 booleans"):
        schema.encode_example(manifest, {"a": np.zeros(2), "s": np.zeros(3), "present": np.array([True])})
    complete = dataclasses.replace(manifest, present_counts={})
    with pytest.raises(schema.SchemaError, match="declares no missing rows"):
        schema.encode_example(complete, {"a": np.zeros(2), "s": np.zeros(3), "present": np.array([True, True])})


def test_the_api_dataset_yields_the_mask(built):
    from bmvae_tf import api

    batch = next(iter(api.load_dataset(built.directory, "train", batch_size=5)))
    assert batch["present"].dtype == tf.bool and batch["present"].shape == (5, 3)


def test_the_cli_takes_nan_as_missing(source, tmp_path):
    from bmvae_tf.trainers import cli

    path, _ = source
    out = str(tmp_path / "cli")
    assert cli.main(["data", "build", "arrays", "--input", path, "--output", out, "--sequence", "tok",
                     "--nan-as-missing", "--seed", "2", "--", *IN_PROCESS]) in (0, None)
    manifest = schema.read_manifest(out)
    assert manifest.has_missing_rows and manifest.source["nan_as_missing"] is True
    assert os.path.exists(os.path.join(out, manifest.split("train").files[0]))
