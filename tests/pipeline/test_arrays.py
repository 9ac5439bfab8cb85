"""`bmvae data build arrays`: users' .npz files, standardisation, splits, export units, bad input."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import arrays, build_arrays
from tests.source_fixtures import read_bytes, read_split
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import export

IN_PROCESS = ["--runner=FnApiRunner"]
N = 60


def example_arrays(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """`row` carries the row number; the others differ in kind, size, dtype and scale."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    return {
        "row": np.arange(n, dtype=np.float64)[:, None] * np.array([[1.0, -2.0]]) + 1000.0,
        "feat": (rng.normal(50.0, 20.0, size=(n, 7)) + label[:, None]).astype(np.float32),
        "photo": rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8),
        "gray": rng.uniform(size=(n, 6, 5)).astype(np.float32),
        "tokens": rng.integers(0, 9, size=(n, 5)),
        "label": label,
    }


def row_of(data: dict) -> np.ndarray:
    """Recovers the row number from the standardised `row` modality via the manifest stats."""
    return np.round(data["row_raw"][:, 0] - 1000.0).astype(int)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, dict]:
    values = example_arrays()
    path = str(tmp_path_factory.mktemp("npz") / "mine.npz")
    np.savez(path, **values)
    return path, values


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    path, _ = source
    return build_arrays.run_arrays_job(str(tmp_path_factory.mktemp("arrays")), input_path=path,
                                       sequences=("tokens",), seed=3, beam_args=IN_PROCESS)


def split_data(manifest, split):
    data = read_split(manifest, split)
    stats = manifest.modality("row").standardization
    data["row_raw"] = data["row"] * np.array(stats["scale"]) + np.array(stats["offset"])
    return data


def test_manifest_describes_kinds_shapes_and_transforms(built, source):
    manifest = built.manifest
    assert manifest.name == "mine"
    assert [(m.name, m.kind, m.shape, m.dtype) for m in manifest.modalities] == [
        ("row", "vector", (2,), "float32"), ("feat", "vector", (7,), "float32"),
        ("photo", "image", (8, 8, 3), "float32"), ("gray", "image", (6, 5, 1), "float32"),
        ("tokens", "sequence", (5,), "int64")]
    assert manifest.modality("photo").standardization == {"method": "rescale", "offset": 0.0, "scale": 255.0}
    assert manifest.modality("gray").standardization is None  # already in [0, 1]
    assert manifest.modality("tokens").vocab == tuple(str(i) for i in range(int(source[1]["tokens"].max()) + 1))
    assert manifest.label == schema.LabelSpec("label", 3, None)
    sizes = {"row": 2, "feat": 7, "photo": 192, "gray": 30, "tokens": 5}
    assert {m.name: m.likelihood_weight for m in manifest.modalities} == pytest.approx(
        {k: 192 / v for k, v in sizes.items()})
    assert manifest.source["sha256"] and manifest.source["split_from"] == "seeded draw"
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": N - 12 - 5, "validation": 5, "test": 12}
    assert manifest.source["validation_fraction"] == schema.DEFAULT_VALIDATION_FRACTION


def test_validation_is_drawn_from_train_and_the_test_rows_do_not_depend_on_it(built, source, tmp_path):
    """The test rows are the two-split rule's (`test_rows`), whatever --validation-fraction."""
    path, _ = source
    two_split_test = np.flatnonzero(arrays.test_rows(N, 0.2, 3, np.arange(N)))
    rows = {split: row_of(split_data(built.manifest, split)) for split in schema.SPLITS}
    assert sorted(rows["test"].tolist()) == two_split_test.tolist()
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(N))
    wider = build_arrays.build_arrays(str(tmp_path / "wide"), input_path=path, sequences=("tokens",), seed=3,
                                      validation_fraction=0.5, beam_args=IN_PROCESS)
    assert {k: v.count for k, v in wider.splits.items()} == {"train": 24, "validation": 24, "test": 12}
    assert sorted(row_of(split_data(wider, "test")).tolist()) == two_split_test.tolist()
    # The same rows and the same statistics-free modalities: the test records of unstandardised
    # arrays are byte for byte those of the default build.
    assert np.array_equal(read_split(wider, "test")["photo"], read_split(built.manifest, "test")["photo"])


def test_vectors_are_standardised_with_train_statistics_only(built, source):
    _, values = source
    manifest = built.manifest
    train, test = split_data(manifest, "train"), split_data(manifest, "test")
    train_rows, test_rows = row_of(train), row_of(test)
    validation_rows = row_of(split_data(manifest, "validation"))
    assert sorted([*train_rows, *validation_rows, *test_rows]) == list(range(N))
    for name in ("row", "feat"):
        stats = manifest.modality(name).standardization
        assert stats["method"] == "standardize" and stats["count"] == len(train_rows)
        raw_train = values[name][train_rows].astype(np.float64)
        np.testing.assert_allclose(stats["offset"], raw_train.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats["scale"], raw_train.std(axis=0), rtol=1e-9)
        # ... not the statistics of all rows, which differ.
        assert not np.allclose(stats["offset"], values[name].astype(np.float64).mean(axis=0), rtol=1e-9)
        for data, rows in ((train, train_rows), (test, test_rows)):
            expected = (values[name][rows] - np.array(stats["offset"])) / np.array(stats["scale"])
            np.testing.assert_allclose(data[name], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(train[name].mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(train[name].std(axis=0), 1.0, atol=1e-5)
    for data, rows in ((train, train_rows), (test, test_rows)):
        np.testing.assert_allclose(data["photo"], values["photo"][rows] / 255.0, atol=1e-7)
        np.testing.assert_allclose(data["gray"][..., 0], values["gray"][rows], atol=0)
        assert np.array_equal(data["tokens"], values["tokens"][rows])
        assert np.array_equal(data["label"], values["label"][rows])


def test_split_key_and_no_standardize(tmp_path):
    values = example_arrays()
    values["split"] = np.where(np.arange(N) % 4 == 0, "test", "train")
    path = str(tmp_path / "s.npz")
    np.savez(path, **values)
    manifest = build_arrays.build_arrays(str(tmp_path / "out"), input_path=path, standardize=False,
                                         beam_args=IN_PROCESS)
    counts = {k: v.count for k, v in manifest.splits.items()}
    assert counts["test"] == 15 and counts["train"] + counts["validation"] == 45 and counts["validation"] > 0
    assert manifest.modality("row").standardization is None
    test = read_split(manifest, "test")
    assert sorted(np.round(test["row"][:, 0] - 1000).astype(int).tolist()) == list(range(0, N, 4))
    validation = read_split(manifest, "validation")
    assert not set(np.round(validation["row"][:, 0] - 1000).astype(int).tolist()) & set(range(0, N, 4))
    np.testing.assert_allclose(np.sort(test["feat"][:, 0]), np.sort(values["feat"][::4, 0]), rtol=1e-6)
    assert manifest.modality("photo").standardization["method"] == "rescale"  # images still rescale


def test_a_split_key_with_validation_rows_is_honoured(tmp_path):
    values = example_arrays()
    values["split"] = np.array(["train", "validation", "test"] * (N // 3))
    path = str(tmp_path / "v.npz")
    np.savez(path, **values)
    manifest = build_arrays.build_arrays(str(tmp_path / "out"), input_path=path, standardize=False,
                                         validation_fraction=0.5, beam_args=IN_PROCESS)
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 20, "validation": 20, "test": 20}
    rows = np.round(read_split(manifest, "validation")["row"][:, 0] - 1000).astype(int)
    assert sorted(rows.tolist()) == list(range(1, N, 3))
    assert manifest.source["validation_fraction"] is None


def test_same_input_gives_byte_identical_shards_whatever_the_npz_compression(built, source, tmp_path):
    _, values = source
    compressed = str(tmp_path / "mine.npz")
    np.savez_compressed(compressed, **values)
    again = build_arrays.build_arrays(str(tmp_path / "out"), input_path=compressed, sequences=("tokens",),
                                      seed=3, beam_args=IN_PROCESS)
    expected, written = read_bytes(built.manifest.directory), read_bytes(again.directory)
    assert written.keys() == expected.keys()
    for name in expected:
        if name != schema.MANIFEST_FILENAME:  # it records the input's checksum
            assert written[name] == expected[name], name
    other = build_arrays.build_arrays(str(tmp_path / "seed4"), input_path=compressed, sequences=("tokens",),
                                      seed=4, beam_args=IN_PROCESS)
    assert row_of(split_data(other, "test")).tolist() != row_of(split_data(built.manifest, "test")).tolist()


def test_read_rows_seeks_in_stored_members_and_streams_deflated_ones(source, tmp_path):
    path, values = source
    compressed = str(tmp_path / "c.npz")
    np.savez_compressed(compressed, **values)
    fortran = str(tmp_path / "f.npz")
    np.savez(fortran, feat=np.asfortranarray(values["feat"]), row=values["row"])
    for archive in (path, compressed, fortran):
        members = arrays.inspect_npz(archive)
        assert members["feat"].stored == (archive != compressed)
        np.testing.assert_array_equal(arrays.read_rows(archive, members["feat"], 17, 29), values["feat"][17:29])
        chunks = list(arrays.iter_chunks(archive, members["feat"], rows=25))
        assert [s for s, _ in chunks] == [0, 25, 50]
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), values["feat"])


def test_export_takes_and_returns_source_units(built, source):
    _, values = source
    manifest = built.manifest
    model_config = config_lib.ModelConfig(name="bmvae_p", latent_dim=4, hidden_units=[16],
                                          channels=[8, 8, 8], sequence_width=8)
    model = config_lib.build_model(model_config, manifest.modalities)
    module = export.ServingModule(model, manifest)
    rows = np.arange(5)
    raw = {"row": values["row"][rows].astype(np.float32), "feat": values["feat"][rows],
           "photo": values["photo"][rows].astype(np.float32), "gray": values["gray"][rows][..., None],
           "tokens": values["tokens"][rows]}
    present = tf.constant([True, True, True, False, True])
    feed = [tf.constant(raw[m.name], export.serving_dtype(m)) for m in manifest.modalities]
    encoded = module.encode(*feed, present)
    model_inputs = {m.name: tf.constant(np.stack([arrays.to_model_units(m, r) for r in raw[m.name]]),
                                        export.serving_dtype(m))
                    for m in manifest.modalities}
    model_inputs["gray"] = tf.zeros_like(model_inputs["gray"])
    np.testing.assert_allclose(encoded["z_mean"], model.posterior(model_inputs, present).mean(), rtol=1e-5,
                               atol=1e-6)
    generated = module.cross_generate(*feed, present)
    decoded = model.generate(encoded["z_sample"])
    stats = manifest.modality("feat").standardization
    np.testing.assert_allclose(generated["feat"], decoded["feat"] * np.array(stats["scale"], np.float32)
                               + np.array(stats["offset"], np.float32), rtol=1e-5)
    np.testing.assert_allclose(generated["photo"], decoded["photo"] * 255.0, rtol=1e-5)
    np.testing.assert_allclose(generated["gray"], decoded["gray"], rtol=1e-6)
    assert generated["photo"].numpy().max() > 1.0  # in [0, 255], not [0, 1]


@pytest.mark.slow
def test_six_vector_modalities_of_different_sizes_and_scales_train_and_evaluate(tmp_path):
    from bmvae_tf.trainers import cli

    rng = np.random.default_rng(0)
    n = 400
    label = rng.integers(0, 4, n)
    sizes, scales = (1, 3, 5, 8, 13, 40), (1e-3, 1.0, 10.0, 1e2, 1e3, 5e4)
    values = {}
    for i, (size, scale) in enumerate(zip(sizes, scales)):
        prototypes = rng.normal(size=(4, size))
        values[f"m{i}"] = (scale * (prototypes[label] + 0.3 * rng.normal(size=(n, size))) + 7 * scale)
    values["label"] = label
    path = str(tmp_path / "six.npz")
    np.savez(path, **values)
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    assert cli.main(["data", "build", "arrays", "--input", path, "--output", data, "--",
                     *IN_PROCESS]) == 0
    manifest = schema.read_manifest(data)
    assert [m.shape for m in manifest.modalities] == [(s,) for s in sizes]
    assert cli.main(["train", "--data", data, "--workdir", run, "--model", "bmvae_m", "--epochs", "3",
                     "--set", "model.latent_dim=8", "--set", "model.hidden_units=[32]",
                     "--set", "train.batch_size=32", "--set", "eval.classifier_epochs=2",
                     "--set", "eval.random_samples=50", "--set", "eval.log_likelihood_samples=8",
                     "--set", "eval.log_likelihood_examples=16",
                     "--set", "eval.robustness_noise_levels=[0,1]"]) == 0
    history = [json.loads(line) for line in open(f"{run}/history.jsonl")]
    assert history[-1]["loss"] < history[0]["loss"] and np.isfinite(history[-1]["val_loss"])
    assert cli.main(["evaluate", "--workdir", run]) == 0
    metrics = json.load(open(f"{run}/metrics.json"))
    assert len(metrics["latent_accuracy"]) == 2 ** 6 - 1
    # The class is in every modality, whatever its scale: the joint latent finds it.
    assert metrics["latent_accuracy"]["+".join(f"m{i}" for i in range(6))] > 0.5


# --------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and key, nothing written


def refused(tmp_path, match: str, values=None, *, path=None, **kwargs) -> None:
    if path is None:
        path = str(tmp_path / "bad.npz")
        np.savez(path, **values)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        build_arrays.build_arrays(str(out), input_path=path, beam_args=IN_PROCESS, **kwargs)
    assert not out.exists()


def test_nan_in_a_modality(tmp_path):
    values = example_arrays()
    values["feat"][17, 3] = np.nan
    refused(tmp_path, r"bad.npz: key 'feat' holds nan at example 17", values)


def test_modalities_of_different_lengths(tmp_path):
    values = example_arrays()
    values["gray"] = values["gray"][:-1]
    refused(tmp_path, r"bad.npz: key 'gray' has 59 examples, but 'row' has 60", values)


def test_pickled_object_array(tmp_path):
    values = example_arrays()
    values["feat"] = np.array([{"x": 1}] * N, dtype=object)
    refused(tmp_path, r"bad.npz: key 'feat' is an object array.*allow_pickle=False", values)


@pytest.mark.parametrize("change, match", [
    (lambda v: v.update(label=v["label"].astype(np.float32)), "key 'label' must be integers"),
    (lambda v: v.update(label=v["label"] - 1), "key 'label' holds -1"),
    (lambda v: v.update(split=np.array(["train", "valid"] * (N // 2))), "key 'split' holds 'valid' at example 1"),
    (lambda v: v.update(split=np.array(["train"] * N)), "the test split is empty"),
    (lambda v: v.update(split=np.arange(N)), "key 'split' must be strings"),
    (lambda v: v.update(photo=v["photo"].astype(np.float32) * 2), r"key 'photo' is an image .* \[0, 510\]"),
    (lambda v: v.update(feat=np.array([str(i) for i in range(N)])), "key 'feat' has dtype <U2"),
    (lambda v: v.update(feat=np.zeros((N, 2, 2, 2, 2))), "key 'feat' has 4 axes per example"),
    (lambda v: [v.pop(k) for k in ("feat", "photo", "gray", "tokens")], r"at least 2 modality arrays .*\['row'\]"),
])
def test_bad_arrays(tmp_path, change, match):
    values = example_arrays()
    change(values)
    refused(tmp_path, match, values)


def test_bad_sequences_files_and_arguments(tmp_path):
    values = example_arrays()
    refused(tmp_path, r"--sequence words: .* has no modality 'words'", values, sequences=("words",))
    refused(tmp_path, r"key 'feat' \(--sequence\) must be integer token ids", values, sequences=("feat",))
    refused(tmp_path, "missing.npz: file not found", path=str(tmp_path / "missing.npz"))
    (tmp_path / "plain.npz").write_bytes(b"not a zip archive")
    refused(tmp_path, "plain.npz: not a .npz archive", path=str(tmp_path / "plain.npz"))
    refused(tmp_path, "test_fraction", values, test_fraction=1.0)
    refused(tmp_path, "validation_fraction", values, validation_fraction=0.0)
    np.savez(str(tmp_path / "names.npz"), **{"a+b": values["row"], "feat": values["feat"]})
    refused(tmp_path, "names must be non-empty and free of '\\+'", path=str(tmp_path / "names.npz"))


def test_output_dir_holding_another_dataset_is_refused_unless_overwrite(source, tmp_path):
    path, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "mnist-svhn"}))
    with pytest.raises(UserError, match=f"{out}: already holds dataset 'mnist-svhn'.*--overwrite"):
        build_arrays.build_arrays(str(out), input_path=path, beam_args=IN_PROCESS)
    assert os.listdir(out) == ["manifest.json"]
    build_arrays.build_arrays(str(out), input_path=path, overwrite=True, beam_args=IN_PROCESS)
    assert schema.read_manifest(str(out)).name == "mine"


def test_train_rows_first_then_the_rest_standardise_over_train_alone(tmp_path, monkeypatch):
    """A `split` array sorted by split: the read chunks past the train rows hold no train row."""
    from bmvae_tf.pipeline import arrays

    monkeypatch.setattr(arrays, "ROWS_PER_CHUNK", 16)
    values = example_arrays()
    values["split"] = np.array(["train"] * 30 + ["validation"] * 10 + ["test"] * 20)
    path = str(tmp_path / "sorted.npz")
    np.savez(path, **values)
    manifest = build_arrays.build_arrays(str(tmp_path / "out"), input_path=path, beam_args=IN_PROCESS)
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 30, "validation": 10, "test": 20}
    stats = manifest.modality("feat").standardization
    np.testing.assert_allclose(stats["offset"], values["feat"][:30].astype(np.float64).mean(axis=0), rtol=1e-12)
