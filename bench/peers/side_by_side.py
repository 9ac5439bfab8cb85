"""Training examples/s of our MMVAE (K = 1, 30) and MVAE against MultiVae 1.0.3's, side by side.

Both frameworks run the paper's MNIST-SVHN networks (Table 3: MNIST MLP 784-400-20, SVHN CNN
32-64-128, latent 20; bench/peers/layer_tables.py), batch 128, Laplace posteriors, prior and
likelihoods (scale 0.75; MVAE Gaussian experts, as products need), the MNIST likelihood weighted
by 3072/784, Adam at the configs' learning rate, random data of the MNIST-SVHN shapes held in
memory. MMVAE is configs/mnist_svhn/mmvae.yaml with K swapped in: DReG, learned prior, AMSGrad,
against MultiVae's "dreg_looser" (the same estimator: see bench/peers/README.md).

This process times ours (TensorFlow, pinned to --threads intra- and inter-op threads); a
long-lived worker (multivae_worker.py, run by the peers venv of setup_env.sh) times MultiVae's
(torch.set_num_threads and set_num_interop_threads to the same). Every round times each
contestant's steps on both sides, one after the other (the order alternating from round to
round), so a shared machine's drift hits both; each ratio is the median over rounds of the
per-round ratio, with its range.

    bash bench/peers/setup_env.sh                  # once: bench/peers/.venv
    python bench/peers/side_by_side.py                      # ~10 minutes on 2 busy cores
    python bench/peers/side_by_side.py --contestants mmvae_k1,mvae --rounds 3 --output /tmp/peers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
for path in (HERE, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

import ratios  # noqa: E402

CONTESTANTS = {"mmvae_k1": ("mmvae", 1), "mmvae_k30": ("mmvae", 30), "mvae": ("mvae", 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=os.path.join(HERE, ".venv"), help="the peers venv (setup_env.sh)")
    parser.add_argument("--threads", type=int, default=2, help="intra- and inter-op threads of both")
    parser.add_argument("--contestants", default=",".join(CONTESTANTS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per side per round at K = 1")
    parser.add_argument("--steps-k30", type=int, default=1, help="steps per side per round at K = 30")
    parser.add_argument("--mmvae-loss", choices=("dreg", "iwae"), default="dreg",
                        help="dreg: DReG on both sides (the config's); iwae: plain IWAE gradients on both")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "unset"), default="PASSIVE",
                        help="OMP_WAIT_POLICY of the torch worker: PASSIVE (default) stops its OpenMP threads "
                             "spin-waiting, which on a shared, oversubscribed machine made MultiVae 3-4x slower; "
                             "unset keeps the environment's")
    parser.add_argument("--output", default=os.path.join(BENCH, "results", "peers.json"))
    return parser.parse_args(argv)


class Worker:
    """The MultiVae worker process: one JSON request per line, one reply per line."""

    def __init__(self, venv: str, threads: int, omp_wait_policy: str = "PASSIVE"):
        python = os.path.join(venv, "bin", "python")
        if not os.path.exists(python):
            sys.exit(f"no peers venv at {venv}: run `bash bench/peers/setup_env.sh` first")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if omp_wait_policy != "unset":
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.process = subprocess.Popen([python, os.path.join(HERE, "multivae_worker.py"), "--threads", str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the MultiVae worker died (exit {self.process.wait()})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"MultiVae worker: {reply['error']}")
        return reply

    def close(self):
        try:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
        finally:
            self.process.wait(timeout=60)


# ------------------------------------------------------------------------------ our side


def our_config(name: str, batch: int, loss: str):
    """configs/mnist_svhn/mmvae.yaml with the contestant's model and K swapped in. MVAE: Gaussian
    experts, the fixed N(0, 1) prior and plain Adam, as MultiVae's MVAE has no other."""
    from common import CONFIGS
    from bmvae_tf.trainers import config as config_lib
    model, K = CONTESTANTS[name]
    data = config_lib.load_yaml(os.path.join(CONFIGS, "mnist_svhn", "mmvae.yaml"))
    section, train = dict(data["model"]), dict(data["train"])
    section["name"], section["K"] = model, K
    section["mmvae"] = {"dreg": loss == "dreg"}
    if model == "mvae":
        section.update(posterior="gaussian", learn_prior=False)
        section.pop("K"), section.pop("mmvae")
        train["amsgrad"] = False
    return config_lib.from_dict({
        "data": {"dir": "unused"}, "model": section,
        "train": {"batch_size": batch, "jit_compile": False, "learning_rate": train["learning_rate"],
                  "amsgrad": train.get("amsgrad", False)}})


def peer_spec(name: str, config, manifest, args) -> dict:
    """The MultiVae worker's build request matching our config."""
    model, K = CONTESTANTS[name]
    return {"cmd": "build", "name": name, "model": model, "K": K, "batch": args.batch,
            "learning_rate": config.train.learning_rate, "amsgrad": config.train.amsgrad,
            "loss": f"{args.mmvae_loss}_looser", "learn_prior": config.model.learn_prior,
            "likelihood_scale": config.model.likelihood_scale, "warmup": args.warmup,
            "rescale_factors": {m.name: m.likelihood_weight for m in manifest.modalities}}


def pin_tensorflow_threads(threads: int):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return tf


def timed(step, batch, n: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    loss = None
    for _ in range(n):
        loss = step(batch)
    loss = float(loss)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "loss": loss}


def build_ours(name: str, config, manifest, args) -> dict:
    from common import build_step, random_batch
    started = time.perf_counter()
    step, trainer = build_step(config, manifest)
    batch = random_batch(manifest, args.batch)
    first = timed(step, batch, 1)["wall"]
    timed(step, batch, args.warmup)
    parameters = sum(int(v.shape.num_elements()) for v in trainer.model.trainable_variables)
    return {"step": step, "batch": batch, "parameters": parameters, "first_step_seconds": first,
            "build_seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------ rounds


def steps_of(name: str, args) -> int:
    return args.steps_k30 if CONTESTANTS[name][1] > 1 else args.steps


def run_rounds(names, ours: dict, worker: Worker, args) -> dict:
    """{name: {"ours": [...], "multivae": [...]}} of per-round timings (wall and CPU seconds)."""
    times = {n: {"ours": [], "multivae": []} for n in names}
    # One untimed round first: the first steps after other models were built run slow (see
    # bench/common.interleaved), on both sides.
    for name in names:
        timed(ours[name]["step"], ours[name]["batch"], 1)
        worker(cmd="time", name=name, steps=1)
    for r in range(args.rounds):
        for name in names:
            n = steps_of(name, args)
            sides = [("ours", lambda: timed(ours[name]["step"], ours[name]["batch"], n)),
                     ("multivae", lambda: worker(cmd="time", name=name, steps=n))]
            for side, run in (sides if r % 2 == 0 else sides[::-1]):
                times[name][side].append({**run(), "steps": n})
            o, t = times[name]["ours"][-1], times[name]["multivae"][-1]
            print(f"  round {r + 1}/{args.rounds} {name}: ours {args.batch * n / o['wall']:.0f} ex/s, "
                  f"MultiVae {args.batch * n / t['wall']:.0f} ex/s", flush=True)
    return times


def loss_per_example(name: str, times: dict, batch: int) -> dict:
    """The median loss per example each side reported, a check that both optimise the same
    objective (random inits differ, so they agree to a fraction of a percent, not exactly).
    Ours is the batch mean; MultiVae's MMVAE returns the batch sum, its MVAE the mean."""
    per = batch if CONTESTANTS[name][0] == "mmvae" else 1
    return {"ours": statistics.median(t["loss"] for t in times["ours"]),
            "multivae": statistics.median(t["loss"] / per for t in times["multivae"])}


def summarise(names, times: dict, args) -> list[dict]:
    rows = []
    for name in names:
        rates = {clock: {side: [ratios.rate(args.batch * t["steps"], t[clock]) for t in times[name][side]]
                         for side in ("ours", "multivae")} for clock in ("wall", "cpu")}
        row = ratios.summarise(name, rates["wall"]["ours"], rates["wall"]["multivae"])
        cpu = ratios.summarise(name, rates["cpu"]["ours"], rates["cpu"]["multivae"])
        row.update(cpu_ratio=cpu["ratio"], cpu_ratio_min=cpu["ratio_min"], cpu_ratio_max=cpu["ratio_max"],
                   loss_per_example=loss_per_example(name, times[name], args.batch))
        rows.append(row)
    return rows


def print_rows(rows):
    print("\nours / MultiVae training examples/s (median of per-round ratios, range; CPU-time ratio):")
    for r in rows:
        verdict = "" if r["met"] is None else (" met" if r["met"] else " MISSED")
        print(f"  {r['contestant']:10s} {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
              f"  cpu {r['cpu_ratio']:.2f}  ours {r['ours_examples_per_second']:.0f} ex/s,"
              f" MultiVae {r['multivae_examples_per_second']:.0f} ex/s; target >= {r['target']}{verdict};"
              f" loss/example {r['loss_per_example']['ours']:.1f} vs {r['loss_per_example']['multivae']:.1f}")


def build_all(names, worker, args):
    from common import dataset_manifest
    manifest = dataset_manifest("mnist-svhn")
    ours, theirs = {}, {}
    for name in names:
        config = our_config(name, args.batch, args.mmvae_loss)
        ours[name] = build_ours(name, config, manifest, args)
        theirs[name] = worker(**peer_spec(name, config, manifest, args))
        if ours[name]["parameters"] != theirs[name]["parameters"]:
            raise SystemExit(f"{name}: {ours[name]['parameters']} trainable parameters here, "
                             f"{theirs[name]['parameters']} in MultiVae: not the same networks")
        print(f"built {name}: {ours[name]['parameters']} parameters on both sides", flush=True)
    return ours, theirs


def main(argv=None) -> dict:
    args = parse_args(argv)
    load = list(os.getloadavg())
    names = [n for n in args.contestants.split(",") if n]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        sys.exit(f"--contestants: unknown {unknown}; choose from {list(CONTESTANTS)}")
    tf = pin_tensorflow_threads(args.threads)
    from common import machine, write_json
    worker = Worker(args.venv, args.threads, args.omp_wait_policy)
    try:
        peer_info = worker(cmd="info")
        ours, theirs = build_all(names, worker, args)
        times = run_rounds(names, ours, worker, args)
    finally:
        worker.close()
    rows = summarise(names, times, args)
    print_rows(rows)
    result = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
              "load_average_at_start": load, "machine": machine(), "multivae_side": peer_info,
              "ours_side": {"tensorflow": tf.__version__,
                            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()},
              "args": vars(args), "ratios": rows, "times": times,
              "build": {n: {"ours": {k: v for k, v in ours[n].items() if k not in ("step", "batch")},
                            "multivae": theirs[n]} for n in names}}
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
