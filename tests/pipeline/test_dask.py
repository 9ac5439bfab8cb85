"""The dataset jobs on a real dask.distributed cluster (Beam's DaskRunner, issue 17).

A module fixture starts `dask scheduler` and two `dask worker` processes (one thread each) on
loopback, from this Python, so the workers import this package as the tests do; they are stopped
afterwards, also when a test fails. Each build is compared byte for byte with the in-process
build of the same seed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import apache_beam as beam
import numpy as np
import pytest

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import beam_io, build_arrays, build_digits, build_mnist_svhn
from bmvae_tf.trainers import cli
from tests import source_fixtures as fixtures
from tests.pipeline import killed_build
from tests.source_fixtures import read_bytes

IN_PROCESS = ["--runner=FnApiRunner"]
START_TIMEOUT_S = 240  # the workers import Beam; on 2 busy cores that can take a while


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """The address of a scheduler with two single-threaded worker processes, all on loopback."""
    from distributed import Client

    root = tmp_path_factory.mktemp("dask")
    scheduler_file = str(root / "scheduler.json")
    processes = []

    def start(name: str, *args: str) -> None:
        log = open(root / f"{name}.log", "wb")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
            cwd=str(root), start_new_session=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}))
        log.close()

    try:
        # --idle-timeout and --death-timeout: nothing outlives a test run killed mid-way for long.
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", scheduler_file, "--idle-timeout", "900")
        for i in range(2):
            start(f"worker{i}", "worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
                  "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                  "--local-directory", str(root / f"w{i}"), "--death-timeout", "60")
        address = _scheduler_address(scheduler_file, processes[0], root)
        with Client(address, timeout=START_TIMEOUT_S) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
        yield address
    finally:
        for process in processes:
            _stop(process)


def _scheduler_address(scheduler_file: str, scheduler: subprocess.Popen, root) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            raise RuntimeError(f"dask scheduler exited: {(root / 'scheduler.log').read_text()[-2000:]}")
        try:
            with open(scheduler_file) as f:
                return json.load(f)["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"dask scheduler did not start within {START_TIMEOUT_S} s")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's own session, SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


def on_dask(address: str) -> list[str]:
    return [f"--runner={beam_io.DASK_RUNNER}", f"--dask_client_address={address}"]


def assert_same_dataset(written_dir: str, expected_dir: str) -> None:
    """The same files; shards byte for byte; manifests equal but for the Beam options."""
    written, expected = read_bytes(written_dir), read_bytes(expected_dir)
    assert written.keys() == expected.keys()
    for name in expected:
        if name != schema.MANIFEST_FILENAME:
            assert written[name] == expected[name], name
    manifests = [json.loads(files[schema.MANIFEST_FILENAME]) for files in (written, expected)]
    for manifest in manifests:
        manifest.pop("pipeline_options")
    assert manifests[0] == manifests[1]


def tasks_run_per_worker(address: str) -> dict[str, int]:
    from distributed import Client

    with Client(address, timeout=60) as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


def wait_until_idle(address: str) -> None:
    """Until the scheduler holds no task and no other client: a killed driver's work is gone."""
    from distributed import Client

    def busy(dask_scheduler, me):
        return len(dask_scheduler.tasks), sorted(set(dask_scheduler.clients) - {me, "fire-and-forget"})

    with Client(address, timeout=60) as client:
        deadline = time.monotonic() + 120
        while (state := client.run_on_scheduler(busy, me=client.id)) != (0, []):
            assert time.monotonic() < deadline, f"the cluster did not go idle: (tasks, clients) {state}"
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# The three jobs, byte for byte


@pytest.mark.slow  # a cluster start and a build: 20-60 s on 2 busy cores
def test_digits_from_the_cli_on_dask_is_byte_identical(dask_cluster, built, tmp_path, capsys):
    out = str(tmp_path / "digits")
    before = tasks_run_per_worker(dask_cluster)
    # The README's invocation, with the short runner name the CLI accepts too.
    code = cli.main(["data", "build", "digits", "--output", out, "--dm", "1", "--",
                     "--runner=DaskRunner", f"--dask_client_address={dask_cluster}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert_same_dataset(out, built.manifest.directory)
    manifest = schema.read_manifest(out)
    assert manifest.pipeline_options["runner"] == beam_io.DASK_RUNNER
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 1293, "validation": 144, "test": 360}
    # The DaskRunner reports no metrics: said in a log line, not dropped silently.
    assert re.search(r"WARNING .*reports no Beam metrics.*counts "
                     r"\{'train': 1293, 'validation': 144, 'test': 360\}", err), err
    assert "partition size" not in err  # Beam's DaskRunner notice, hidden without --verbose
    after = tasks_run_per_worker(dask_cluster)
    assert len(after) == 2 and all(after[w] > before[w] for w in after), (before, after)  # both worked


@pytest.mark.slow
def test_arrays_on_dask_are_byte_identical(dask_cluster, tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    path = str(tmp_path / "mine.npz")
    np.savez(path, feat=rng.normal(5.0, 2.0, size=(n, 6)).astype(np.float32),
             photo=rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8),
             tokens=rng.integers(0, 7, size=(n, 5)), label=rng.integers(0, 3, n))
    kwargs = dict(input_path=path, sequences=("tokens",), seed=3, num_shards=3)
    local = build_arrays.run_arrays_job(str(tmp_path / "local"), beam_args=IN_PROCESS, **kwargs)
    remote = build_arrays.run_arrays_job(str(tmp_path / "dask"), beam_args=on_dask(dask_cluster), **kwargs)
    assert remote.counters is None and local.counters["examples_encoded"] == n
    assert_same_dataset(remote.manifest.directory, local.manifest.directory)
    assert sum(info.count for info in remote.manifest.splits.values()) == n


@pytest.mark.slow
def test_mnist_svhn_text_on_dask_is_byte_identical(dask_cluster, tmp_path):
    raw = str(tmp_path / "raw")
    fixtures.write_raw_source(raw)
    kwargs = dict(with_text=True, source_dir=raw, dm=3, seed=0, num_shards=2)
    local = build_mnist_svhn.run_mnist_svhn_job(str(tmp_path / "local"), beam_args=IN_PROCESS, **kwargs)
    remote = build_mnist_svhn.run_mnist_svhn_job(str(tmp_path / "dask"), beam_args=on_dask(dask_cluster),
                                                 **kwargs)
    assert_same_dataset(remote.manifest.directory, local.manifest.directory)
    assert {k: v.count for k, v in remote.manifest.splits.items()} == {
        split: local.counters[f"{split}_records"] for split in local.manifest.splits}


# --------------------------------------------------------------------------------------------
# Failed and killed builds


@pytest.mark.slow
def test_failed_build_on_dask_leaves_no_manifest(dask_cluster, tmp_path, monkeypatch):
    # An old dataset replaced by a rebuild that fails on a worker: neither manifest remains.
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "digits"}))

    class FailingRenderFn(build_digits.RenderPairFn):  # local: pickled by value to the workers
        def process(self, pair):
            if pair.split == "test" and pair.index == 7:
                raise ValueError("injected render failure")
            yield from super().process(pair)

    monkeypatch.setattr(build_digits, "RenderPairFn", FailingRenderFn)
    with pytest.raises(ValueError, match="injected render failure"):
        build_digits.build_digits(str(tmp_path), dm=1, overwrite=True, beam_args=on_dask(dask_cluster))
    assert not os.path.exists(schema.manifest_path(str(tmp_path)))


@pytest.mark.slow
def test_killed_build_on_dask_leaves_no_manifest(dask_cluster, tmp_path):
    out = killed_build.kill_mid_build(tmp_path, on_dask(dask_cluster), dataset="digits")
    wait_until_idle(dask_cluster)
    assert os.path.isdir(out)  # the build had started writing there
    assert not os.path.exists(os.path.join(out, schema.MANIFEST_FILENAME))


@pytest.mark.slow
def test_killed_mnist_svhn_build_on_dask_leaves_no_manifest(dask_cluster, tmp_path):
    out = killed_build.kill_mid_build(tmp_path, on_dask(dask_cluster))
    wait_until_idle(dask_cluster)
    assert os.path.isdir(out) and not os.path.exists(os.path.join(out, schema.MANIFEST_FILENAME))


# --------------------------------------------------------------------------------------------
# What the DaskRunner cannot run is refused before anything runs (no cluster needed)


def dask_pipeline() -> beam.Pipeline:
    return beam_io.make_pipeline(["--runner=DaskRunner", "--dask_client_address=127.0.0.1:1"])


def test_the_short_runner_name_means_beams_dask_runner():
    options = dask_pipeline().options
    assert beam_io.options_to_json(options)["runner"] == beam_io.DASK_RUNNER
    assert beam_io.is_dask_runner(beam_io.DASK_RUNNER) and not beam_io.is_dask_runner("FnApiRunner")


def test_the_dask_runner_without_the_dask_extra_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    with pytest.raises(UserError, match=r"DaskRunner needs dask.distributed: pip install 'bmvae-tf\[dask\]'"):
        dask_pipeline()


def test_side_inputs_are_refused_on_dask_but_not_locally():
    for beam_args, refused in ((None, False), (["--runner=DaskRunner"], True)):
        pipeline = beam_io.make_pipeline(beam_args)
        total = pipeline | "Total" >> beam.Create([3])
        _ = (pipeline | "Values" >> beam.Create([1, 2])
             | "AddTotal" >> beam.Map(lambda x, t: x + t, t=beam.pvalue.AsSingleton(total)))
        if refused:
            with pytest.raises(UserError, match="'AddTotal'.*side input.*--direct_num_workers"):
                beam_io.check_runner_support(pipeline)
        else:
            beam_io.check_runner_support(pipeline)


def test_a_second_output_branch_is_refused_on_dask():
    pipeline = dask_pipeline()
    values = pipeline | "Values" >> beam.Create([1, 2])
    _ = values | "Forgotten" >> beam.Map(str)
    _ = values | "Last" >> beam.Map(repr)
    with pytest.raises(RuntimeError, match="'Last'.*never be computed.*Forgotten"):
        beam_io.check_runner_support(pipeline)


def test_tagged_outputs_are_refused_on_dask():
    class Parity(beam.DoFn):
        def process(self, x):
            yield beam.pvalue.TaggedOutput("odd" if x % 2 else "even", x)

    pipeline = dask_pipeline()
    parts = pipeline | "Values" >> beam.Create([1, 2]) | "Split" >> beam.ParDo(Parity()).with_outputs("odd", "even")
    _ = (parts.odd, parts.even) | "Both" >> beam.Flatten()
    with pytest.raises(UserError, match="cannot run stage 'Split/ParDo\\(Parity\\)': it has tagged outputs"):
        beam_io.check_runner_support(pipeline)


def test_the_shard_and_manifest_stages_pass_the_dask_check(tmp_path):
    pipeline = dask_pipeline()
    template = build_digits.manifest_template(source={}, pipeline_options={})
    _ = (pipeline | "Records" >> beam.Create([("train", 0, b"x")])
         | "WriteShards" >> beam_io.WriteShards(str(tmp_path), {"train": 1}, namespace="t")
         | "WriteManifest" >> beam_io.WriteManifest(str(tmp_path), template, {"train": 1}, {"train": 1}))
    beam_io.check_runner_support(pipeline)


def test_counters_of_a_runner_without_metrics_are_none():
    class NoMetrics:
        def metrics(self):
            raise NotImplementedError("collecting metrics will come later!")

    assert beam_io.query_counters(NoMetrics(), "digits") is None


def test_cub_is_refused_on_dask_before_its_output_is_touched(tmp_path):
    from bmvae_tf.pipeline import build_cub
    from tests import cub_tree

    tree = cub_tree.write_tree(str(tmp_path / "raw"))
    out = tmp_path / "out"
    out.mkdir()
    (out / schema.MANIFEST_FILENAME).write_text(json.dumps({"name": "cub"}))
    with pytest.raises(UserError, match="DaskRunner cannot run stage .* side input"):
        build_cub.run_cub_job(str(out), cub_dir=tree.cub_dir, captions_dir=tree.captions_dir,
                              resnet_weights=None, image_size=32, overwrite=True,
                              beam_args=["--runner=DaskRunner", "--dask_client_address=127.0.0.1:1"])
    assert (out / schema.MANIFEST_FILENAME).exists()  # the old dataset is untouched
