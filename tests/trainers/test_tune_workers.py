"""`bmvae tune` processes sharing a study: a worker killed with SIGKILL mid-trial, and two
processes (as on two hosts) sharing one study on a real PostgreSQL server.

The PostgreSQL server is Debian's `postgresql` package (.ci/run installs it where it can),
started here in a temporary directory on a loopback port (initdb, pg_ctl) as the unprivileged
`postgres` user when the tests run as root. Where it is not installed the test skips and says so.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest

from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.tuning import study as study_lib
from tests import synthetic

TINY = ["--set=model.latent_dim=4", "--set=model.hidden_units=[16]", "--set=model.channels=[8,8,8]",
        "--set=model.sequence_width=8", "--set=train.batch_size=32", "--set=train.log_every_steps=1000",
        "--set=train.validation_fraction=0.25", "--epochs=1"]
SPACE = "model.bmvae_m.lambda_c: {low: 0.01h, high: 0.5h, log: true}\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.write_dataset(directory, num_train=128, num_test=32)
    return directory


def _command(dataset, tune_dir, space, *extra):
    return [sys.executable, "-m", "bmvae_tf.trainers.cli", "tune", "--data", dataset, "--workdir",
            str(tune_dir), "--space", space, *TINY, *extra]


def _env():
    # Heartbeats every second: a killed worker's trial is stale (and failed) after 3 s.
    return {**os.environ, "BMVAE_TUNE_HEARTBEAT_S": "1"}


def _space(tmp_path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return str(path)


def _load(storage: str, name: str = "bmvae-tune") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_lib.driver_url(storage))


@pytest.mark.slow
def test_a_worker_killed_mid_trial_loses_only_that_trial(dataset, tmp_path):
    tune_dir = tmp_path / "tune"
    command = _command(dataset, tune_dir, _space(tmp_path), "--trials", "2")
    with open(tmp_path / "first.log", "w") as log:
        worker = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    # Trial 1 has made its run directory: it is running (tracing its first step) when killed.
    while not (tune_dir / "trials" / "0001" / "config.yaml").exists():
        assert worker.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() - started < 900
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    storage = f"sqlite:///{tune_dir}/study.db"
    before = _load(storage).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    kept = (before[0].value, before[0].params, before[0].datetime_complete)
    history = (tune_dir / "trials" / "0000" / "history.jsonl").read_text()

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _load(storage).trials
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert (after[0].value, after[0].params, after[0].datetime_complete) == kept  # not repeated
    assert (tune_dir / "trials" / "0000" / "history.jsonl").read_text() == history
    # The killed trial is retried once with its parameters, in its own run directory.
    assert after[2].system_attrs["failed_trial"] == 1 and after[2].params == after[1].params
    assert after[2].user_attrs["run_dir"] == os.path.join("trials", "0001")
    assert not (tune_dir / "trials" / "0002").exists()
    assert [h["epoch"] for h in run_dir.read_history(run_dir.RunPaths(str(tune_dir / "trials" / "0001")))] == [1]
    assert "retry of 1" in rerun.stdout and (tune_dir / "best.yaml").exists()


# ------------------------------------------------------------------------------------ PostgreSQL


def _postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary directory on a loopback port; yields its URL."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed here (Debian's postgresql package; .ci/run installs "
                    "it where it can): the shared-study test needs a real server")
    run_as = []
    root = tempfile.mkdtemp(prefix="bmvae-pg-")
    if os.geteuid() == 0:  # initdb refuses root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    subprocess.run([*run_as, f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True, timeout=300)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "120",
                    "-o", options, "start"], check=True, capture_output=True, timeout=300)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_one_study_on_postgresql(dataset, tmp_path, postgres):
    space = _space(tmp_path)
    logs = [open(tmp_path / f"host{i}.log", "w") for i in range(2)]
    # Two TUNE_DIRs, as on two hosts: only the storage and the study name are shared.
    processes = [subprocess.Popen(_command(dataset, tmp_path / f"host{i}", space, "--trials", "3",
                                           "--storage", postgres, "--study", "shared"),
                                  env=_env(), stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    codes = [p.wait(timeout=1200) for p in processes]
    for f in logs:
        f.close()
    assert codes == [0, 0], [(tmp_path / f"host{i}.log").read_text()[-3000:] for i in range(2)]

    trials = [t for t in _load(postgres, "shared").trials if not t.user_attrs.get("surplus")]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3 and len(trials) == 3
    values = [t.params["model.bmvae_m.lambda_c"] for t in finished]
    assert len(set(values)) == 3
    hosts = {t.number: i for t in finished for i in range(2)
             if (tmp_path / f"host{i}" / t.user_attrs["run_dir"] / "history.jsonl").exists()}
    assert sorted(hosts) == [t.number for t in finished]
    best = [(tmp_path / f"host{i}" / "best.yaml").read_text().splitlines()[0] for i in range(2)]
    assert best[0] == best[1] and "study 'shared' (postgresql://postgres@127.0.0.1" in best[0]


@pytest.mark.slow
def test_workers_share_the_sqlite_study_of_one_command(dataset, tmp_path):
    tune_dir = tmp_path / "tune"
    result = subprocess.run(_command(dataset, tune_dir, _space(tmp_path), "--trials", "3", "--workers", "2"),
                            env=_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [t for t in _load(f"sqlite:///{tune_dir}/study.db").trials if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({t.params["model.bmvae_m.lambda_c"] for t in trials}) == 3
    assert len({t.user_attrs["run_dir"] for t in trials}) == 3
    assert (tune_dir / "best.yaml").exists() and result.stdout.count("complete (best)") == 1
