"""Where `bmvae evaluate`'s time goes: seconds per stage, against the time of training epochs.

Every round runs one whole evaluation of a trained run in a fresh process (as `bmvae evaluate`
does: the graphs are traced anew), and times each stage of trainers/evaluation/evaluate.py's flow.
`current` is the first evaluation on a dataset (an empty dataset cache: the classifiers and the
robustness baseline computed; RUN/classifiers deleted unless --cached-classifiers),
`current_warm` every later one (the dataset cache filled by an untimed evaluation first):

- classifiers: the coherence classifiers trained (or loaded), and their accuracy on real test data;
- encodings: the train and test splits encoded for every subset (means and cross generations);
- then every other entry of evaluate.STAGES (probes, coherence, random coherence, robustness, CCA,
  likelihoods), and the plots, metrics.json and report.

The ratio printed is the evaluation's total against 5 training epochs: the median epoch of the
run's history.jsonl times 5 (`history`), and with --train-rounds the median epoch (epochs 2..5) of
a 5-epoch `bmvae train` of the run's config timed in the same rounds (`measured`, the fairer
figure on a shared machine). --baseline-tree times another checkout of the repository (e.g. the
code before a change, `git archive BASE | tar -x -C DIR`) in the same interleaved rounds, on its
own copy of the run, and compares the metrics both wrote.

    python bench/evaluate.py --run /tmp/evalspeed/run --data /tmp/evalspeed/data
    python bench/evaluate.py --run RUN --data DATA --baseline-tree /tmp/base --rounds 3 --train-rounds
    python bench/evaluate.py --sixview          # builds a six-view vector set, trains, evaluates

The run is copied (evaluate writes into it); the original is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the repository on the path)
from common import machine, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
BMVAE = os.path.join(os.path.dirname(sys.executable), "bmvae")  # the CLI of this interpreter's install
STAGE_ORDER = ["classifiers", "encodings", "probes", "coherence", "random_coherence", "robustness", "cca",
               "likelihoods", "plots_and_report"]
# evaluate.STAGES entry (its function's name) -> the bench's stage name
_STAGE_NAMES = {"classifier_accuracy_stage": "classifiers", "latent_accuracy_stage": "probes",
                "cross_coherence_stage": "coherence", "random_coherence_stage": "random_coherence",
                "robustness_stage": "robustness", "cca_stage": "cca", "log_likelihood_stage": "likelihoods"}


# ------------------------------------------------------------------------------------ worker


def worker(run: str, data: str | None, code: str | None, output: str) -> None:
    """One timed `evaluate.evaluate(run, data)` in this process: {stage: seconds} and the metrics,
    to `output`.

    The stages are timed by wrapping evaluate's own pieces (the classifiers' load_or_train,
    EvalContext._encode, every STAGES entry), each counted without the pieces it calls, so
    the stages add up to evaluate's time; `plots_and_report` is the rest of evaluate's time on
    the calling thread (with the plots drawn in the background, the wait for them, if any).
    code: a staged package directory (see `stage_tree`) imported instead of the installed one."""
    if code:
        sys.path.insert(0, code)
    started = time.perf_counter()
    import tensorflow as tf  # noqa: F401  (imported first, so its cost is counted apart)
    from bmvae_tf.trainers.evaluation import classifiers as classifiers_lib
    from bmvae_tf.trainers.evaluation import evaluate as evaluate_lib
    from bmvae_tf.trainers.evaluation.context import EvalContext
    imported = time.perf_counter() - started

    seconds = {name: 0.0 for name in STAGE_ORDER}
    cpu_seconds = {name: 0.0 for name in STAGE_ORDER}  # this process's CPU time: > seconds when both cores work
    stack = []  # [name, wall start, cpu start, wall of nested pieces, cpu of nested pieces]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            stack.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, wall, cpu, nested_wall, nested_cpu = stack.pop()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                seconds[name] += wall - nested_wall
                cpu_seconds[name] += cpu - nested_cpu
                if stack:
                    stack[-1][3] += wall
                    stack[-1][4] += cpu
        return wrapper

    classifiers_lib.load_or_train = timed("classifiers", classifiers_lib.load_or_train)
    EvalContext._encode = timed("encodings", EvalContext._encode)
    evaluate_lib.STAGES[:] = [dataclasses.replace(stage, run=timed(
        _STAGE_NAMES.get(stage.run.__name__, stage.run.__name__), stage.run)) for stage in evaluate_lib.STAGES]
    context_of = evaluate_lib._context
    load = []

    def context(*args):
        t = time.perf_counter()
        out = context_of(*args)
        load.append(time.perf_counter() - t)
        return out

    evaluate_lib._context = context
    t0 = time.perf_counter()
    metrics = evaluate_lib.evaluate(run, data)
    total = time.perf_counter() - t0 - load[0]
    seconds["plots_and_report"] = total - sum(seconds.values())
    with open(output, "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds, "total": total, "load_model_and_data": load[0],
                   "import": imported, "code": evaluate_lib.__file__, "metrics": metrics}, f)


# ------------------------------------------------------------------------------------ driver


def stage_tree(tree: str, directory: str) -> str:
    """A package directory importing a checkout `tree` as bmvae_tf (its folders mapped as setup.py's
    package_dir maps them): bmvae_tf/ <- tree/bmvae_tf, bmvae_tf/trainers <- tree/trainers,
    bmvae_tf/pipeline <- tree/pipeline."""
    target = os.path.join(directory, "bmvae_tf")
    if not os.path.exists(target):
        shutil.copytree(os.path.join(tree, "bmvae_tf"), target)
        shutil.copytree(os.path.join(tree, "trainers"), os.path.join(target, "trainers"))
        shutil.copytree(os.path.join(tree, "pipeline"), os.path.join(target, "pipeline"))
    return directory


def timed_evaluation(run: str, data: str | None, code: str | None, scratch: str, cached: bool,
                     warm_cache: bool = False) -> dict:
    """Copies `run` into `scratch` and evaluates the copy in a fresh process, with the dataset
    cache (trainers/evaluation/dataset_cache.py) at scratch/dataset_cache: emptied first unless
    `warm_cache`, where what an earlier evaluation there stored is read."""
    copy = os.path.join(scratch, "run")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=None if cached else shutil.ignore_patterns("classifiers"))
    for stale in ("metrics.json", "plots", "report.html"):
        path = os.path.join(copy, stale)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
            os.path.exists(path) and os.remove(path))
    out = os.path.join(scratch, "timing.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--run", copy, "--output", out]
    command += ["--data", data] if data else []
    command += ["--code", code] if code else []
    cache = os.path.join(scratch, "dataset_cache")
    if not warm_cache:
        shutil.rmtree(cache, ignore_errors=True)
    subprocess.run(command, check=True, cwd=tempfile.gettempdir(), env={**os.environ, "BMVAE_CACHE_DIR": cache})
    with open(out) as f:
        return json.load(f)


def history_epoch_seconds(run: str) -> float:
    """The median epoch of the run's history.jsonl (the first, which traces or compiles, left out)."""
    with open(os.path.join(run, "history.jsonl")) as f:
        seconds = [json.loads(line).get("seconds") for line in f if line.strip()]
    seconds = [float(s) for s in seconds[1:] if s is not None]
    return statistics.median(seconds)


def measured_epoch_seconds(run: str, data: str, scratch: str, epochs: int = 5) -> float:
    """The median epoch (2..epochs) of `bmvae train` with the run's config for `epochs` epochs; the
    run's choice of XLA is kept (a null jit_compile resolves by the full run's length)."""
    import yaml
    with open(os.path.join(run, "config.yaml")) as f:
        config = yaml.safe_load(f)
    workdir = os.path.join(scratch, "train")
    shutil.rmtree(workdir, ignore_errors=True)
    jit = config["train"].get("jit_compile")
    if jit is None:  # what the full run chose: XLA from 1,000 steps (trainers/config.py)
        jit = _full_run_steps(run) >= 1000
    command = [BMVAE, "train", "--data", data, "--workdir", workdir, "--config", os.path.join(run, "config.yaml"),
               "--set", f"train.epochs={epochs}", "--set", f"train.jit_compile={str(bool(jit)).lower()}",
               "--set", f"data.dir={data}"]
    subprocess.run(command, check=True, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "history.jsonl")) as f:
        seconds = [float(json.loads(line)["seconds"]) for line in f if line.strip()]
    return statistics.median(seconds[1:])


def _full_run_steps(run: str) -> int:
    with open(os.path.join(run, "history.jsonl")) as f:
        return max(int(json.loads(line)["step"]) for line in f if line.strip())


def summarise(rounds: list[dict]) -> dict:
    """Median seconds per stage over rounds, and each stage's fraction of the median total."""
    total = statistics.median(r["total"] for r in rounds)
    stages = {name: statistics.median(r["seconds"][name] for r in rounds) for name in STAGE_ORDER}
    return {"total": total, "stages": stages, "fractions": {k: v / total for k, v in stages.items()},
            "per_round_totals": [r["total"] for r in rounds],
            "per_round_stages": [r["seconds"] for r in rounds]}


def compare_metrics(a, b, path: str = "") -> list[str]:
    """Where two metrics objects differ: ["key: a != b", ...] (exact comparison)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += compare_metrics(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare_metrics(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# ------------------------------------------------------------------------------------ six views


def build_sixview(directory: str, examples: int = 2000, views: int = 6, dim: int = 32, seed: int = 0) -> str:
    """A six-view vector set (`bmvae data build arrays`) of `examples` examples and 10 classes: each
    view a random linear map of a class centre plus view noise, float32 [dim]."""
    import numpy as np
    data = os.path.join(directory, "data")
    if os.path.exists(os.path.join(data, "manifest.json")):
        return data
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=examples)
    centres = rng.normal(size=(10, 8))
    arrays = {"label": labels.astype(np.int64)}
    for v in range(views):
        projection = rng.normal(size=(8, dim)) / np.sqrt(8)
        latent = centres[labels] + 0.7 * rng.normal(size=(examples, 8))
        arrays[f"view{v}"] = (latent @ projection + 0.3 * rng.normal(size=(examples, dim))).astype(np.float32)
    source = os.path.join(directory, "sixview.npz")
    np.savez(source, **arrays)
    subprocess.run([BMVAE, "data", "build", "arrays", "--input", source, "--output", data, "--name", "sixview"],
                   check=True, cwd=tempfile.gettempdir())
    return data


def train_sixview(directory: str, data: str, epochs: int) -> str:
    run = os.path.join(directory, "run")
    if not os.path.exists(os.path.join(run, "history.jsonl")):
        subprocess.run([BMVAE, "train", "--data", data, "--workdir", run, "--model", "bmvae_m",
                        "--set", f"train.epochs={epochs}", "--set", "model.latent_dim=16"],
                       check=True, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run (read only: each round evaluates a copy)")
    parser.add_argument("--data", help="its dataset (default: the run's config data.dir)")
    parser.add_argument("--sixview", action="store_true",
                        help="build (once, under --scratch) a 2,000-example six-view vector set, train bmvae_m on "
                             "it and time its evaluation")
    parser.add_argument("--sixview-epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-tree", help="a checkout of the code to compare against, timed in the same rounds")
    parser.add_argument("--train-rounds", action="store_true",
                        help="also time 5 training epochs of the run's config in every round")
    parser.add_argument("--cached-classifiers", action="store_true",
                        help="keep RUN/classifiers (default: delete them, so they are trained as in a fresh run)")
    parser.add_argument("--dataset-cache", choices=["cold", "warm", "both"], default="both",
                        help="time the current code with an empty dataset cache (the first evaluation on a "
                             "dataset: classifiers trained), a filled one (every later run on it), or both")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "bench_evaluate"))
    parser.add_argument("--output", default=os.path.join(HERE, "results", "evaluate.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.run, args.data, args.code, args.output)
        return
    load_at_start = list(os.getloadavg())
    os.makedirs(args.scratch, exist_ok=True)
    if args.sixview:
        directory = os.path.join(args.scratch, "sixview")
        args.data = build_sixview(directory)
        args.run = train_sixview(directory, args.data, args.sixview_epochs)
    # name -> (staged code or None for this checkout, warm dataset cache)
    variants = {}
    if args.baseline_tree:
        variants["baseline"] = (stage_tree(args.baseline_tree, os.path.join(args.scratch, "baseline_code")), False)
    if args.dataset_cache in ("cold", "both"):
        variants["current"] = (None, False)
    if args.dataset_cache in ("warm", "both"):
        variants["current_warm"] = (None, True)
        # Fills the cache the warm rounds read: one untimed evaluation, as the first run on a dataset.
        timed_evaluation(args.run, args.data, None, os.path.join(args.scratch, "current_warm"), args.cached_classifiers)
    data = args.data or _config_data(args.run)
    timings = {name: [] for name in variants}
    trained = []
    for r in range(args.rounds):
        for name, (code, warm) in variants.items():
            result = timed_evaluation(args.run, args.data, code, os.path.join(args.scratch, name),
                                      args.cached_classifiers, warm)
            timings[name].append(result)
            print(f"round {r + 1}/{args.rounds} {name}: {result['total']:.1f} s "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()), flush=True)
        if args.train_rounds:
            trained.append(measured_epoch_seconds(args.run, data, args.scratch))
            print(f"round {r + 1}/{args.rounds} train: median epoch {trained[-1]:.2f} s", flush=True)
    epoch = history_epoch_seconds(args.run)
    results = {}
    for name, rounds in timings.items():
        summary = summarise(rounds)
        summary["ratio_to_5_epochs_history"] = summary["total"] / (5 * epoch)
        if trained:
            summary["ratio_to_5_epochs_measured"] = statistics.median(
                r["total"] / (5 * t) for r, t in zip(rounds, trained))
        summary["metrics"] = rounds[-1]["metrics"]
        summary["code"] = rounds[-1]["code"]
        results[name] = summary
        print(f"\n{name}: total {summary['total']:.1f} s; 5 epochs (history) {5 * epoch:.1f} s: "
              f"ratio {summary['ratio_to_5_epochs_history']:.2f}"
              + (f"; measured ratio {summary['ratio_to_5_epochs_measured']:.2f}" if trained else ""))
        print_table([{"stage": k, "seconds": v, "fraction": summary["fractions"][k]}
                     for k, v in summary["stages"].items()], ["stage", "seconds", "fraction"])
    payload = {"command": " ".join(sys.argv), "machine": machine(), "load_average_at_start": load_at_start,
               "run": args.run, "data": data, "rounds": args.rounds, "cached_classifiers": args.cached_classifiers,
               "dataset_cache": args.dataset_cache,
               "history_median_epoch_seconds": epoch, "measured_median_epoch_seconds": trained,
               "results": results}
    for name in ("current", "current_warm"):
        if args.baseline_tree and name in timings:
            payload[f"metric_differences_{name}"] = compare_metrics(
                timings["baseline"][-1]["metrics"], timings[name][-1]["metrics"])
    if args.baseline_tree and "current" in timings:
        current, baseline = timings["current"], timings["baseline"]
        payload["speedup_per_round"] = [b["total"] / c["total"] for b, c in zip(baseline, current)]
        payload["speedup_median"] = statistics.median(payload["speedup_per_round"])
        payload["metric_differences"] = payload["metric_differences_current"]
        print(f"\nspeed-up (baseline / current, per round): {payload['speedup_median']:.2f} "
              f"({min(payload['speedup_per_round']):.2f}-{max(payload['speedup_per_round']):.2f}); "
              f"{len(payload['metric_differences'])} metrics differ")
        for line in payload["metric_differences"]:
            print("  " + line)
    if args.baseline_tree and "current_warm" in timings:
        baseline, warm = timings["baseline"], timings["current_warm"]
        payload["speedup_warm_per_round"] = [b["total"] / c["total"] for b, c in zip(baseline, warm)]
        payload["speedup_warm_median"] = statistics.median(payload["speedup_warm_per_round"])
        print(f"speed-up with a warm dataset cache: {payload['speedup_warm_median']:.2f} "
              f"({min(payload['speedup_warm_per_round']):.2f}-{max(payload['speedup_warm_per_round']):.2f}); "
              f"{len(payload['metric_differences_current_warm'])} metrics differ")
    write_json(args.output, payload)


def _config_data(run: str) -> str:
    import yaml
    with open(os.path.join(run, "config.yaml")) as f:
        return yaml.safe_load(f)["data"]["dir"]


if __name__ == "__main__":
    main()
