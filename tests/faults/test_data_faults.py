"""Hostile and broken data (issue 20): manifests, shards, `data build` inputs and serving inputs.

Each case asserts that the error names the culprit (the manifest key, the shard, the record,
the input) in one line; where a command runs, exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import arrays, beam_io, build_arrays
from bmvae_tf.trainers import cli, export, input_pipeline
from bmvae_tf.trainers import config as config_lib
from tests import synthetic

TRAIN_SHARDS = ("train-00000-of-00002.tfrecord.gz", "train-00001-of-00002.tfrecord.gz")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    """A small dataset: train 64 records in two shards of 32, test 32 in two of 16."""
    directory = str(tmp_path_factory.mktemp("clean"))
    synthetic.write_dataset(directory, num_train=64, num_test=32, shards=2)
    return directory


@pytest.fixture
def data(clean, tmp_path) -> str:
    """A copy of `clean` to damage."""
    return shutil.copytree(clean, str(tmp_path / "data"))


def edit_manifest(directory: str, edit) -> None:
    path = schema.manifest_path(directory)
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def read_all(manifest: schema.Manifest, split: str = "train",
             options: input_pipeline.ReadOptions = input_pipeline.ReadOptions(), take_batches: int = 0
             ) -> int:
    """Records read from `split` in batches of 8, inside `input_pipeline.reading`."""
    dataset = input_pipeline.make_dataset(manifest, split, 8, options)
    if take_batches:
        dataset = dataset.take(take_batches)
    with input_pipeline.reading(manifest, [split]):
        return sum(int(batch["label"].shape[0]) for batch in dataset)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ the manifest


def _set(path: str, value):
    def edit(obj):
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        obj[last] = value
    return edit


MANIFEST_CASES = {
    # shard entries that leave the dataset directory (item 1)
    "parent_escape": (_set("splits.train.files", ["../../../etc/passwd", TRAIN_SHARDS[1]]), "'../../../etc/passwd'"),
    "absolute": (_set("splits.train.files", ["/etc/passwd", TRAIN_SHARDS[1]]), "'/etc/passwd'"),
    "other_dataset": (_set("splits.train.files", [f"../other/{TRAIN_SHARDS[0]}", TRAIN_SHARDS[1]]),
                      f"'../other/{TRAIN_SHARDS[0]}'"),
    "url": (_set("splits.test.files", ["gs://bucket/x.tfrecord.gz"]), "'gs://bucket/x.tfrecord.gz'"),
    "subdirectory_up": (_set("splits.test.files", ["a/../../x"]), "'a/../../x'"),
    "dot_dot": (_set("splits.test.files", [".."]), "'..'"),
    "not_a_string": (_set("splits.test.files", [7]), "7"),
    # metadata of the wrong type (item 5)
    "metadata_keys_int": (_set("metadata_keys", 5), "'metadata_keys'"),
    "metadata_keys_of_ints": (_set("metadata_keys", [5]), "'metadata_keys'"),
    "metadata_shapes_strings": (_set("metadata_shapes", {"noise_seed": ["a", "b"]}), "metadata_shapes.noise_seed"),
    "metadata_shapes_string": (_set("metadata_shapes", {"noise_seed": "12"}), "metadata_shapes.noise_seed"),
    "metadata_shapes_not_object": (_set("metadata_shapes", "x"), "'metadata_shapes'"),
    "metadata_shapes_unknown_key": (_set("metadata_shapes", {"nope": [1]}), "metadata_shapes.nope"),
    # other fields of the wrong type
    "count_string": (_set("splits.train.count", "64"), "splits.train.count"),
    "shard_counts_length": (_set("splits.train.shard_counts", [64]), "splits.train: shard_counts"),
    "shard_counts_sum": (_set("splits.train.shard_counts", [32, 31]), "sum to 63"),
    "shape_string": (_set("modalities.0.shape", "881"), "modalities[0].shape"),
    "vocab_string": (_set("modalities.2.vocab", "abc"), "modalities[2].vocab"),
    "weight_string": (_set("modalities.0.likelihood_weight", "12"), "modalities[0].likelihood_weight"),
    "label_int": (_set("label", 5), "label"),
    "num_classes_string": (_set("label.num_classes", "10"), "label.num_classes"),
    "split_not_object": (_set("splits.test", [1, 2]), "splits.test"),
    "source_list": (_set("source", [1]), "'source'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_is_refused_naming_the_key(data, case):
    edit, culprit = MANIFEST_CASES[case]
    edit_manifest(data, edit)
    with pytest.raises(schema.SchemaError) as raised:
        schema.read_manifest(data)
    message = one_line(raised.value)
    assert schema.manifest_path(data) in message and culprit in message, message


def test_writer_refuses_shard_entries_outside_the_directory(clean, tmp_path):
    manifest = schema.read_manifest(clean)
    escaping = schema.SplitInfo(("../x.tfrecord.gz",), 1)
    with pytest.raises(schema.SchemaError, match=r"'\.\./x\.tfrecord\.gz'"):
        schema.write_manifest(str(tmp_path), schema.Manifest(
            name="t", modalities=manifest.modalities, splits={"train": escaping}))
    assert not os.path.exists(schema.manifest_path(str(tmp_path)))


def test_symlinked_shard_that_leaves_the_directory_is_refused(data, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / TRAIN_SHARDS[0]
    os.replace(os.path.join(data, TRAIN_SHARDS[0]), target)
    os.symlink(target, os.path.join(data, TRAIN_SHARDS[0]))
    manifest = schema.read_manifest(data)
    with pytest.raises(UserError) as raised:
        input_pipeline.make_dataset(manifest, "train", 8)
    message = one_line(raised.value)
    assert TRAIN_SHARDS[0] in message and "symlink" in message and "out of the dataset directory" in message


def test_symlink_inside_the_directory_and_a_symlinked_directory_are_read(data, tmp_path):
    os.replace(os.path.join(data, TRAIN_SHARDS[0]), os.path.join(data, "real.gz"))
    os.symlink("real.gz", os.path.join(data, TRAIN_SHARDS[0]))
    os.symlink(data, str(tmp_path / "link"))
    assert read_all(schema.read_manifest(str(tmp_path / "link"))) == 64


def test_remote_directory_checks_only_the_names(clean):
    with open(schema.manifest_path(clean)) as f:
        obj = json.load(f)
    manifest = schema.Manifest.from_json(obj, directory="gs://bucket/data")
    assert manifest.split_paths("train") == [f"gs://bucket/data/{f}" for f in TRAIN_SHARDS]
    obj["splits"]["train"]["files"][0] = "gs://other-bucket/x.tfrecord.gz"
    with pytest.raises(schema.SchemaError, match="gs://other-bucket"):
        schema.Manifest.from_json(obj, directory="gs://bucket/data")


# ------------------------------------------------------------------------------ counts


def test_clean_dataset_reads_and_old_manifests_without_shard_counts_still_load(data):
    assert read_all(schema.read_manifest(data)) == 64
    edit_manifest(data, lambda obj: [info.pop("shard_counts") for info in obj["splits"].values()])
    manifest = schema.read_manifest(data)
    assert manifest.split("train").shard_counts is None
    assert read_all(manifest) == 64


COUNT_CASES = {
    # the case: count 2560 over 64 records; the training order (shuffled, repeated, the
    # epoch's number of batches taken) must fail within its first epoch, not read the data 40 times
    "split_total_old_manifest": (
        lambda obj: (obj["splits"]["train"].pop("shard_counts"), obj["splits"]["train"].update(count=640)),
        ["split 'train'", "64 records", "says 640"]),
    "shard_fewer": (_set("splits.train.shard_counts", [42, 32]) , [TRAIN_SHARDS[0], "holds 32 records", "says 42"]),
    "shard_more": (_set("splits.train.shard_counts", [32, 20]), [TRAIN_SHARDS[1], "holds 32 records", "says 20"]),
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
@pytest.mark.parametrize("training_order", [False, True])
def test_record_count_mismatch_names_the_shard_and_both_counts(data, case, training_order):
    edit, culprits = COUNT_CASES[case]

    def with_total(obj):
        edit(obj)
        info = obj["splits"]["train"]
        if "shard_counts" in info:
            info["count"] = sum(info["shard_counts"])
    edit_manifest(data, with_total)
    manifest = schema.read_manifest(data)
    options = input_pipeline.ReadOptions()
    epoch = 0
    if training_order:
        options = input_pipeline.ReadOptions(shuffle=True, seed=1, repeat=True, drop_remainder=True)
        epoch = manifest.split("train").count // 8  # batches in one epoch, as the trainer counts them
    with pytest.raises(schema.DataError) as raised:
        read_all(manifest, options=options, take_batches=epoch)
    message = one_line(raised.value)
    assert all(c in message for c in culprits), message


# ------------------------------------------------------------------------------ corrupt shards


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _random_bytes(path):
    size = os.path.getsize(path)
    open(path, "wb").write(np.random.default_rng(0).bytes(size))


def _rewrite_record(index: int, damage):
    """Rewrites the shard with record `index` replaced by damage(serialized)."""
    def rewrite(path):
        records = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION)]
        records[index] = damage(records[index])
        with tf.io.TFRecordWriter(path, options=schema.COMPRESSION) as writer:
            for record in records:
                writer.write(record)
    return rewrite


def _short_image(serialized: bytes) -> bytes:
    example = tf.train.Example.FromString(serialized)
    del example.features.feature["digit"].float_list.value[-3:]
    return example.SerializeToString()


CORRUPT_CASES = {
    "truncated_shard": (_truncate, ["unreadable after record", "truncated"]),
    "random_bytes_shard": (_random_bytes, ["unreadable", "corrupt"]),
    "emptied_shard": (lambda path: open(path, "wb").close(), ["holds 0 records", "says 32"]),
    "record_of_the_wrong_shape": (_rewrite_record(5, _short_image), ["record 5 ", "Key: digit"]),
    "record_of_random_bytes": (_rewrite_record(9, lambda _: b"\x0a\xff\x13garbage" * 3), ["record 9 "]),
    "record_missing_a_feature": (_rewrite_record(3, lambda _: tf.train.Example().SerializeToString()),
                                 ["record 3 ", "digit"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_shard_names_the_file_and_record(data, case):
    damage, culprits = CORRUPT_CASES[case]
    damage(os.path.join(data, TRAIN_SHARDS[1]))
    with pytest.raises(schema.DataError) as raised:
        read_all(schema.read_manifest(data))
    message = one_line(raised.value)
    assert message.startswith(os.path.join(data, TRAIN_SHARDS[1]) + ":"), message
    assert all(c in message for c in culprits), message


def test_errors_the_shards_do_not_explain_are_raised_unchanged(clean):
    manifest = schema.read_manifest(clean)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not the data"):
        with input_pipeline.reading(manifest):
            raise tf.errors.InvalidArgumentError(None, None, "not the data")


# ------------------------------------------------------------------------------ the CLI


def _bmvae(args, tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment.pop("no_proxy", None)
    environment.pop("NO_PROXY", None)
    return subprocess.run([sys.executable, "-m", "bmvae_tf.trainers.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path), env=environment)


def test_train_on_a_manifest_with_an_escaping_shard_exits_2_naming_it(data, tmp_path, capsys):
    edit_manifest(data, _set("splits.train.files", ["../../../etc/passwd", TRAIN_SHARDS[1]]))
    code = cli.main(["train", "--data", data, "--workdir", str(tmp_path / "run")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and errors[-1].startswith("bmvae: error:") and "'../../../etc/passwd'" in errors[-1]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_train_on_metadata_keys_5_exits_2_naming_the_key(data, tmp_path, capsys):
    edit_manifest(data, _set("metadata_keys", 5))
    code = cli.main(["train", "--data", data, "--workdir", str(tmp_path / "run")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "'metadata_keys'" in errors[-1]


def _tokens_npz(path, stray: int) -> str:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 9, size=(40, 5))
    tokens[17, 2] = stray
    np.savez(path, feat=rng.normal(size=(40, 3)).astype(np.float32), tokens=tokens)
    return str(path)


def test_local_build_uses_the_python_direct_runner_and_no_network(tmp_path, monkeypatch, caplog):
    """No --runner, proxies pointing nowhere, every connection refused: the build runs on the
    Python direct runner and neither tries Prism nor opens a connection."""
    import socket

    from apache_beam.runners.portability import prism_runner

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("networking is blocked in this test")

    nowhere = "http://127.0.0.1:9"
    for name in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, nowhere)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    npz = _tokens_npz(tmp_path / "in.npz", 20)
    with caplog.at_level("INFO"):
        manifest = build_arrays.build_arrays(str(tmp_path / "out"), input_path=npz, sequences=("tokens",))
    assert attempts == []
    assert f"Beam runner: {beam_io.LOCAL_RUNNER}" in caplog.text and "Prism" not in caplog.text
    assert manifest.pipeline_options["runner"] == beam_io.LOCAL_RUNNER
    assert manifest.modality("tokens").vocab_size == 21


@pytest.mark.slow
def test_stray_token_id_needs_max_vocab(tmp_path):
    npz = _tokens_npz(tmp_path / "in.npz", 1_000_000)
    result = _bmvae(["data", "build", "arrays", "--input", npz, "--output", str(tmp_path / "out"),
                     "--sequence", "tokens"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bmvae: error:") and "'tokens'" in last and "1000000" in last
    assert "--max-vocab 65536" in last and "--max-vocab 1000001" in last
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_max_vocab_is_a_limit_that_can_be_raised(tmp_path):
    npz = _tokens_npz(tmp_path / "in.npz", 20)
    with pytest.raises(UserError, match="'tokens'.*token id 20.*--max-vocab 10"):
        arrays.plan_arrays(npz, sequences=("tokens",), max_vocab=10)
    assert arrays.plan_arrays(npz, sequences=("tokens",), max_vocab=21).modalities[1].vocab_size == 21
    with pytest.raises(UserError, match="max_vocab"):
        build_arrays.build_arrays(str(tmp_path / "out"), input_path=npz, max_vocab=0)


# ------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def served(clean, tmp_path_factory):
    """The dataset's model (untrained) exported and loaded back as a server would."""
    manifest = schema.read_manifest(clean)
    model = config_lib.build_model(
        config_lib.ModelConfig(latent_dim=2, hidden_units=[8], channels=[4, 4, 4], sequence_width=4),
        manifest.modalities)
    module = export.ServingModule(model, manifest)
    directory = str(tmp_path_factory.mktemp("served") / "model")
    tf.saved_model.save(module, directory, signatures=module.signatures())
    return manifest, tf.saved_model.load(directory)


def _feed(manifest, batch: int = 3, **changes):
    feed = {}
    for spec in manifest.modalities:
        dtype = np.int64 if spec.kind == "sequence" else np.float32
        feed[spec.name] = np.zeros((batch, *spec.shape), dtype)
    feed["present"] = np.ones(len(manifest.modalities), bool)
    feed.update(changes)
    return {k: tf.constant(v) for k, v in feed.items()}


def _tokens(value, batch: int = 3):
    tokens = np.zeros((batch, 8), np.int64)
    tokens[1, 4] = value
    return tokens


SERVING_CASES = {
    "token_too_large": (dict(text=_tokens(9999)), ["input `text`", "token ids must lie in [0,", "9999"]),
    "token_negative": (dict(text=_tokens(-1)), ["input `text`", "token ids must lie in [0,"]),
    "empty_batch": ("empty", ["input `digit`", "batch is empty"]),
    "batch_sizes_differ": (dict(street=np.zeros((2, 16, 16, 3), np.float32)), ["input `street`", "batch size"]),
}


@pytest.mark.parametrize("signature", ["encode", "cross_generate"])
@pytest.mark.parametrize("case", sorted(SERVING_CASES))
def test_serving_refuses_bad_inputs_naming_them(served, case, signature):
    manifest, loaded = served
    changes, culprits = SERVING_CASES[case]
    feed = _feed(manifest, batch=0) if changes == "empty" else _feed(manifest, **changes)
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        loaded.signatures[signature](**feed)
    assert all(c in raised.value.message for c in culprits), raised.value.message


def test_serving_accepts_good_inputs_and_ignores_absent_out_of_vocabulary_tokens(served):
    manifest, loaded = served
    good = loaded.signatures["encode"](**_feed(manifest))
    absent = loaded.signatures["encode"](**_feed(manifest, text=_tokens(9999),
                                                 present=np.array([True, True, False])))
    assert good["z_mean"].shape == (3, 2) and np.isfinite(absent["z_mean"].numpy()).all()


def test_sample_refuses_num_below_one(served):
    _, loaded = served
    with pytest.raises(tf.errors.InvalidArgumentError, match="input `num`"):
        loaded.signatures["sample"](num=tf.constant(0), seed=tf.constant(1))


# ------------------------------------------------------------------------------ end to end

TRAIN_CASES = {
    "truncated_shard": (lambda data: _truncate(os.path.join(data, TRAIN_SHARDS[1])), TRAIN_SHARDS[1]),
    "count_mismatch": (lambda data: edit_manifest(data, _set("splits.train.shard_counts", [32, 40])),
                       TRAIN_SHARDS[1]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_on_a_damaged_shard_exits_2_naming_it(data, tmp_path, capsys, case):
    damage, culprit = TRAIN_CASES[case]
    damage(data)
    if case == "count_mismatch":
        edit_manifest(data, lambda obj: obj["splits"]["train"].update(count=72))
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  latent_dim: 2\n  hidden_units: [8]\n  channels: [4, 4, 4]\n"
                      "  sequence_width: 4\ntrain:\n  epochs: 1\n  batch_size: 8\n")
    code = cli.main(["train", "--data", data, "--workdir", str(tmp_path / "run"), "--config", str(config)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and errors[-1].startswith("bmvae: error:") and culprit in errors[-1], errors[-3:]
