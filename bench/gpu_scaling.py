"""Scaling of the training step over 1, 2, ..., N devices under MirroredStrategy, XLA on and off.

The step is trainers.training.steps.make_train_step, the one `bmvae train` runs, on random data
of the dataset's shapes fed from memory (each replica its share of one distributed batch), so
what is timed is the step and its gradient all-reduce, not the input pipeline. Weak scaling by
default: every replica keeps --per-replica-batch examples, so the global batch is n times it
(--strong keeps the global batch at --per-replica-batch and splits it). For every device count n
and XLA setting: examples/s, and the scaling efficiency

    efficiency(n) = examples/s on n devices / (n * examples/s on 1 device),

1.0 being perfect. All (n, XLA) configurations are timed in interleaved rounds of one run.

On a GPU machine it uses the GPUs (bench/gpu_scaling.sh runs it). Here it checks itself on
logical CPU devices (--cpu-devices N splits the CPU before TensorFlow starts): those share the
same cores, so n devices cannot be faster than one, and a weak-scaling efficiency near 1/n is
what a correct run shows. There it also prints cpu_clock_efficiency, examples per CPU-second of
the process on n devices over that on one: 1.0 when distributing the step costs no extra CPU
work (replica dispatch, all-reduce), whatever else runs on the machine.

    python bench/gpu_scaling.py --cpu-devices 2 --K 1 --per-replica-batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import common  # noqa: F401  (puts the repository on the path)
from common import build_step, dataset_manifest, machine, model_config, print_table, random_batch, write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/gpu_scaling.json")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="split the CPU into N logical devices and scale over them (no GPU needed)")
    parser.add_argument("--max-devices", type=int, default=0, help="use at most this many devices (0: all)")
    parser.add_argument("--counts", default="", help="device counts to time, e.g. 1,2,4,8 (default 1..N)")
    parser.add_argument("--dataset", default="mnist-svhn", choices=sorted(common.PAPER_CONFIG))
    parser.add_argument("--model", default="bmvae_m")
    parser.add_argument("--K", type=int, default=30)
    parser.add_argument("--per-replica-batch", type=int, default=128)
    parser.add_argument("--strong", action="store_true", help="keep the global batch fixed instead")
    parser.add_argument("--xla", default="off,on", help="off, on or off,on")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cpu_devices < 0 or args.max_devices < 0 or args.per_replica_batch < 1:
        parser.error("--cpu-devices, --max-devices must be >= 0 and --per-replica-batch >= 1")
    bad = set(args.xla.split(",")) - {"off", "on"}
    if bad or not args.xla:
        parser.error(f"--xla takes off, on or off,on; got {args.xla!r}")
    return args


def devices(args) -> list[str]:
    """The devices to scale over: the GPUs, or N logical CPU devices made before TF starts."""
    import tensorflow as tf
    if args.cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices)
        found = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        found = [d.name for d in tf.config.list_logical_devices("GPU")]
        if not found:
            raise SystemExit("gpu_scaling: no GPU found; pass --cpu-devices N to check the script on "
                             "N logical CPU devices")
    return found[:args.max_devices] if args.max_devices else found


def device_counts(args, available: int) -> list[int]:
    counts = [int(c) for c in args.counts.split(",")] if args.counts else list(range(1, available + 1))
    if 1 not in counts:
        counts = [1] + counts    # efficiency is relative to one device
    if max(counts) > available:
        raise SystemExit(f"gpu_scaling: asked for {max(counts)} devices, found {available}")
    return sorted(set(counts))


def weights_bytes(trainer) -> tuple[int, int]:
    """(trainable weights, their bytes): what MirroredStrategy all-reduces every step."""
    variables = trainer.model.trainable_variables
    count = sum(int(np.prod(v.shape)) for v in variables)
    return count, sum(int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in variables)


def build_config(args, manifest, device_names, n: int, xla: bool) -> dict:
    """One (n devices, XLA) contestant: its step, its distributed batch and its global batch."""
    import tensorflow as tf
    strategy = tf.distribute.MirroredStrategy(devices=device_names[:n])
    global_batch = args.per_replica_batch if args.strong else args.per_replica_batch * n
    if global_batch % n:
        raise SystemExit(f"gpu_scaling: global batch {global_batch} does not split over {n} devices")
    config = model_config(args.dataset, args.model, args.K, jit_compile=xla, batch_size=global_batch)
    step, trainer = build_step(config, manifest, strategy)
    batch = random_batch(manifest, global_batch, seed=n)
    dataset = tf.data.Dataset.from_tensor_slices(batch).batch(global_batch, drop_remainder=True)
    dist_batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    first = float(step(dist_batch))   # tracing (and XLA compilation)
    for _ in range(args.warmup):
        float(step(dist_batch))
    assert step.experimental_get_tracing_count() == 1, (n, xla)
    return {"step": step, "batch": dist_batch, "global_batch": global_batch, "trainer": trainer,
            "first_loss": first}


def efficiencies(rates: dict, counts: list[int], xla_settings: list[str]) -> list[dict]:
    """Rows per (XLA, n): median examples/s and the median over rounds of the per-round efficiency
    (n devices against 1 device timed in the same round), with its range; XLA/plain likewise."""
    rows = []
    for xla in xla_settings:
        for n in counts:
            own, one = rates[(n, xla)], rates[(1, xla)]
            per_round = [a / (n * b) for a, b in zip(own, one)]
            row = {"xla": xla, "devices": n, "examples_per_second": statistics.median(own),
                   "speedup": statistics.median(a / b for a, b in zip(own, one)),
                   "efficiency": statistics.median(per_round),
                   "efficiency_range": [min(per_round), max(per_round)]}
            if xla == "on" and (n, "off") in rates:
                row["xla_over_plain"] = statistics.median(a / b for a, b in zip(own, rates[(n, "off")]))
            rows.append(row)
    return rows


def time_rounds(built: dict, args) -> tuple[dict, dict]:
    """(n, xla) -> [global examples/s per round], every configuration timed in turn each round;
    and the same per CPU-second of this process (what matters on logical CPU devices sharing a
    machine with others: it counts only the time our threads ran)."""
    from common import timed_steps
    rates = {key: [] for key in built}
    cpu_rates = {key: [] for key in built}
    # One untimed round first: the first steps after other configurations were built run slow
    # (the allocator and oneDNN's primitive caches warm up again), as in common.interleaved.
    for c in built.values():
        timed_steps(c["step"], c["batch"], 1)
    for r in range(args.rounds):
        for key, c in built.items():
            cpu = time.process_time()
            seconds = timed_steps(c["step"], c["batch"], args.steps)
            rates[key].append(c["global_batch"] * args.steps / seconds)
            cpu_rates[key].append(c["global_batch"] * args.steps / (time.process_time() - cpu))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} dev xla {x}: {v[-1]:.0f} ex/s" for (n, x), v in rates.items()), flush=True)
    return rates, cpu_rates


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_names = devices(args)             # first: the CPU split must precede TF's start-up
    results = {"machine": machine(), "args": vars(args), "devices": device_names}
    counts = device_counts(args, len(device_names))
    xla_settings = args.xla.split(",")
    manifest = dataset_manifest(args.dataset)
    built = {(n, xla): build_config(args, manifest, device_names, n, xla == "on")
             for n in counts for xla in xla_settings}
    params, nbytes = weights_bytes(next(iter(built.values()))["trainer"])
    print(f"{args.model} on {args.dataset}, K={args.K}: {params:,} trainable weights, {nbytes / 2**20:.2f} MiB "
          f"all-reduced per step; devices {device_names[:max(counts)]}", flush=True)
    rates, cpu_rates = time_rounds(built, args)
    rows = efficiencies(rates, counts, xla_settings)
    if args.cpu_devices:   # the devices share the cores: only the CPU work per example compares
        for row, cpu_row in zip(rows, efficiencies(cpu_rates, counts, xla_settings)):
            row["cpu_clock_efficiency"] = cpu_row["efficiency"] * row["devices"]
    for row in rows:   # ring all-reduce: each device sends and receives 2 (n - 1) / n of the bytes
        row["allreduce_bytes_per_device"] = int(2 * (row["devices"] - 1) / row["devices"] * nbytes)
        row["per_replica_batch"] = built[(row["devices"], row["xla"])]["global_batch"] // row["devices"]
    print()
    print_table(rows, ["xla", "devices", "per_replica_batch", "examples_per_second", "speedup", "efficiency",
                       "xla_over_plain", "allreduce_bytes_per_device", "cpu_clock_efficiency"])
    results.update(trainable_weights=params, weights_bytes=nbytes, rows=rows,
                   examples_per_second={f"{n} devices, xla {x}": v for (n, x), v in rates.items()},
                   examples_per_cpu_second={f"{n} devices, xla {x}": v for (n, x), v in cpu_rates.items()},
                   load_average_at_end=list(os.getloadavg()))
    if args.output:
        write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
