"""The full-size MNIST-SVHN builds (issue 17 item 2), measured on the DirectRunner and on Dask.

1. Writes full-size sources in the published formats with synthetic pixels: MNIST IDX gz
   (60,000 train, 10,000 test) and SVHN MAT 5 (73,257 train, 26,032 test, digit 0 stored as
   10), labels drawn with the real class frequencies; written a chunk at a time, so the writer
   stays small in memory. `--scale` shrinks every class count (for quick runs and tests).
2. Builds `mnist-svhn` (dm 30) and/or `mnist-svhn-text` (dm 20) from them on each engine:
   - `direct1`, `direct2`: the in-process runner (FnApiRunner) in multi_processing mode with
     1 or 2 SDK worker processes;
   - `dask2`: Beam's DaskRunner on a dask.distributed scheduler and 2 single-threaded worker
     processes that this script starts on loopback (and stops afterwards).
   Each build runs in a fresh driver process; a sampler reads VmHWM/VmRSS of the driver, its
   child processes and the Dask workers every 0.5 s (the Dask workers' VmHWM is reset before
   each build through /proc/PID/clear_refs), and kills the build if their summed RSS passes
   `--cap-mb` (a shared machine must not run out of memory): such a run is recorded as aborted.
3. Records wall time, records/s, peak RSS of the driver and each worker, bytes on disk, and with
   `--rss-dm` also the peak RSS at another dm (dm 1 against dm 30: memory flat in data size?).
   `--profile` adds a cProfile of a one-process (in_memory) build, its time bucketed into
   source reading, pairing, shuffle/GroupByKey, encoding, and gzip TFRecord writing.

    python bench/full_size_build.py                       # full size, both datasets, all engines
    python bench/full_size_build.py --scale 0.05 --datasets mnist-svhn --engines direct1 --dm 1

Large outputs go to --scratch (deleted afterwards unless --keep); the JSON to --output.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

import common
from bmvae_tf.pipeline.sources import IMAGE_SHAPES as SHAPES, MNIST_FILES, SVHN_FILES  # the names the readers expect

# The published class frequencies (digits 0..9).
COUNTS = {
    ("mnist", "train"): (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    ("mnist", "test"): (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ("svhn", "train"): (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659),
    ("svhn", "test"): (1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595),
}
CHUNK = 4096  # images generated and written at a time
DEFAULT_DM = {"mnist-svhn": 30, "mnist-svhn-text": 20}
ENGINES = {
    "direct1": ["--direct_num_workers=1", "--direct_running_mode=multi_processing"],
    "direct2": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    "dask2": None,  # filled in with the cluster's address
}
PROFILE_ARGS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


# ------------------------------------------------------------------------------ the sources


def scaled_counts(counts, scale: float) -> list[int]:
    """Each class count times `scale`, rounded, at least 1."""
    return [max(1, int(round(c * scale))) for c in counts]


def draw_labels(counts, seed: int) -> np.ndarray:
    """uint8 labels with exactly counts[c] of digit c, in a seeded random order."""
    labels = np.repeat(np.arange(len(counts), dtype=np.uint8), counts)
    return np.random.default_rng(seed).permutation(labels)


def synthetic_images(labels: np.ndarray, shape: tuple[int, ...], seed: int, start: int = 0) -> np.ndarray:
    """uint8 [k, *shape]: a fixed random pattern per digit plus per-image noise (cheap, and the
    class is visible in the pixels). Image i depends only on (seed, start + i's chunk)."""
    templates = np.random.default_rng([seed, 0]).integers(0, 192, size=(10, *shape), dtype=np.uint8)
    noise = np.random.default_rng([seed, 1, start]).integers(0, 64, size=(len(labels), *shape), dtype=np.uint8)
    return templates[labels] + noise


def image_chunks(labels: np.ndarray, dataset: str, seed: int, chunk: int = CHUNK):
    """(start, uint8 images [k, H, W, C]) over `labels`, one chunk at a time."""
    for start in range(0, len(labels), chunk):
        yield start, synthetic_images(labels[start:start + chunk], SHAPES[dataset], seed, start)


def write_idx_gz(path: str, dims: tuple[int, ...], chunks, level: int = 6) -> None:
    """An IDX file of unsigned bytes, gzipped, from byte chunks (MNIST's published format)."""
    with gzip.open(path + ".tmp", "wb", compresslevel=level) as f:
        f.write(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
        for data in chunks:
            f.write(data)
    os.replace(path + ".tmp", path)


def write_mnist(directory: str, split: str, labels: np.ndarray, seed: int) -> None:
    images, label_file = MNIST_FILES[split]
    write_idx_gz(os.path.join(directory, label_file), (len(labels),), [labels.tobytes()])
    write_idx_gz(os.path.join(directory, images), (len(labels), 28, 28),
                 (x.tobytes() for _, x in image_chunks(labels, "mnist", seed)))


# MAT 5: a 128-byte header, then one element per variable (module docstring of pipeline/sources.py).
_MI_INT8, _MI_UINT8, _MI_INT32, _MI_UINT32, _MI_DOUBLE, _MI_MATRIX, _MI_COMPRESSED = 1, 2, 5, 6, 9, 14, 15
_MX_DOUBLE, _MX_UINT8 = 6, 9


def _mat_matrix_head(name: str, mclass: int, dims: tuple[int, ...], data_type: int, nbytes: int) -> bytes:
    """A miMATRIX element up to its real data: tag, array flags, dimensions, name, data tag."""
    assert len(name) <= 4 and nbytes % 8 == 0
    flags = struct.pack("<II", _MI_UINT32, 8) + struct.pack("<II", mclass, 0)
    dim_data = struct.pack(f"<{len(dims)}i", *dims)
    dim_data += b"\0" * (-len(dim_data) % 8)
    dims_el = struct.pack("<II", _MI_INT32, 4 * len(dims)) + dim_data
    name_el = struct.pack("<I", (len(name) << 16) | _MI_INT8) + name.encode().ljust(4, b"\0")
    data_tag = struct.pack("<II", data_type, nbytes)
    body = len(flags) + len(dims_el) + len(name_el) + len(data_tag) + nbytes
    return struct.pack("<II", _MI_MATRIX, body) + flags + dims_el + name_el + data_tag


def _write_mat_variable(f, head: bytes, chunks, compress: bool, level: int) -> None:
    if not compress:
        f.write(head)
        for data in chunks:
            f.write(data)
        return
    # miCOMPRESSED: the zlib stream of the whole miMATRIX element; its length is patched in after.
    tag_at = f.tell()
    f.write(struct.pack("<II", _MI_COMPRESSED, 0))
    deflate = zlib.compressobj(level)
    written = 0
    for data in itertools.chain([head], chunks):
        out = deflate.compress(data)
        f.write(out)
        written += len(out)
    out = deflate.flush()
    f.write(out)
    written += len(out)
    end = f.tell()
    f.seek(tag_at + 4)
    f.write(struct.pack("<I", written))
    f.seek(end)


def write_svhn_mat(path: str, labels: np.ndarray, seed: int, compress: bool = True, level: int = 1) -> None:
    """SVHN's format 2 as MAT 5: X uint8 [32, 32, 3, N] (column-major: image n is one C-order
    [3, 32, 32] block), then y double [N, 1] with digit 0 stored as 10. Streams the images."""
    n = len(labels)
    header = b"MATLAB 5.0 MAT-file, written by bench/full_size_build.py".ljust(116, b" ")
    with open(path + ".tmp", "wb") as f:
        f.write(header + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM")
        x_head = _mat_matrix_head("X", _MX_UINT8, (32, 32, 3, n), _MI_UINT8, 3072 * n)
        _write_mat_variable(f, x_head, (x.transpose(0, 3, 2, 1).tobytes()
                                        for _, x in image_chunks(labels, "svhn", seed)), compress, level)
        y = np.where(labels == 0, 10, labels).astype("<f8")
        y_head = _mat_matrix_head("y", _MX_DOUBLE, (n, 1), _MI_DOUBLE, 8 * n)
        _write_mat_variable(f, y_head, [y.tobytes()], compress, level)
    os.replace(path + ".tmp", path)


def write_sources(directory: str, scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The six published files in `directory`; returns the labels {"mnist/train": [N], ...}."""
    os.makedirs(directory, exist_ok=True)
    labels = {}
    for i, ((dataset, split), counts) in enumerate(sorted(COUNTS.items())):
        y = draw_labels(scaled_counts(counts, scale), seed=seed * 100 + i)
        if dataset == "mnist":
            write_mnist(directory, split, y, seed=seed * 100 + 10 + i)
        else:
            write_svhn_mat(os.path.join(directory, SVHN_FILES[split]), y, seed=seed * 100 + 10 + i)
        labels[f"{dataset}/{split}"] = y
    return labels


# ------------------------------------------------------------------------------ measuring


def _status_kb(pid: int, *keys: str) -> list[int | None]:
    """The values in kB of `keys` in /proc/PID/status, read once (None: absent, or the process is gone)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return [found.get(key) for key in keys]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (/proc/PID/stat), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Resets a process's VmHWM to its current RSS (Linux /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples VmHWM and VmRSS of a process tree and of extra pids every `interval` seconds.

    peaks: {pid: {"role", "peak_rss_mb"}}; kills the tree's process group when the summed RSS
    passes cap_mb (then `capped` is set)."""

    def __init__(self, root_pid: int, extra: dict[int, str], cap_mb: float, interval: float = 0.5):
        self.root, self.extra, self.cap_mb, self.interval = root_pid, dict(extra), cap_mb, interval
        self.peaks: dict[int, dict] = {}
        self.max_total_mb = 0.0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _pids(self) -> dict[int, str]:
        import psutil
        pids = dict(self.extra)
        try:
            pids[self.root] = "driver"
            for child in psutil.Process(self.root).children(recursive=True):
                pids.setdefault(child.pid, "worker")
        except psutil.Error:
            pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0.0
            for pid, role in self._pids().items():
                hwm, rss = _status_kb(pid, "VmHWM", "VmRSS")
                if hwm is None:
                    continue
                cpu = cpu_seconds(pid) or 0.0
                # CPU seconds used during the build (the Dask workers' from the first sample on)
                entry = self.peaks.setdefault(pid, {"role": role, "peak_rss_mb": 0.0,
                                                    "cpu_at_start": cpu if pid in self.extra else 0.0})
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"], hwm / 1024)
                entry["cpu_s"] = round(cpu - entry["cpu_at_start"], 2)
                total += (rss or 0) / 1024
            self.max_total_mb = max(self.max_total_mb, total)
            if total > self.cap_mb and not self.capped:
                self.capped = True
                with contextlib.suppress(OSError):
                    os.killpg(self.root, signal.SIGKILL)
            self._stop.wait(self.interval)


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
out, source_dir, dataset, dm, beam_args = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
import logging
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
from bmvae_tf.pipeline import build_mnist_svhn
started = time.perf_counter()
result = build_mnist_svhn.run_mnist_svhn_job(out, with_text=dataset == "mnist-svhn-text", source_dir=source_dir,
                                             dm=dm, beam_args=beam_args, overwrite=True)
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"build_seconds": seconds,
                              "counts": {k: v.count for k, v in result.manifest.splits.items()}}), flush=True)
"""


def bytes_on_disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def run_build(scratch: str, source_dir: str, dataset: str, dm: int, beam_args: list[str], *,
              workers: dict[int, str], cap_mb: float, profile: str | None = None) -> dict:
    """One build in a fresh driver process, sampled; the measured row (output deleted after)."""
    out = tempfile.mkdtemp(prefix=f"{dataset}-dm{dm}-", dir=scratch)
    script = os.path.join(scratch, "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    for pid in workers:
        reset_peak_rss(pid)
    command = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else []) + [
        script, common.ROOT, out, source_dir, dataset, str(dm), json.dumps(beam_args)]
    log_path = out + ".log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        with Sampler(child.pid, workers, cap_mb) as sampler:
            stdout = child.communicate()[0].decode()
    seconds = time.perf_counter() - started
    row = {"dataset": dataset, "dm": dm, "beam_args": beam_args, "wall_s": seconds,
           "max_total_rss_mb": sampler.max_total_mb, "processes": sorted(sampler.peaks.values(),
                                                                        key=lambda p: p["role"])}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if sampler.capped or child.returncode or not lines:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        row.update(aborted=f"summed RSS passed {cap_mb:.0f} MB" if sampler.capped else
                   f"exit {child.returncode}", log_tail=tail,
                   manifest_published=os.path.exists(os.path.join(out, "manifest.json")))
    else:
        result = json.loads(lines[-1][len("RESULT "):])
        records = sum(result["counts"].values())
        row.update(result, records=records, records_per_s=records / seconds, bytes_on_disk=bytes_on_disk(out))
    # CPU seconds per process: on a shared machine the wall time of 2 workers says little, their
    # CPU time and its balance say what free cores would give (issue 17's 16-core question).
    shown = [p for p in row["processes"] if p["peak_rss_mb"] > 20]
    row["driver_cpu_s"] = sum(p.get("cpu_s", 0.0) for p in shown if p["role"] == "driver")
    row["worker_cpu_s"] = [p.get("cpu_s") for p in shown if p["role"] != "driver"]
    row["driver_peak_rss_mb"] = max([p["peak_rss_mb"] for p in row["processes"] if p["role"] == "driver"] or [0])
    # (a few MB: the shell wrappers Beam starts its SDK workers through)
    row["worker_peak_rss_mb"] = [round(p["peak_rss_mb"], 1) for p in shown if p["role"] != "driver"]
    shutil.rmtree(out, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------ Dask


@contextlib.contextmanager
def dask_cluster(root: str, n_workers: int = 2, timeout_s: float = 240):
    """(address, {worker pid: "dask worker i"}): a scheduler and single-threaded worker processes
    on loopback (as tests/pipeline/test_dask.py's fixture), stopped on exit."""
    from distributed import Client
    os.makedirs(root, exist_ok=True)
    scheduler_file = os.path.join(root, "scheduler.json")
    processes = []

    def start(name, *args):
        with open(os.path.join(root, f"{name}.log"), "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                start_new_session=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                             "PYTHONPATH": common.ROOT}))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", scheduler_file, "--idle-timeout", "3600")
        for i in range(n_workers):
            start(f"worker{i}", "worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
                  "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                  "--local-directory", os.path.join(root, f"w{i}"), "--death-timeout", "60")
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(scheduler_file):
            if time.monotonic() > deadline or processes[0].poll() is not None:
                raise RuntimeError("the dask scheduler did not start")
            time.sleep(0.2)
        time.sleep(0.5)
        with open(scheduler_file) as f:
            address = json.load(f)["address"]
        with Client(address, timeout=timeout_s) as client:
            client.wait_for_workers(n_workers, timeout=timeout_s)
        yield address, {p.pid: f"dask worker {i}" for i, p in enumerate(processes[1:])}
    finally:
        for process in processes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(20)


# ------------------------------------------------------------------------------ profile


BUCKETS = (  # (bucket, substrings of "file:function"), first match wins
    ("gzip TFRecord write", ("_pywrap_record_io", "record_io")),
    ("encode (tf.train.Example)", ("schema.py", "example_pb2", "SerializeToString", "_message")),
    ("driver: check and hash the sources", ("sha256", "hashlib")),
    ("read sources (inflate, IDX, MAT)", ("sources.py", "zlib", "gzip.py", "_compression")),
    ("record assembly (image lookup, pair_record)", ("build_mnist_svhn.py:process", "pair_record", "<genexpr>",
                                                     "tobytes", "frombuffer", "reshape")),
    ("pairing (plans, permutations)", ("mnist_svhn.py", "permutation.py", "build_mnist_svhn.py")),
    ("imports", ("<frozen importlib", "create_dynamic", "marshal", "exec_module", "<module>")),
    ("runner: bundles, coders, waits", ("apache_beam", "coder_impl", "pickle", "_thread.lock", "grpc")),
)


def profile_summary(profile: str, top: int = 15) -> dict:
    """Own time of a cProfile summed per BUCKETS entry (the rest under "other"), and the
    functions with the most own time."""
    import pstats
    stats = pstats.Stats(profile)
    totals: dict[str, float] = {}
    rows = []
    for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        key = f"{file}:{name}"
        bucket = next((b for b, parts in BUCKETS if any(p in key for p in parts)), "other")
        totals[bucket] = totals.get(bucket, 0.0) + tt
        rows.append({"function": f"{os.path.basename(file)}:{line}:{name}", "own_s": round(tt, 3),
                     "cumulative_s": round(ct, 3), "bucket": bucket})
    rows.sort(key=lambda r: -r["own_s"])
    return {"own_time_s_by_bucket": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
            "top_functions": rows[:top]}


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/full_size_build.json")
    parser.add_argument("--datasets", default="mnist-svhn,mnist-svhn-text")
    parser.add_argument("--engines", default="direct1,direct2,dask2", help=f"of {','.join(ENGINES)}")
    parser.add_argument("--dm", type=int, default=None, help="default: 30 for mnist-svhn, 20 with text")
    parser.add_argument("--rss-dm", type=int, default=None,
                        help="also build at this dm (e.g. 1) on each engine, for peak RSS against size")
    parser.add_argument("--scale", type=float, default=1.0, help="of every class count of the sources")
    parser.add_argument("--scratch", default=None, help="for sources and outputs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--cap-mb", type=float, default=12000, help="abort a build whose processes pass this RSS")
    parser.add_argument("--dask-npartitions", type=int, default=8, help="--dask_npartitions for the DaskRunner")
    parser.add_argument("--profile", action="store_true", help="cProfile an in_memory build of the first dataset")
    parser.add_argument("--summarize", metavar="JSON", help="only recompute the summary of a results file "
                        "(e.g. of a run stopped early) and write it back")
    return parser.parse_args(argv)


def plan_runs(args) -> list[tuple[str, str, int]]:
    """(engine, dataset, dm) in run order: per dataset and engine, its dm and then --rss-dm (so a
    run stopped early has whole pairs)."""
    runs = []
    for dataset in args.datasets.split(","):
        dms = [args.dm or DEFAULT_DM[dataset]] + ([args.rss_dm] if args.rss_dm else [])
        runs += [(engine, dataset, dm) for engine in args.engines.split(",") if engine for dm in dms]
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            results = json.load(f)
        summarize(results)
        common.write_json(args.summarize, results)
        return results
    # A SIGTERM unwinds (stopping the Dask cluster, deleting the scratch dir) instead of orphaning.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = {"machine": common.machine(), "command": "python bench/full_size_build.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "args": vars(args), "runs": []}
    scratch = args.scratch or tempfile.mkdtemp(prefix="full-size-")
    os.makedirs(scratch, exist_ok=True)
    try:
        source_dir = os.path.join(scratch, "sources")
        started = time.perf_counter()
        labels = write_sources(source_dir, args.scale)
        results["sources"] = {"scale": args.scale, "write_s": time.perf_counter() - started,
                              "counts": {k: int(len(v)) for k, v in labels.items()},
                              "bytes": bytes_on_disk(source_dir)}
        print(f"sources: {results['sources']}", flush=True)
        runs = plan_runs(args)
        with contextlib.ExitStack() as stack:
            cluster = None
            for engine, dataset, dm in runs:
                workers = {}
                beam_args = ENGINES[engine]
                if engine == "dask2":
                    if cluster is None:
                        cluster = stack.enter_context(dask_cluster(os.path.join(scratch, "dask")))
                    address, workers = cluster
                    beam_args = ["--runner=DaskRunner", f"--dask_client_address={address}",
                                 f"--dask_npartitions={args.dask_npartitions}"]
                print(f"{engine}: {dataset} dm {dm} ...", flush=True)
                row = run_build(scratch, source_dir, dataset, dm, beam_args, workers=workers, cap_mb=args.cap_mb)
                row["engine"] = engine
                results["runs"].append(row)
                print("  " + json.dumps({k: row.get(k) for k in ("wall_s", "records", "records_per_s",
                      "driver_peak_rss_mb", "worker_peak_rss_mb", "aborted")}), flush=True)
                write_json_partial(args.output, results)
        if args.profile:
            dataset = args.datasets.split(",")[0]
            prof = os.path.join(scratch, "build.prof")
            row = run_build(scratch, source_dir, dataset, args.dm or DEFAULT_DM[dataset], PROFILE_ARGS,
                            workers={}, cap_mb=args.cap_mb, profile=prof)
            results["profile"] = {"dataset": dataset, "wall_s": row["wall_s"], "records": row.get("records"),
                                  "beam_args": PROFILE_ARGS, **profile_summary(prof)}
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    summarize(results)
    common.write_json(args.output, results)
    return results


def write_json_partial(path: str, results: dict) -> None:
    """Writes the results so far (a long run killed mid-way keeps what it measured)."""
    with contextlib.redirect_stdout(None):
        common.write_json(path, results)


def summarize(results: dict) -> None:
    """Prints the table; adds the 2-worker speed-ups and dm ratios of peak RSS to `results`."""
    rows = results["runs"]
    common.print_table(rows, ["engine", "dataset", "dm", "records", "wall_s", "records_per_s",
                              "driver_peak_rss_mb", "worker_peak_rss_mb", "bytes_on_disk", "aborted"])
    by = {(r["engine"], r["dataset"], r["dm"]): r for r in rows if "aborted" not in r}
    speedups, rss = {}, {}
    for (engine, dataset, dm), row in by.items():
        if engine == "direct2" and ("direct1", dataset, dm) in by:
            speedups[f"{dataset} dm {dm} direct2/direct1"] = by[("direct1", dataset, dm)]["wall_s"] / row["wall_s"]
        for (e2, d2, dm2), other in by.items():
            if e2 == engine and d2 == dataset and dm2 < dm:
                peak = lambda r: max([r["driver_peak_rss_mb"], *r["worker_peak_rss_mb"]])
                rss[f"{engine} {dataset} dm {dm}/dm {dm2}"] = peak(row) / peak(other)
    results["speedup_2_over_1"] = speedups
    results["peak_rss_ratio_by_dm"] = rss
    print("\n2 workers / 1 worker (target >= 1.6):", json.dumps(speedups, indent=1))
    print("largest process peak RSS, dm against smaller dm (target <= 1.2):", json.dumps(rss, indent=1))
    if "profile" in results:
        print("profile, own time by bucket:", json.dumps(results["profile"], indent=1))


if __name__ == "__main__":
    main()
