"""Shared pieces of the bench/ scripts: the machine, model configs on paper shapes, a training
step on in-memory batches, interleaved timing and JSON output.

Run a script as `python bench/NAME.py` from the repository root (its directory is put on the
path below so `bench.common`, `trainers` and `bmvae_tf` import without installing).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
ALL_MODELS = ("bmvae_m", "bmvae_m_uniform", "bmvae_p", "bmvae_p_uniform", "mmvae", "mmvae_tight",
              "mvae", "mmjsd", "mvae_ms", "mmvae_ms", "mmjsd_ms")


def machine() -> dict:
    """nproc, the CPU model and the library versions the figures were taken with."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import tensorflow as tf
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "tensorflow": tf.__version__, "platform": platform.platform(),
            # Other users of a shared machine skew figures; ratios from interleaved rounds less so.
            "load_average_1_5_15": list(os.getloadavg())}


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` to `path` (tmp, then rename) and says where."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


# ------------------------------------------------------------------------------------ shapes


def dataset_manifest(name: str):
    """The manifest (modalities only) of mnist-svhn, mnist-svhn-text or digits, as built."""
    from bmvae_tf.pipeline import build_digits, build_mnist_svhn
    if name == "digits":
        return build_digits.manifest_template(source={}, pipeline_options={})
    if name in build_mnist_svhn.NAMES:
        return build_mnist_svhn.manifest_template(name, source={}, pipeline_options={})
    raise ValueError(f"unknown dataset {name!r}")


PAPER_CONFIG = {"mnist-svhn": "mnist_svhn/bmvae_m.yaml", "mnist-svhn-text": "mnist_svhn_text/bmvae_m.yaml",
                "digits": "digits/bmvae_m.yaml"}


def model_config(dataset: str, model: str, K: int, *, jit_compile: bool = False, batch_size: int = 128,
                 dreg: bool = False, mixed_precision: bool = False):
    """The paper config of `dataset` (its networks, latent size, family) with `model` and K swapped
    in; the family falls back to the model's default where the model cannot use the config's."""
    from bmvae_tf.models import MODELS
    from bmvae_tf.trainers import config as config_lib
    data = config_lib.load_yaml(os.path.join(CONFIGS, PAPER_CONFIG[dataset]))
    section = dict(data["model"])
    section["name"], section["K"] = model, K
    if section.get("posterior", "auto") not in MODELS[model][0].POSTERIOR_FAMILIES:
        section["posterior"] = "auto"
    section["mmvae"] = {"dreg": dreg}
    return config_lib.from_dict({
        "data": {"dir": "unused"}, "model": section,
        "train": {"batch_size": batch_size, "jit_compile": jit_compile,
                  "mixed_precision": mixed_precision,
                  "learning_rate": data.get("train", {}).get("learning_rate", 1e-3)}})


def random_batch(manifest, batch: int, seed: int = 0) -> dict:
    """Random inputs of the manifest's modalities, as the reader yields them (images in [0, 1])."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    out = {}
    for m in manifest.modalities:
        if m.kind == "sequence":
            out[m.name] = tf.constant(rng.integers(0, m.vocab_size, size=(batch, *m.shape)), tf.int64)
        else:
            out[m.name] = tf.constant(rng.uniform(size=(batch, *m.shape)).astype(np.float32))
    out["label"] = tf.constant(rng.integers(0, 10, size=(batch,)), tf.int64)
    return out


def build_step(config, manifest, strategy=None):
    """(train_step, trainer) of trainers.training for `config` on `manifest`."""
    import tensorflow as tf
    from bmvae_tf.trainers.training import steps
    from bmvae_tf.trainers.training.trainer import Trainer
    strategy = strategy or tf.distribute.get_strategy()
    trainer = Trainer(config, manifest, strategy)
    step = steps.make_train_step(trainer, strategy, config.train.batch_size, config.train.seed,
                                 jit_compile=config.train.jit_compile)
    return step, trainer


# ------------------------------------------------------------------------------------ timing


def timed_steps(step, batch, n: int) -> float:
    """Seconds for n steps, synchronised on the last loss."""
    started = time.perf_counter()
    loss = None
    for _ in range(n):
        loss = step(batch)
    float(loss)
    return time.perf_counter() - started


def interleaved(contestants: dict, rounds: int, steps: int, examples_per_step: int) -> dict:
    """{name: [examples/s per round]}: every round times `steps` steps of each contestant in turn,
    so slow drift of a shared machine hits all of them alike. contestants: name -> (step, batch)."""
    rates = {name: [] for name in contestants}
    # One untimed round first: the first steps after other models were built run slow (the
    # allocator and oneDNN's primitive caches warm up again), whatever each model's own warm-up.
    for step, batch in contestants.values():
        timed_steps(step, batch, 1)
    for r in range(rounds):
        for name, (step, batch) in contestants.items():
            rates[name].append(examples_per_step * steps / timed_steps(step, batch, steps))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()),
              flush=True)
    return rates


def ratio_of_rounds(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[r] / b[r]: each ratio compares steps timed side by side."""
    return statistics.median(x / y for x, y in zip(a, b))
