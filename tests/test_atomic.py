"""bmvae_tf.atomic: every published file appears whole or not at all."""

import os

import pytest

from bmvae_tf import atomic


def _entries(directory):
    return sorted(os.listdir(directory))


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "metrics.json")
    atomic.write_text(path, "old")
    atomic.write_text(path, "new ü")
    assert open(path, encoding="utf-8").read() == "new ü"
    assert _entries(tmp_path) == ["metrics.json"]


def test_a_failed_writer_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = str(tmp_path / "history.jsonl")
    atomic.write_text(path, "complete\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.publishing(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half a fi")
            raise RuntimeError("disk on fire")
    assert open(path).read() == "complete\n"
    assert _entries(tmp_path) == ["history.jsonl"]


def test_keep_suffix_keeps_the_extension_last(tmp_path):
    path = str(tmp_path / "digit.keras")
    name = os.path.basename(atomic.temporary_sibling(path, keep_suffix=".keras"))
    assert name.startswith("digit" + atomic.TEMP_MARKER) and name.endswith(".keras")
    with atomic.publishing(path, keep_suffix=".keras") as tmp:
        assert tmp.endswith(".keras")
        open(tmp, "wb").write(b"x")
    assert _entries(tmp_path) == ["digit.keras"]


def test_a_directory_replaces_only_an_empty_one(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    with atomic.publishing(str(target), directory=True) as tmp:
        os.makedirs(tmp)
        open(os.path.join(tmp, "saved_model.pb"), "wb").write(b"pb")
    assert _entries(target) == ["saved_model.pb"]
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic.publishing(str(target), directory=True) as tmp:
            os.makedirs(tmp)
    assert _entries(tmp_path) == ["export"] and _entries(target) == ["saved_model.pb"]
