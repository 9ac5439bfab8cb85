"""Tests of the Digits dataset: the pure functions, the Beam plumbing and the whole job."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import beam_io, digits
from bmvae_tf.pipeline.build_digits import array_sha256, build_digits, manifest_template

# The in-process FnApiRunner, for tests that monkeypatch or must not depend on the network (the
# DirectRunner first tries to download and start the Prism runner).
IN_PROCESS = ["--runner=FnApiRunner"]


def pair_arrays(pairs: list[digits.Pair]) -> dict[str, np.ndarray]:
    return {field: np.array([getattr(p, field) for p in pairs])
            for field in ("index", "label", "digit_source", "street_source")}


def read_split(manifest: schema.Manifest, split: str) -> dict[str, np.ndarray]:
    """Every record of a split, parsed with the schema's feature spec: name -> [count, ...]."""
    spec = schema.feature_spec(manifest)
    ds = (tf.data.TFRecordDataset(manifest.split_paths(split), compression_type=schema.COMPRESSION)
          .batch(1024)
          .map(lambda x: schema.decode_parsed(manifest, tf.io.parse_example(x, spec))))
    batches = list(ds.as_numpy_iterator())
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def read_bytes(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


# --------------------------------------------------------------------------------------------
# Source split and pairing (pure)


def test_split_sources_is_disjoint_with_the_documented_sizes(source):
    images, _ = source
    split = digits.split_sources(len(images), 0.2, seed=0)
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (1293, 144, 360)
    assert not set(split["train"]) & set(split["test"])
    assert not set(split["validation"]) & (set(split["train"]) | set(split["test"]))
    assert sorted([*split["train"], *split["validation"], *split["test"]]) == list(range(len(images)))
    other = digits.split_sources(len(images), 0.2, seed=1)
    assert not np.array_equal(split["test"], other["test"])


def test_validation_is_carved_out_of_train_and_leaves_test_as_it_was(source):
    """The test images are those of the two-split rule (the first permutation's tail), whatever
    the validation fraction; validation takes only images the two-split rule gave to train."""
    images, _ = source
    order = np.random.default_rng(0).permutation(len(images))
    old_train, old_test = np.sort(order[:1437]), np.sort(order[1437:])
    for fraction in (0.1, 0.3):
        split = digits.split_sources(len(images), 0.2, seed=0, validation_fraction=fraction)
        assert np.array_equal(split["test"], old_test)
        assert np.array_equal(np.union1d(split["train"], split["validation"]), old_train)
        assert len(split["validation"]) == round(fraction * 1437)
    with pytest.raises(UserError, match="validation_fraction"):
        digits.split_sources(len(images), 0.2, seed=0, validation_fraction=0.0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.9999])
def test_split_sources_rejects_bad_fractions(fraction):
    with pytest.raises(UserError, match="test_fraction"):
        digits.split_sources(1797, fraction, seed=0)


def test_make_pairs_follows_the_mmvae_recipe(source):
    images, labels = source
    split = digits.split_sources(len(images), 0.2, seed=0)
    totals = {}
    for name in digits.SPLITS:
        pairs = digits.make_pairs(labels, split[name], dm=10, seed=0, split=name)
        a = pair_arrays(pairs)
        totals[name] = len(pairs)
        assert np.array_equal(a["index"], np.arange(len(pairs)))
        assert {p.split for p in pairs} == {name}
        for c in range(digits.NUM_CLASSES):
            n_c = int(np.sum(labels[split[name]] == c))
            assert np.sum(a["label"] == c) == 10 * n_c
        assert np.array_equal(labels[a["digit_source"]], a["label"])
        assert np.array_equal(labels[a["street_source"]], a["label"])
        assert np.all(a["digit_source"] != a["street_source"])
        # Each source image of the split appears exactly dm times on each side, and no other.
        for side in ("digit_source", "street_source"):
            assert np.array_equal(np.unique(a[side], return_counts=True)[0], split[name])
            assert set(np.unique(a[side], return_counts=True)[1]) == {10}
        # Shuffled across classes, so a prefix (or a shard) holds every class.
        assert len(set(a["label"][:200])) == digits.NUM_CLASSES
    assert totals == {"train": 12930, "test": 3600, "validation": 1440}


def test_make_pairs_is_deterministic(source):
    images, labels = source
    idx = digits.split_sources(len(images), 0.2, seed=3)["test"]
    first = digits.make_pairs(labels, idx, dm=2, seed=3, split="test")
    assert first == digits.make_pairs(labels, idx, dm=2, seed=3, split="test")
    assert first != digits.make_pairs(labels, idx, dm=2, seed=4, split="test")
    assert first != digits.make_pairs(labels, idx, dm=2, seed=3, split="train")


def test_make_pairs_rejects_unpairable_classes_and_bad_dm():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    with pytest.raises(UserError, match=r"class 3 \('three'\).*test split"):
        digits.make_pairs(labels, np.arange(len(labels)), dm=1, seed=0, split="test")
    with pytest.raises(UserError, match="dm"):
        digits.make_pairs(labels, np.arange(len(labels)), dm=0, seed=0, split="train")


@pytest.mark.parametrize("seed", range(20))
def test_repair_collisions_keeps_the_multiset(seed):
    rng = np.random.default_rng(seed)
    values = np.arange(int(rng.integers(2, 6)))
    dm = int(rng.integers(1, 6))
    digit_side = np.concatenate([rng.permutation(values) for _ in range(dm)])
    # Worst case: every position collides, many of them with the same image.
    for street_side in (digit_side.copy(), np.concatenate([rng.permutation(values) for _ in range(dm)])):
        repaired = digits.repair_collisions(digit_side, street_side, rng)
        assert np.all(repaired != digit_side)
        assert np.array_equal(np.sort(repaired), np.sort(street_side))


# --------------------------------------------------------------------------------------------
# Rendering (pure)


def test_shift_image_fills_with_zeros_instead_of_wrapping():
    image = np.arange(1, 17, dtype=float).reshape(4, 4)
    shifted = digits.shift_image(image, 1, -2)
    expected = np.zeros((4, 4))
    expected[1:, :2] = image[:3, 2:]
    assert np.array_equal(shifted, expected)
    assert np.array_equal(digits.shift_image(image, 0, 0), image)


def test_text_round_trip_and_vocabulary():
    assert len(digits.VOCAB) == 28 and digits.VOCAB[:3] == ("<pad>", " ", "a")
    for label, name in enumerate(digits.CLASS_NAMES):
        for pad in range(digits.TEXT_LENGTH - len(name) + 1):
            text = digits.class_text(label, pad)
            assert len(text) == digits.TEXT_LENGTH
            assert digits.decode_text(digits.encode_text(text)) == text
    with pytest.raises(UserError):
        digits.encode_text("Seven   ")


def test_render_pair_matches_its_metadata(source):
    images, labels = source
    pairs = digits.make_pairs(labels, np.arange(len(images)), dm=1, seed=0, split="train")[:100]
    residuals, wrong_shift, wrong_colour = [], [], []
    for pair in pairs:
        r = digits.render_pair(pair, images, seed=0)
        assert r["digit"].shape == (8, 8, 1) and r["digit"].dtype == np.float32
        assert r["street"].shape == (16, 16, 3) and r["street"].dtype == np.float32
        assert r["text"].shape == (8,) and r["text"].dtype == np.int64
        for key in ("digit", "street"):
            assert 0.0 <= r[key].min() and r[key].max() <= 1.0
        assert np.array_equal(r["digit"][..., 0], images[pair.digit_source] / 16)
        assert r["label"] == pair.label
        assert (r["digit_source"][0], r["street_source"][0]) == (pair.digit_source, pair.street_source)

        pad = int(r["text_pad"][0])
        assert 0 <= pad <= 8 - len(digits.CLASS_NAMES[pair.label])
        assert digits.decode_text(r["text"]) == " " * pad + digits.CLASS_NAMES[pair.label] + \
            " " * (8 - pad - len(digits.CLASS_NAMES[pair.label]))

        fg, bg, (dy, dx) = r["street_fg"], r["street_bg"], r["street_shift"].astype(int)
        assert np.mean(np.abs(fg - bg)) >= digits.MIN_CONTRAST
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        source_image = images[pair.street_source]
        residuals.append(r["street"] - digits.compose_street(source_image, fg, bg, (dy, dx)))
        wrong_shift.append(r["street"] - digits.compose_street(source_image, fg, bg, (dy, dx + 3)))
        wrong_colour.append(r["street"] - digits.compose_street(source_image, bg, fg, (dy, dx)))
    rms = lambda xs: float(np.sqrt(np.mean(np.square(xs))))  # noqa: E731
    # What remains is the (clipped) noise of std NOISE_STD, and only if shift and colours are right.
    assert 0.03 < rms(residuals) < digits.NOISE_STD * 1.05
    assert rms(wrong_shift) > 2 * rms(residuals)
    assert rms(wrong_colour) > 2 * rms(residuals)


def test_render_pair_depends_only_on_seed_split_and_index(source):
    images, _ = source
    pair = digits.Pair(split="train", index=5, label=3, digit_source=3, street_source=13)
    first = digits.render_pair(pair, images, seed=0)
    digits.render_pair(digits.Pair("train", 6, 3, 3, 13), images, seed=0)
    again = digits.render_pair(pair, images, seed=0)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    for other in (digits.render_pair(pair, images, seed=1),
                  digits.render_pair(digits.Pair("test", 5, 3, 3, 13), images, seed=0)):
        assert not np.array_equal(first["street"], other["street"])


def test_likelihood_weights_balance_the_modality_sizes():
    assert beam_io.balanced_likelihood_weights({"digit": 64, "street": 768, "text": 8}) == \
        {"digit": 12.0, "street": 1.0, "text": 96.0}


# --------------------------------------------------------------------------------------------
# Beam plumbing


def test_write_shards_orders_records_and_writes_empty_shards(tmp_path):
    out = str(tmp_path)
    records = [("train", 5, b"r5"), ("train", 0, b"r0"), ("train", 1, b"r1"), ("test", 0, b"t0")]
    names = {i: schema.shard_name("train", i, 4) for i in range(4)}
    with test_pipeline.TestPipeline(runner="FnApiRunner") as p:
        written = (p | beam.Create(records)
                   | beam_io.WriteShards(out, {"train": 4, "test": 1}, namespace="test"))
        assert_that(written, equal_to([("train", names[0], 1), ("train", names[1], 2),
                                       ("train", names[2], 0), ("train", names[3], 0),
                                       ("test", schema.shard_name("test", 0, 1), 1)]))
    read = lambda name: [r.numpy() for r in tf.data.TFRecordDataset(  # noqa: E731
        os.path.join(out, name), compression_type=schema.COMPRESSION)]
    assert read(names[1]) == [b"r1", b"r5"]
    assert read(names[2]) == [] and read(names[3]) == []
    assert sorted(os.listdir(out)) == sorted([*names.values(), schema.shard_name("test", 0, 1)])


def test_finish_manifest_refuses_counts_that_differ_from_the_plan(tmp_path):
    template = manifest_template(source={}, pipeline_options={})
    shards = [("train", schema.shard_name("train", 0, 2), 3), ("train", schema.shard_name("train", 1, 2), 2)]
    kwargs = dict(output_dir=str(tmp_path), template=template, num_shards={"train": 2})
    with pytest.raises(RuntimeError, match="wrote 5 records, expected 6"):
        beam_io.finish_manifest(shards, expected_counts={"train": 6}, **kwargs)
    with pytest.raises(RuntimeError, match="planned"):
        beam_io.finish_manifest(shards[:1], expected_counts={"train": 3}, **kwargs)
    assert not os.path.exists(schema.manifest_path(str(tmp_path)))
    beam_io.finish_manifest(shards, expected_counts={"train": 5}, **kwargs)
    assert schema.read_manifest(str(tmp_path)).splits["train"].count == 5


def test_prepare_output_dir_refuses_stray_shards_and_files(tmp_path):
    (tmp_path / "test-00000-of-00001.tfrecord.gz").write_bytes(b"")
    with pytest.raises(UserError, match=f"{tmp_path}.*1 shard file"):
        beam_io.prepare_output_dir(str(tmp_path), overwrite=False)
    (tmp_path / "notes.txt").write_text("kept")
    beam_io.prepare_output_dir(str(tmp_path), overwrite=True)
    assert os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(UserError, match="not a directory"):
        beam_io.prepare_output_dir(str(tmp_path / "notes.txt"), overwrite=True)


def test_options_to_json_keeps_set_options_and_hides_secrets():
    options = PipelineOptions(["--direct_num_workers=2", "--s3_secret_access_key=hunter2",
                               "--my_flag=x"])
    assert beam_io.options_to_json(options) == {
        "direct_num_workers": 2, "my_flag": "x", "runner": beam_io.LOCAL_RUNNER,
        "s3_secret_access_key": "<redacted>"}


# --------------------------------------------------------------------------------------------
# The whole job


def test_build_writes_a_valid_manifest_and_reports_counters(built, source):
    manifest = schema.read_manifest(built.manifest.directory)
    assert manifest == built.manifest
    assert manifest.name == "digits"
    assert [(m.name, m.kind, m.shape, m.dtype, m.likelihood, m.likelihood_weight)
            for m in manifest.modalities] == [
        ("digit", "image", (8, 8, 1), "float32", "laplace", 12.0),
        ("street", "image", (16, 16, 3), "float32", "laplace", 1.0),
        ("text", "sequence", (8,), "int64", "categorical", 96.0)]
    assert manifest.modality("text").vocab == digits.VOCAB
    assert manifest.label == schema.LabelSpec("label", 10, digits.CLASS_NAMES)
    assert dict(manifest.metadata_keys) == dict(digits.METADATA_SHAPES)
    assert dict(manifest.factors) == {"street_fg": "street", "street_bg": "street",
                                      "street_shift": "street", "text_pad": "text"}
    with open(schema.manifest_path(manifest.directory)) as f:
        assert json.load(f)["factors"] == dict(manifest.factors)
    assert {k: (v.files, v.count) for k, v in manifest.splits.items()} == {
        "train": (("train-00000-of-00001.tfrecord.gz",), 1293),
        "validation": (("validation-00000-of-00001.tfrecord.gz",), 144),
        "test": (("test-00000-of-00001.tfrecord.gz",), 360)}
    assert list(manifest.splits) == list(schema.SPLITS)
    assert {k: v.shard_counts for k, v in manifest.splits.items()} == {
        "train": (1293,), "validation": (144,), "test": (360,)}
    assert manifest.source["sha256"] == array_sha256(source[0])
    assert (manifest.source["num_images"], manifest.source["seed"], manifest.source["dm"]) == (1797, 0, 1)
    assert manifest.pipeline_options["runner"] == beam_io.LOCAL_RUNNER  # never Prism (issue 20)
    assert built.counters == {"train_records": 1293, "validation_records": 144, "test_records": 360,
                              "shards_written": 3}
    assert manifest.source["validation_fraction"] == schema.DEFAULT_VALIDATION_FRACTION


# sha256 of test-00000-of-00001.tfrecord.gz of `build_digits(dm=1)` as written before validation
# splits existed (commit 65e420f): carving validation out of train must not change a test byte.
TEST_SHARD_SHA256_BEFORE_VALIDATION = "17aeb367212405f0e7b9a195e9676d67a8907061bb54000d8b9b41a8f1be7d40"


def test_the_test_split_is_byte_identical_to_the_two_split_build(built):
    import hashlib

    shard = read_bytes(built.manifest.directory)["test-00000-of-00001.tfrecord.gz"]
    assert hashlib.sha256(shard).hexdigest() == TEST_SHARD_SHA256_BEFORE_VALIDATION


def manifest_json(**changes) -> dict:
    template = manifest_template(source={}, pipeline_options={})
    obj = template.to_json()
    obj["splits"] = {"train": {"files": ["train-00000-of-00001.tfrecord.gz"], "count": 1}}
    obj.update(changes)
    return obj


def test_manifest_refuses_factors_that_are_not_metadata_keys_or_modalities():
    assert schema.Manifest.from_json(manifest_json()).factors == digits.PRIVATE_FACTORS
    with pytest.raises(schema.SchemaError, match="factor 'colour' is not a metadata key"):
        schema.Manifest.from_json(manifest_json(factors={"street_fg": "street", "colour": "street"}))
    with pytest.raises(schema.SchemaError, match="factor 'text_pad': no modality 'caption'"):
        schema.Manifest.from_json(manifest_json(factors={"text_pad": "caption"}))
    with pytest.raises(schema.SchemaError, match="'factors' must be an object"):
        schema.Manifest.from_json(manifest_json(factors=["street_fg"]))


def test_manifest_without_factors_declares_none():
    """Manifests written before `factors` existed still load."""
    obj = manifest_json()
    del obj["factors"]
    assert schema.Manifest.from_json(obj).factors == {}


def test_build_records_read_back_with_the_schema(built, source):
    images, labels = source
    data = {split: read_split(built.manifest, split) for split in schema.SPLITS}
    sources = {}
    for split, d in data.items():
        n = built.manifest.splits[split].count
        assert d["digit"].shape == (n, 8, 8, 1) and d["digit"].dtype == np.float32
        assert d["street"].shape == (n, 16, 16, 3) and d["street"].dtype == np.float32
        assert d["text"].shape == (n, 8) and d["text"].dtype == np.int64
        for key in ("digit", "street"):
            assert d[key].min() >= 0.0 and d[key].max() <= 1.0
        digit_src = d["digit_source"][:, 0].astype(int)
        street_src = d["street_source"][:, 0].astype(int)
        assert np.all(digit_src != street_src)
        assert np.array_equal(labels[digit_src], d["label"])
        assert np.array_equal(labels[street_src], d["label"])
        assert np.array_equal(d["digit"][..., 0], images[digit_src] / 16)
        assert all(digits.decode_text(t) == digits.class_text(label, int(pad))
                   for t, label, pad in zip(d["text"], d["label"], d["text_pad"][:, 0]))
        sources[split] = set(digit_src) | set(street_src)
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not sources[a] & sources[b]
    assert {split: len(s) for split, s in sources.items()} == {"train": 1293, "validation": 144, "test": 360}


def test_rebuild_with_overwrite_is_byte_identical(built, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    # An older, different dataset: refused, then replaced, its stale shard removed.
    (out / "manifest.json").write_text(json.dumps({"name": "mnist-svhn"}))
    (out / "train-00003-of-00004.tfrecord.gz").write_bytes(b"stale")
    (out / "notes.txt").write_text("kept")
    with pytest.raises(UserError, match=f"{out}.*'mnist-svhn'"):
        build_digits(str(out), dm=1)
    build_digits(str(out), dm=1, overwrite=True)
    written = read_bytes(str(out))
    assert written.pop("notes.txt") == b"kept"
    assert written == read_bytes(built.manifest.directory)


@pytest.mark.slow  # 15-30 s on 2 cores: each worker process imports TensorFlow
def test_build_is_byte_identical_with_two_worker_processes(built, tmp_path):
    manifest = build_digits(str(tmp_path), dm=1,
                            beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert manifest.pipeline_options["direct_num_workers"] == 2
    expected = read_bytes(built.manifest.directory)
    written = read_bytes(str(tmp_path))
    assert written.keys() == expected.keys()
    for name in expected:
        if name != schema.MANIFEST_FILENAME:  # it records the differing Beam options
            assert written[name] == expected[name], name


def test_failed_run_leaves_no_manifest(tmp_path, monkeypatch):
    # An old dataset replaced by a rebuild that fails: neither its manifest nor a new one remain.
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "digits"}))
    render = digits.render_pair

    def failing_render(pair, images, seed):
        if pair.split == "test" and pair.index == 7:
            raise ValueError("injected render failure")
        return render(pair, images, seed)

    monkeypatch.setattr(digits, "render_pair", failing_render)
    with pytest.raises(ValueError, match="injected render failure"):
        build_digits(str(tmp_path), dm=1, overwrite=True, beam_args=IN_PROCESS)
    assert not os.path.exists(schema.manifest_path(str(tmp_path)))


def test_build_refuses_an_occupied_output_dir(built):
    directory = built.manifest.directory
    before = read_bytes(directory)
    for kwargs in ({"seed": 1}, {"seed": 0}):  # a different dataset, and the same one
        with pytest.raises(UserError, match=f"{directory}.*'digits'.*--overwrite"):
            build_digits(directory, dm=1, **kwargs)
    assert read_bytes(directory) == before


@pytest.mark.parametrize("kwargs, culprit", [
    ({"dm": 0}, "dm"), ({"dm": 1.5}, "dm"), ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"), ({"test_fraction": "0.2"}, "test_fraction"),
    ({"num_shards": 0}, "num_shards"), ({"seed": -1}, "seed"), ({"beam_args": [3]}, "Beam"),
    ({"test_fraction": 0.002}, "class .* test split"),
    ({"validation_fraction": 0.0}, "validation_fraction"), ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"validation_fraction": 0.005}, "class .* validation split"),
    ({"beam_args": ["--direct_num_workers=abc"]}, "direct_num_workers: invalid int value"),
    ({"beam_args": ["--runner=NoSuchRunner"]}, "NoSuchRunner"),
])
def test_build_rejects_bad_arguments_before_touching_the_output(built, kwargs, culprit):
    directory = built.manifest.directory
    before = read_bytes(directory)
    with pytest.raises(UserError, match=culprit):
        build_digits(directory, overwrite=True, **kwargs)
    assert read_bytes(directory) == before
