"""`bmvae` on bad input: a one-line error naming the culprit, exit code 2, no traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from tests import synthetic
from bmvae_tf.trainers import cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("data"))
    synthetic.write_dataset(directory, num_train=64, num_test=32)
    return directory


def _run(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("bmvae: error:")]
    return code, errors, err


def test_missing_manifest(tmp_path, capsys):
    code, errors, _ = _run(["train", "--data", str(tmp_path), "--workdir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert len(errors) == 1 and "manifest.json" in errors[0] and "no manifest" in errors[0]


def test_corrupt_manifest(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "manifest.json").write_text('{"name": "x", "format_version": 1, "modalities": [')
    code, errors, _ = _run(["train", "--data", str(data), "--workdir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert len(errors) == 1 and "corrupt manifest" in errors[0]


def test_manifest_with_a_bad_modality(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    text = (data / "manifest.json").read_text().replace('"kind": "vector"', '"kind": "vectr"', 1)
    text = text.replace('"kind": "image"', '"kind": "picture"', 1)
    (data / "manifest.json").write_text(text)
    code, errors, _ = _run(["train", "--data", str(data), "--workdir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert len(errors) == 1 and "manifest.json" in errors[0]
    assert "'digit'" in errors[0] and "picture" in errors[0]


def test_missing_shard(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    os.remove(data / "train-00001-of-00002.tfrecord.gz")
    code, errors, _ = _run(["train", "--data", str(data), "--workdir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert len(errors) == 1 and "train-00001-of-00002.tfrecord.gz" in errors[0] and "missing" in errors[0]


def test_unknown_model(dataset, tmp_path, capsys):
    code, errors, _ = _run(["train", "--data", dataset, "--workdir", str(tmp_path / "run"),
                            "--model", "nope"], capsys)
    assert code == 2
    assert len(errors) == 1 and "'nope'" in errors[0] and "bmvae_m" in errors[0]


def test_unknown_config_key_in_set_and_in_file(dataset, tmp_path, capsys):
    code, errors, _ = _run(["train", "--data", dataset, "--workdir", str(tmp_path / "run"),
                            "--set", "model.latnet_dim=3"], capsys)
    assert code == 2 and len(errors) == 1 and "model.latnet_dim" in errors[0]
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 1\n  bacth_size: 8\n")
    code, errors, _ = _run(["train", "--data", dataset, "--workdir", str(tmp_path / "run2"),
                            "--config", str(config)], capsys)
    assert code == 2 and len(errors) == 1
    assert "train.bacth_size" in errors[0] and str(config) in errors[0]


def test_evaluate_of_a_missing_run(tmp_path, capsys):
    code, errors, _ = _run(["evaluate", "--workdir", str(tmp_path / "nothing")], capsys)
    assert code == 2 and len(errors) == 1 and "config.yaml" in errors[0]


def test_analyze_of_a_missing_run(tmp_path, capsys):
    code, errors, _ = _run(["analyze", "--workdir", str(tmp_path / "nothing")], capsys)
    assert code == 2 and len(errors) == 1 and "config.yaml" in errors[0]


def test_console_script_prints_no_traceback(tmp_path):
    bmvae = os.path.join(os.path.dirname(sys.executable), "bmvae")
    result = subprocess.run([bmvae, "train", "--data", str(tmp_path), "--workdir", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bmvae: error:")
