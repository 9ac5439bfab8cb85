"""Faults on the run side (issue 20): one writer per run directory, stale temporaries, a full or
read-only disk, bad config values, incompatible or damaged run files, missing peers, and the one
top-level handler of `bmvae` that maps them to one line and exit 2 (exit 1: divergence; a
traceback only for bugs). Each case checks the exit code, that the message names the culprit,
that no traceback is printed, and what is left on disk.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf
import yaml

from bmvae_tf import atomic
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cli, run_dir
from bmvae_tf.trainers.evaluation.metrics import Metrics
from tests import synthetic

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
TINY = [*synthetic.TINY_CLI, "--set", "train.batch_size=16", "--set", "train.log_every_steps=1000"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("data"))
    synthetic.write_dataset(directory, num_train=64, num_test=32)
    return directory


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Two modalities instead of three: a run of `dataset` does not fit it."""
    directory = str(tmp_path_factory.mktemp("other"))
    synthetic.write_dataset(directory, num_train=64, num_test=32, num_modalities=2)
    return directory


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One tiny run trained for one epoch (4 steps); cases copy it before changing it."""
    workdir = str(tmp_path_factory.mktemp("runs") / "run")
    assert cli.main(["train", "--data", dataset, "--workdir", workdir, "--epochs", "1", *TINY]) == 0
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _bmvae(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _one_line_error(err: str, *names: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("bmvae: error:")]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def _leftovers(directory) -> list[str]:
    """Temporary entries anywhere under `directory`: checkpoint *_temp dirs, publish temps."""
    return [str(p) for p in Path(directory).rglob("*")
            if p.name.endswith("_temp") or atomic.TEMP_MARKER in p.name]


def _history_epochs(workdir) -> list[int]:
    return [json.loads(line)["epoch"] for line in Path(workdir, "history.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------- bad config values


@pytest.mark.parametrize("args, culprit", [
    (["--set", "train.shuffle_buffer=0"], "train.shuffle_buffer"),
    (["--set", "eval.batch_size=0"], "eval.batch_size"),
    (["--set", "train.learning_rate=.inf"], "train.learning_rate"),
    (["--set", "train.learning_rate=.nan"], "train.learning_rate"),
    (["--set", "train.cluster_timeout_s=0"], "train.cluster_timeout_s"),
    (["--set", "model.likelihood_scale=-.inf"], "model.likelihood_scale"),
    (["--simulate-devices", "0"], "--simulate-devices"),
])
def test_bad_config_value_exits_2_naming_it_before_any_run_file_is_written(
        capsys, dataset, tmp_path, args, culprit):
    workdir = tmp_path / "run"
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", workdir, *TINY, *args)
    assert code == 2
    _one_line_error(err, culprit)
    assert not workdir.exists()


# ----------------------------------------------------------------------- the run directory lock


def test_second_training_on_a_held_run_exits_2_naming_the_holder(capsys, dataset, run_copy):
    before = (run_copy / "history.jsonl").read_text()
    fd = os.open(run_copy / "train.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running training holds it
        os.write(fd, json.dumps({"host": "trainer-host", "pid": 4242, "since": "today"}).encode())
        code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", run_copy, "--epochs", "2", *TINY)
    finally:
        os.close(fd)
    assert code == 2
    _one_line_error(err, str(run_copy), "host trainer-host, pid 4242")
    assert (run_copy / "history.jsonl").read_text() == before  # nothing written


def test_lock_left_by_a_dead_process_is_taken_over_and_logged(capsys, dataset, run_copy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_copy / "train.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "since": "yesterday"}))
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", run_copy, "--epochs", "1", *TINY)
    assert code == 0, err
    assert f"took over the lock {run_copy / 'train.lock'} left by host {socket.gethostname()}, " \
           f"pid {dead.pid}" in err
    assert not (run_copy / "train.lock").exists()  # released cleanly
    assert _history_epochs(run_copy) == [1]


def test_remote_run_directory_marker_names_a_live_holder(tmp_path):
    from bmvae_tf.errors import RunInUse
    from bmvae_tf.trainers.training import lock

    # The marker story of gs:// run directories, tried on the local file system through a
    # file:// URL (tf.io.gfile reads it as a remote path would be read).
    workdir = f"file://{tmp_path}/run"
    with lock.run_lock(workdir):
        marker = json.loads((tmp_path / "run" / "train.lock").read_text())
        assert marker["pid"] == os.getpid()
        with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
            with lock.run_lock(workdir):
                pass
    assert not (tmp_path / "run" / "train.lock").exists()


# ----------------------------------------------------------------------- stale temporaries


def test_stale_checkpoint_and_publish_temporaries_are_removed_at_start(capsys, dataset, run_copy):
    (run_copy / "checkpoints" / "ckpt-99_temp").mkdir()
    (run_copy / "checkpoints" / "ckpt-99_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (run_copy / f"history.jsonl{atomic.TEMP_MARKER}0123abcd").write_text('{"epoch": 9')
    old = run_copy / f"metrics.json{atomic.TEMP_MARKER}feed"
    old.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", run_copy, "--epochs", "1", *TINY)
    assert code == 0, err
    assert _leftovers(run_copy) == []


# ----------------------------------------------------------------------- files that are not what they should be


def test_workdir_that_is_a_file_exits_2(capsys, dataset, tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", path, *TINY)
    assert code == 2
    _one_line_error(err, str(path), "is a file")
    assert path.read_text() == "mine"


def test_compare_output_that_is_a_file_exits_2(capsys, trained, tmp_path):
    path = tmp_path / "report"
    path.write_text("mine")
    code, err = _bmvae(capsys, "compare", trained, "--output", path)
    assert code == 2
    _one_line_error(err, str(path), "is a file")
    assert path.read_text() == "mine"


def test_truncated_metrics_json_given_to_compare_exits_2_naming_it(capsys, run_copy, tmp_path):
    (run_copy / "metrics.json").write_text('{"model": "bmvae_m", "data')
    code, err = _bmvae(capsys, "compare", run_copy, "--output", tmp_path / "out")
    assert code == 2
    _one_line_error(err, str(run_copy / "metrics.json"))
    assert not (tmp_path / "out").exists()


def test_torn_last_line_of_history_is_dropped_and_the_run_resumes(capsys, dataset, run_copy):
    history = run_copy / "history.jsonl"
    history.write_text(history.read_text() + '{"epoch": 2, "st')
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", run_copy, "--epochs", "2", *TINY)
    assert code == 0, err
    assert _history_epochs(run_copy) == [1, 2]


def test_corrupt_middle_line_of_history_exits_2_naming_file_and_line(capsys, dataset, run_copy):
    history = run_copy / "history.jsonl"
    history.write_text("{not json\n" + history.read_text())
    before = history.read_text()
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", run_copy, "--epochs", "2", *TINY)
    assert code == 2
    _one_line_error(err, str(history), "line 1")
    assert history.read_text() == before


@pytest.mark.parametrize("command", ["train", "export"])
def test_run_of_another_dataset_does_not_fit_and_exits_2(capsys, other_dataset, run_copy, tmp_path, command):
    checkpoint = tf.train.latest_checkpoint(str(run_copy / "checkpoints"))
    if command == "train":
        args = ["train", "--data", other_dataset, "--workdir", run_copy, "--epochs", "2", *TINY]
    else:  # export reads the run's dataset from config.yaml: point it at the other one
        config = yaml.safe_load((run_copy / "config.yaml").read_text())
        config["data"]["dir"] = other_dataset
        (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
        args = ["export", "--workdir", run_copy, "--output", tmp_path / "saved"]
    code, err = _bmvae(capsys, *args)
    assert code == 2
    _one_line_error(err, checkpoint, "does not fit", other_dataset)
    assert tf.train.latest_checkpoint(str(run_copy / "checkpoints")) == checkpoint
    assert not (tmp_path / "saved").exists()


def test_half_written_checkpoint_data_file_at_export_exits_2_naming_it(capsys, run_copy, tmp_path):
    checkpoint = tf.train.latest_checkpoint(str(run_copy / "checkpoints"))
    data = Path(f"{checkpoint}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, err = _bmvae(capsys, "export", "--workdir", run_copy, "--output", tmp_path / "saved")
    assert code == 2
    _one_line_error(err, checkpoint)
    assert not (tmp_path / "saved").exists() and _leftovers(tmp_path) == []


def test_classifier_file_with_a_lambda_layer_is_refused_naming_it(dataset, tmp_path):
    import keras

    from bmvae_tf import schema
    from bmvae_tf.trainers.evaluation import classifiers

    manifest = schema.read_manifest(dataset)
    spec = manifest.modalities[0]
    inputs = keras.Input(spec.shape)
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / f"{spec.name}.keras")
    fingerprint = classifiers.fingerprint(manifest, spec, train_examples=8, epochs=1, seed=0)
    (tmp_path / f"{spec.name}.json").write_text(json.dumps(fingerprint))
    with pytest.raises(UserError, match=rf"{spec.name}\.keras: it holds a Lambda layer"):
        classifiers.load_or_train(str(tmp_path), manifest, lambda: None, train_examples=8,
                                  batch_size=8, epochs=1, seed=0)


# ----------------------------------------------------------------------- the handler itself


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/mnt/full/x"), "no space left on /mnt/full/x"),
    (OSError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: read-only file system"),
    (OSError(errno.EISDIR, "Is a directory", "/d"), "/d: is a directory, not a file"),
    (OSError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: a path component is a file, not a directory"),
    (tf.errors.ResourceExhaustedError(None, None, "/mnt/full/ckpt_temp/part; No space left on device"),
     "no space left on /mnt/full/ckpt_temp/part"),
    (tf.errors.DataLossError(None, None, "truncated record at 12\nmore"), "corrupt data (truncated record at 12)"),
    (tf.errors.FailedPreconditionError(None, None, "/tmp/afile is not a directory"), "/tmp/afile is not a directory"),
    (tf.errors.PermissionDeniedError(None, None, "/ro/x; Read-only file system"), "/ro/x; Read-only file system"),
])
def test_expected_errors_become_one_line_and_exit_2(capsys, monkeypatch, error, line):
    def fail(args, beam_args):
        raise error
    monkeypatch.setattr(cli, "_cmd_compare", fail)
    code, err = _bmvae(capsys, "compare", "run", "--output", "out")
    assert code == 2
    assert err.strip() == f"bmvae: error: {line}"


def test_a_bug_prints_its_traceback_and_asks_to_be_reported(capsys, monkeypatch):
    def fail(args, beam_args):
        raise KeyError("oops")
    monkeypatch.setattr(cli, "_cmd_compare", fail)
    code, err = _bmvae(capsys, "compare", "run", "--output", "out")
    assert code == 3
    assert "Traceback" in err and "KeyError: 'oops'" in err and "please report it" in err


# ----------------------------------------------------------------------- full and read-only disks


def _mount(*args) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs or a read-only bind mount")
    result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"mount failed: {result.stderr.strip()}")


@pytest.fixture
def mounts():
    made = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _tmpfs(path: Path, size: str, mounts) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    mounts.append(path)
    return path


def _fill(directory: Path, leave: int = 0) -> None:
    """Fills the file system of `directory` to the last byte, then frees `leave` bytes."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass
        if leave:
            f.truncate(f.tell() - leave)


def test_disk_full_at_a_training_checkpoint_keeps_the_last_good_one(capsys, dataset, trained, tmp_path, mounts):
    disk = _tmpfs(tmp_path / "disk", "8m", mounts)
    workdir = disk / "run"
    shutil.copytree(trained, workdir)
    last_good = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    history = (workdir / "history.jsonl").read_text()
    # Room for the lock, config and records, not for a checkpoint (~120 KB).
    _fill(disk, leave=64 * 1024)
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", workdir, "--epochs", "2", *TINY)
    assert code == 2
    _one_line_error(err, f"no space left on {workdir / 'checkpoints'}")
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")) == last_good
    assert (workdir / "history.jsonl").read_text() == history
    assert _leftovers(workdir) == []
    # With space again, the run resumes from the last good checkpoint.
    (disk / "filler").unlink()
    code, err = _bmvae(capsys, "train", "--data", dataset, "--workdir", workdir, "--epochs", "2", *TINY)
    assert code == 0, err
    assert _history_epochs(workdir) == [1, 2]


def test_disk_full_during_export_leaves_nothing_half_written(capsys, trained, tmp_path, mounts):
    disk = _tmpfs(tmp_path / "disk", "1m", mounts)
    _fill(disk)
    code, err = _bmvae(capsys, "export", "--workdir", trained, "--output", disk / "saved")
    assert code == 2
    _one_line_error(err, f"no space left on {disk / 'saved'}")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("command", ["train", "export", "compare"])
def test_read_only_output_exits_2_naming_it(capsys, dataset, trained, tmp_path, mounts, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copytree(trained, ro / "run")
    Metrics("bmvae_m", "synthetic", ["digit", "street", "text"], 1, None).write(str(ro / "run" / "metrics.json"))
    _mount("--bind", ro, ro)
    mounts.append(ro)
    _mount("-o", "remount,bind,ro", ro)
    listing = sorted(str(p) for p in ro.rglob("*"))
    args = {"train": ["train", "--data", dataset, "--workdir", ro / "run", "--epochs", "2", *TINY],
            "export": ["export", "--workdir", trained, "--output", ro / "saved"],
            "compare": ["compare", trained, "--output", ro / "report"]}[command]
    if command == "compare":
        shutil.copy(ro / "run" / "metrics.json", Path(trained) / "metrics.json")
    try:
        code, err = _bmvae(capsys, *args)
    finally:
        Path(trained, "metrics.json").unlink(missing_ok=True)
    assert code == 2
    _one_line_error(err, str(ro))
    assert sorted(str(p) for p in ro.rglob("*")) == listing


# ----------------------------------------------------------------------- concurrency, kill -9, peers


def _train_process(dataset, workdir, *args):
    return subprocess.Popen([sys.executable, "-m", "bmvae_tf.trainers.cli", "train", "--data", dataset,
                             "--workdir", str(workdir), *TINY, *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_trainings_on_one_workdir_exactly_one_runs(dataset, tmp_path):
    workdir = tmp_path / "run"
    first = _train_process(dataset, workdir, "--epochs", "6")
    while not (workdir / "train.lock").exists() or not (workdir / "train.lock").read_text():
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.1)
    second = _train_process(dataset, workdir, "--epochs", "6")
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2, err2[-2000:]
    _one_line_error(err2, str(workdir), f"pid {first.pid}")
    assert _history_epochs(workdir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_repeated_kill_9_during_checkpoint_writes_resumes_and_leaves_no_temporaries(dataset, tmp_path):
    workdir = tmp_path / "run"
    args = ["--epochs", "3", "--set", "train.checkpoint_every_steps=1", "--set", "train.log_every_steps=1"]
    killed = 0
    for delay in (0.0, 0.05, 0.15):
        process = _train_process(dataset, workdir, *args)
        # Kill as soon as a checkpoint is being written (its temporary directory exists).
        while process.poll() is None and not list((workdir / "checkpoints").glob("*_temp")):
            time.sleep(0.002)
        time.sleep(delay)
        killed += process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert killed >= 2, "the trainings ended before they could be killed"
    rerun = _train_process(dataset, workdir, *args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert _history_epochs(workdir) == [1, 2, 3]
    assert _leftovers(workdir) == []
    assert int(tf.train.latest_checkpoint(str(workdir / "checkpoints")).rsplit("-", 1)[1]) == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_run_whose_peer_never_starts_exits_2_naming_it(dataset, tmp_path):
    ports = [_free_port(), _free_port()]
    tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                 "task": {"type": "worker", "index": 0}}
    result = subprocess.run(
        [sys.executable, "-m", "bmvae_tf.trainers.cli", "train", "--data", dataset, "--workdir",
         str(tmp_path / "run"), *TINY, "--strategy", "multi_worker", "--set", "train.cluster_timeout_s=4"],
        env={**ENV, "TF_CONFIG": json.dumps(tf_config)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    _one_line_error(result.stderr, "train.cluster_timeout_s=4", f"worker 1 (localhost:{ports[1]})")
    assert f"waiting for worker 1 (localhost:{ports[1]})" in result.stderr


@pytest.mark.slow
def test_readers_get_a_whole_checkpoint_while_training_replaces_them(dataset, trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    # A checkpoint every step, only the last one kept: each save deletes the one before it.
    process = _train_process(dataset, workdir, "--epochs", "8", "--set", "train.checkpoint_every_steps=1",
                             "--set", "train.checkpoints_to_keep=1")
    try:
        loads = 0
        while process.poll() is None and loads < 30:
            _, _, model = run_dir.load_trained_model(str(workdir))
            assert all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in model.weights)
            loads += 1
    finally:
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert loads >= 3
