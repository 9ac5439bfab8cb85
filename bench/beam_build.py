"""The digits Beam build (pipeline/build_digits.py) on the DirectRunner with 1 and 2 workers.

Each configuration runs in a fresh subprocess, which reports its wall time, records/s and peak
RSS (its own and its worker processes', from getrusage). To show where the time goes, each
configuration also runs a trivial pipeline of the same size (Create -> Reshuffle -> Map) on the
same runner options: its wall time is the runner's fixed cost (worker start-up, bundle
transport), which extra workers cannot shorten. --profile adds a cProfile of the one-worker
in-memory build.

    python bench/beam_build.py                       # dm = 10 (12930 + 1440 + 3600 records)
    python bench/beam_build.py --dm 40 --output bench/results/beam_build_big.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common
from common import machine, print_table, write_json

CONFIGS = {
    "in_memory/1": ["--direct_num_workers=1", "--direct_running_mode=in_memory"],
    "multi_processing/1": ["--direct_num_workers=1", "--direct_running_mode=multi_processing"],
    "multi_processing/2": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
}

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, out, dm, beam_args = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
started = time.perf_counter()
if mode == "build":
    from bmvae_tf.pipeline import build_digits
    result = build_digits.run_digits_job(out, dm=dm, beam_args=beam_args, overwrite=True)
    records = sum(s.count for s in result.manifest.splits.values())
else:  # the runner's fixed cost: as many elements through a shuffle, no work per element
    import apache_beam as beam
    from bmvae_tf.pipeline import beam_io
    records = 1797 * dm
    with beam_io.make_pipeline(beam_args) as p:
        _ = p | beam.Create(range(records)) | beam.Reshuffle() | beam.Map(lambda x: x)
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({
    "seconds": seconds, "records": records,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_child(mode: str, out: str, dm: int, beam_args: list[str], profile: str | None = None) -> dict:
    script = os.path.join(out + ".child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    command = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else []) + [
        script, common.ROOT, mode, out, str(dm), json.dumps(beam_args)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{mode} {beam_args} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def top_functions(profile: str, n: int = 12) -> list[dict]:
    import pstats
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append({"function": f"{os.path.basename(file)}:{line}:{name}", "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:n]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/beam_build.json")
    parser.add_argument("--dm", type=int, default=10)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--profile", action="store_true", help="cProfile the in-memory one-worker build")
    args = parser.parse_args(argv)

    results = {"machine": machine(), "args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-beam-") as tmp:
        for name in args.configs.split(","):
            beam_args = CONFIGS[name]
            print(f"{name}: building digits dm={args.dm} ...", flush=True)
            build = run_child("build", os.path.join(tmp, name.replace("/", "-")), args.dm, beam_args)
            trivial = run_child("trivial", os.path.join(tmp, "trivial"), args.dm, beam_args)
            row = {"config": name, "records": build["records"], "seconds": build["seconds"],
                   "records/s": build["records"] / build["seconds"],
                   "peak rss MB": build["peak_rss_mb"], "worker peak rss MB": build["peak_rss_workers_mb"],
                   "runner fixed s": trivial["seconds"]}
            results["runs"].append(row)
            print(f"  {row['seconds']:.1f} s, {row['records/s']:.0f} records/s", flush=True)
        if args.profile:
            profile = os.path.join(tmp, "build.prof")
            run_child("build", os.path.join(tmp, "profiled"), args.dm, CONFIGS["in_memory/1"], profile=profile)
            results["profile_in_memory_1"] = top_functions(profile)
    print()
    print_table(results["runs"], ["config", "records", "seconds", "records/s", "peak rss MB",
                                  "worker peak rss MB", "runner fixed s"])
    by_name = {r["config"]: r for r in results["runs"]}
    if "multi_processing/1" in by_name and "multi_processing/2" in by_name:
        one, two = by_name["multi_processing/1"], by_name["multi_processing/2"]
        speedup = one["seconds"] / two["seconds"]
        work = lambda r: r["seconds"] - r["runner fixed s"]
        results["speedup_2_over_1"] = speedup
        results["speedup_excluding_fixed_cost"] = work(one) / max(work(two), 1e-9)
        print(f"\n2 workers / 1 worker: {speedup:.2f}x (target 1.5x); without the runner's fixed "
              f"cost: {results['speedup_excluding_fixed_cost']:.2f}x")
    if "profile_in_memory_1" in results:
        print("\nin_memory/1, top functions by own time:")
        print_table(results["profile_in_memory_1"], ["function", "tottime_s", "cumtime_s"])
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
