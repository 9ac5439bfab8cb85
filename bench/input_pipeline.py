"""The tf.data reader (trainers/input_pipeline.py) against in-memory data, and training memory.

1. Records/s of the reader alone: shuffled, parsed, batched epochs of the digits train split.
2. The training step fed from TFRecords (the trainer's own dataset over epochs,
   inputs.epochs_dataset through distribute_datasets_from_function, one iterator as the loop
   takes it) against the same step fed the same batches held in memory, interleaved in rounds
   of one whole epoch each; `fresh` is the same epoch from a dataset built anew (the trainer
   before the dataset over epochs). A TFRecords round ends when the next epoch's first batch is
   ready, so what the overlap does not hide is charged to it. Target: TFRecords at >= 0.95x of
   memory. Part `uncompressed` does the same on an uncompressed copy of the shards: SPEC
   section 1 fixes GZIP shards, and this measures what gzip costs the step.
3. Peak RSS of a whole `trainers.train.train` run (one epoch) on 1x and 10x the data, each in
   a fresh subprocess (VmHWM, the peak of its own address space): the reader streams, so memory must not grow with the data
   beyond the shuffle buffer (train.shuffle_buffer records, 1000 here so that the 1x data
   already fills it; with the default 10000 and a 1x set smaller than that, the buffer itself
   grows between 1x and 10x).
4. Part `sizes`: the step (networks of the dataset's kind, built once) fed by the trainer's
   dataset over epochs from a small and a big build of the same dataset, `--steps` steps of each
   in turn per round (default one epoch of the small build); target: big >= 0.95x small.
   Every part records the load average when it started.

    python bench/input_pipeline.py                   # digits dm = 2 (1x) and dm = 20 (10x)
    python bench/input_pipeline.py --parts sizes --small-data DIR --big-data DIR --update
    python bench/input_pipeline.py --dm 10 --output bench/results/input_pipeline_big.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common
from common import machine, model_config, print_table, write_json


def build(directory: str, dm: int) -> str:
    from bmvae_tf.pipeline import build_digits
    if not os.path.exists(os.path.join(directory, "manifest.json")):
        print(f"building digits dm={dm} into {directory} ...", flush=True)
        build_digits.build_digits(directory, dm=dm, overwrite=True)
    return directory


def reader_rate(data_dir: str, batch: int, epochs: int) -> dict:
    from bmvae_tf import schema
    from bmvae_tf.trainers import input_pipeline
    manifest = schema.read_manifest(data_dir)
    rates = []
    for epoch in range(epochs):
        dataset = input_pipeline.make_dataset(manifest, "train", batch,
                                               input_pipeline.ReadOptions(shuffle=True, seed=epoch))
        started, count = time.perf_counter(), 0
        for b in dataset:
            count += int(b["label"].shape[0])
        rates.append(count / (time.perf_counter() - started))
    return {"records_per_epoch": count, "records_per_second": rates}


def _trainer_setup(data_dir: str, model: str, batch: int, kind: str = "digits"):
    """(manifest, config, validation, steps per epoch) of the trainer on `data_dir`."""
    from bmvae_tf import schema
    from bmvae_tf.trainers.training import inputs
    manifest = schema.read_manifest(data_dir)
    config = model_config(kind, model, 1, batch_size=batch)
    config.data.dir = data_dir
    validation = inputs.choose_validation(manifest, config.train)
    return manifest, config, validation, inputs.steps_per_epoch(manifest, validation, batch)


def trainer_batches(strategy, manifest, config, validation, per_epoch: int, epochs: int):
    """One iterator over the trainer's own dataset over epochs 1..epochs (inputs.epochs_dataset),
    as the training loop makes it."""
    from bmvae_tf.trainers.training import inputs
    config.train.epochs = epochs
    return iter(strategy.distribute_datasets_from_function(
        lambda ctx: inputs.epochs_dataset(ctx, manifest, config, validation, 1, 0, per_epoch, False)))


class Clock:
    """Wall and process CPU seconds of a round, and the seconds spent waiting for batches."""

    def __init__(self):
        self.wall, self.cpu, self.wait = time.perf_counter(), time.process_time(), 0.0

    def next(self, batches):
        started = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - started
        return batch

    def stop(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": time.process_time() - self.cpu,
                "wait_seconds": self.wait}


def timed_epoch(step, first, batches, steps: int) -> tuple[dict, object]:
    """(Clock.stop(), the next batch): `steps` steps from `first` and then `batches`, and the wait
    for the batch after them (the next epoch's first one: what is not ready by the epoch's end is
    charged to this epoch, as the loop would wait for it)."""
    clock = Clock()
    loss = step(first)
    for _ in range(steps - 1):
        loss = step(clock.next(batches))
    pending = clock.next(batches)
    float(loss)
    return clock.stop(), pending


def _record(rounds: dict, name: str, timing: dict, examples: int) -> None:
    rounds.setdefault(name, []).append(examples / timing["seconds"])
    for key in ("cpu_seconds", "wait_seconds"):
        rounds.setdefault(f"{name}_{key}", []).append(timing[key])


def fed_from_records_vs_memory(data_dir: str, model: str, batch: int, rounds: int,
                               fresh: bool = True) -> dict:
    """Examples/s of the step per round (and each round's process CPU seconds and seconds spent
    waiting for a batch), one whole epoch per contestant and round:
    `tfrecords`: the trainer's own dataset over epochs (one iterator, epoch r in round r);
    `fresh`: a dataset built anew per epoch (the trainer before the dataset over epochs);
    `memory`: the same number of steps on batches already in memory."""
    import tensorflow as tf
    from bmvae_tf.trainers.training import inputs
    manifest, config, validation, per_epoch = _trainer_setup(data_dir, model, batch)
    strategy = tf.distribute.get_strategy()
    step, _ = common.build_step(config, manifest, strategy)

    def fresh_epoch(epoch):
        return iter(strategy.distribute_datasets_from_function(
            lambda ctx: inputs.epoch_dataset(ctx, manifest, config, validation, epoch, 0, per_epoch, False)))

    memory = list(fresh_epoch(0))
    for b in memory[:3]:
        float(step(b))
    batches = trainer_batches(strategy, manifest, config, validation, per_epoch, rounds + 1)
    pending = next(batches)  # the run's one unoverlapped start: the first epoch's first batch
    rates, examples = {}, per_epoch * batch
    for r in range(rounds):
        timing, pending = timed_epoch(step, pending, batches, per_epoch)
        _record(rates, "tfrecords", timing, examples)
        if fresh:
            # The dataset's start (its shards opened, its shuffle buffer filled) inside the round.
            clock = Clock()
            epoch = fresh_epoch(r + 1)
            timing, _ = timed_epoch(step, clock.next(epoch), itertools.chain(epoch, [None]), per_epoch)
            _record(rates, "fresh", {**clock.stop(), "wait_seconds": clock.wait + timing["wait_seconds"]},
                    examples)
        clock = Clock()
        for b in memory:
            loss = step(b)
        float(loss)
        _record(rates, "memory", clock.stop(), examples)
        print(f"  round {r + 1}/{rounds} ({per_epoch} steps): "
              + ", ".join(f"{name} {rates[name][-1]:.0f} ({rates[name + '_cpu_seconds'][-1]:.1f} cpu s, "
                          f"{rates[name + '_wait_seconds'][-1]:.2f} s waiting)"
                          for name in ("tfrecords", "fresh", "memory") if name in rates)
              + " examples/s", flush=True)
    assert step.experimental_get_tracing_count() == 1
    return rates


def small_vs_big(small_dir: str, big_dir: str, model: str, batch: int, rounds: int, steps: int) -> dict:
    """Examples/s of one step (the networks of the datasets' kind, built once) fed by the
    trainer's own dataset over epochs from two builds of the same dataset kind, `steps` steps
    of each in turn per round (default: one epoch of the small build)."""
    import tensorflow as tf
    from bmvae_tf import schema
    small_m, big_m = schema.read_manifest(small_dir), schema.read_manifest(big_dir)
    layout = lambda m: [(x.name, tuple(x.shape), x.dtype) for x in m.modalities]
    if small_m.name != big_m.name or layout(small_m) != layout(big_m):
        raise SystemExit(f"--small-data {small_dir} ({small_m.name}) and --big-data {big_dir} "
                         f"({big_m.name}): not the same dataset kind and modalities")
    if small_m.name not in common.PAPER_CONFIG:
        raise SystemExit(f"{small_dir}: dataset {small_m.name!r} has no paper config "
                         f"({', '.join(common.PAPER_CONFIG)})")
    strategy = tf.distribute.get_strategy()
    setups = {name: _trainer_setup(d, model, batch, small_m.name)
              for name, d in (("small", small_dir), ("big", big_dir))}
    step, _ = common.build_step(setups["small"][1], small_m, strategy)
    steps = steps or setups["small"][3]
    feeds, records = {}, {}
    for name, (manifest, config, validation, per_epoch) in setups.items():
        epochs = -(-(rounds + 1) * steps // per_epoch) + 1
        batches = trainer_batches(strategy, manifest, config, validation, per_epoch, epochs)
        first = next(batches)
        for _ in range(3):
            float(step(first))
            first = next(batches)
        feeds[name] = [first, batches]
        records[name] = manifest.split("train").count
    rates = {}
    for r in range(rounds):
        for name, feed in feeds.items():
            timing, feed[0] = timed_epoch(step, feed[0], feed[1], steps)
            _record(rates, name, timing, steps * batch)
        print(f"  round {r + 1}/{rounds} ({steps} steps): "
              + ", ".join(f"{name} {rates[name][-1]:.0f}" for name in feeds) + " examples/s", flush=True)
    assert step.experimental_get_tracing_count() == 1
    return {"dataset": small_m.name, "train_records": records, "steps_per_round": steps,
            "examples_per_second": rates}


def uncompressed_copy(data_dir: str, directory: str) -> str:
    """The dataset at data_dir with its shards rewritten without compression (same names)."""
    import shutil
    import tensorflow as tf
    from bmvae_tf import schema
    os.makedirs(directory, exist_ok=True)
    shutil.copy(schema.manifest_path(data_dir), schema.manifest_path(directory))
    manifest = schema.read_manifest(data_dir)
    for split in manifest.splits:
        for path in manifest.split_paths(split):
            with tf.io.TFRecordWriter(os.path.join(directory, os.path.basename(path))) as writer:
                for record in tf.data.TFRecordDataset(path, compression_type=schema.COMPRESSION):
                    writer.write(record.numpy())
    return directory


def fed_uncompressed(data_dir: str, directory: str, model: str, batch: int, rounds: int) -> dict:
    from bmvae_tf import schema
    copy = uncompressed_copy(data_dir, directory)
    compression, schema.COMPRESSION = schema.COMPRESSION, ""  # what the reader would open
    try:
        return fed_from_records_vs_memory(copy, model, batch, rounds, fresh=False)
    finally:
        schema.COMPRESSION = compression


CHILD = r"""
import json, logging, resource, sys, time


def peak_rss_mb():
    # VmHWM belongs to this process's address space, which exec made new; ru_maxrss survives
    # exec on Linux, so it would report the forking parent's size.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


sys.path.insert(0, sys.argv[1])
from bmvae_tf.trainers import config as config_lib, train
config = config_lib.from_dict(json.loads(sys.argv[2]))
before = peak_rss_mb()  # imports: TF, Keras, Beam
started = time.perf_counter()
history = train.train(config, sys.argv[3])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "loss": history[-1]["loss"],
                              "peak_rss_mb": peak_rss_mb(), "peak_rss_before_training_mb": before}))
"""


def training_peak_rss(data_dir: str, workdir: str, model: str, batch: int, shuffle_buffer: int,
                      epochs: int = 1) -> dict:
    from bmvae_tf.trainers import config as config_lib
    config = model_config("digits", model, 1, batch_size=batch)
    config.data.dir = data_dir
    config.train.epochs = epochs
    config.train.shuffle_buffer = shuffle_buffer
    data = config_lib.to_dict(config)
    script = workdir + ".py"
    with open(script, "w") as f:
        f.write(CHILD)
    done = subprocess.run([sys.executable, script, common.ROOT, json.dumps(data), workdir],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"training on {data_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _when() -> dict:
    """When a part ran, and the machine's load then (other users skew absolute rates)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1_5_15_at_start": list(os.getloadavg())}


def run_fed(results: dict, args, large: str, tmp: str) -> None:
    if "fed" in args.parts:
        when = _when()
        print(f"{args.model} step fed from TFRecords vs memory:", flush=True)
        fed = fed_from_records_vs_memory(large, args.model, args.batch, args.rounds)
        ratio = common.ratio_of_rounds(fed["tfrecords"], fed["memory"])
        results["fed"] = {**when, "examples_per_second": fed, "tfrecords_over_memory": ratio,
                          "target": 0.95, "met": ratio >= 0.95,
                          "fresh_over_memory": common.ratio_of_rounds(fed["fresh"], fed["memory"]),
                          "tfrecords_over_fresh": common.ratio_of_rounds(fed["tfrecords"], fed["fresh"]),
                          # Process CPU seconds of an epoch fed from memory over one fed from
                          # TFRecords: the reader's share of the work, less sensitive to other load.
                          "cpu_memory_over_tfrecords": common.ratio_of_rounds(
                              fed["memory_cpu_seconds"], fed["tfrecords_cpu_seconds"]),
                          "cpu_memory_over_fresh": common.ratio_of_rounds(
                              fed["memory_cpu_seconds"], fed["fresh_cpu_seconds"]),
                          "median_wait_seconds": {name: statistics.median(fed[f"{name}_wait_seconds"])
                                                  for name in ("tfrecords", "fresh", "memory")}}
        print(f"training fed from TFRecords / from memory: {ratio:.3f} (target >= 0.95); "
              f"the dataset built anew per epoch: {results['fed']['fresh_over_memory']:.3f}", flush=True)
    if "uncompressed" in args.parts:
        when = _when()
        print(f"{args.model} step fed from uncompressed TFRecords vs memory:", flush=True)
        plain = fed_uncompressed(large, os.path.join(tmp, "uncompressed"), args.model, args.batch,
                                 args.rounds)
        plain_ratio = common.ratio_of_rounds(plain["tfrecords"], plain["memory"])
        results["fed_uncompressed"] = {**when, "examples_per_second": plain,
                                       "tfrecords_over_memory": plain_ratio}
        print(f"training fed from uncompressed TFRecords / from memory: {plain_ratio:.3f}", flush=True)


def run_sizes(results: dict, args, small: str, large: str) -> None:
    when = _when()
    small_dir, big_dir = args.small_data or small, args.big_data or large
    print(f"{args.model} step fed from {small_dir} vs {big_dir}:", flush=True)
    sizes = small_vs_big(small_dir, big_dir, args.model, args.batch, args.rounds, args.steps)
    rates = sizes["examples_per_second"]
    ratio = common.ratio_of_rounds(rates["big"], rates["small"])
    results["sizes"] = {**when, "small_data": small_dir, "big_data": big_dir, **sizes,
                        "big_over_small": ratio, "target": 0.95, "met": ratio >= 0.95,
                        "cpu_small_over_big": common.ratio_of_rounds(rates["small_cpu_seconds"],
                                                                     rates["big_cpu_seconds"])}
    print(f"training fed from the big build / the small build: {ratio:.3f} (target >= 0.95)", flush=True)


def run_memory(results: dict, args, small: str, large: str, tmp: str) -> None:
    from bmvae_tf import schema
    memory_rows = []
    for scale, data_dir in (("1x", small), ("10x", large)):
        print(f"training one epoch on {scale} data in a subprocess ...", flush=True)
        run = training_peak_rss(data_dir, os.path.join(tmp, f"run-{scale}"), args.model, args.batch,
                                args.shuffle_buffer)
        records = schema.read_manifest(data_dir).split("train").count
        memory_rows.append({"data": scale, "train records": records, "seconds": run["seconds"],
                            "peak rss MB": run["peak_rss_mb"],
                            "peak rss before training MB": run["peak_rss_before_training_mb"]})
    if args.memory_epochs > 1:
        # The loop reads one dataset over all epochs (inputs.epochs_dataset): its iterator lives
        # for the whole run, so what it holds must not grow with the epochs either.
        print(f"training {args.memory_epochs} epochs on 1x data in a subprocess ...", flush=True)
        run = training_peak_rss(small, os.path.join(tmp, "run-1x-epochs"), args.model, args.batch,
                                args.shuffle_buffer, epochs=args.memory_epochs)
        memory_rows.append({"data": f"1x, {args.memory_epochs} epochs", "train records": memory_rows[0]["train records"],
                            "seconds": run["seconds"], "peak rss MB": run["peak_rss_mb"],
                            "peak rss before training MB": run["peak_rss_before_training_mb"]})
        results["peak_rss_epochs_over_one"] = memory_rows[-1]["peak rss MB"] / memory_rows[0]["peak rss MB"]
    results["training_memory"] = memory_rows
    results["peak_rss_10x_over_1x"] = memory_rows[1]["peak rss MB"] / memory_rows[0]["peak rss MB"]
    print_table(memory_rows, ["data", "train records", "seconds", "peak rss before training MB",
                              "peak rss MB"])
    print(f"peak RSS 10x / 1x: {results['peak_rss_10x_over_1x']:.3f}")
    if args.memory_epochs > 1:
        print(f"peak RSS {args.memory_epochs} epochs / 1 epoch: {results['peak_rss_epochs_over_one']:.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/input_pipeline.json")
    parser.add_argument("--data-root", default="", help="where the digits builds are kept (default: a temp dir)")
    parser.add_argument("--dm", type=int, default=2, help="dm of the 1x dataset; the 10x one uses 10 dm")
    parser.add_argument("--model", default="bmvae_m")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reader-epochs", type=int, default=3)
    parser.add_argument("--memory-epochs", type=int, default=1,
                        help="part memory: also train this many epochs on the 1x data (peak RSS against one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0,
                        help="part sizes: steps per round (default: one epoch of the small build)")
    parser.add_argument("--parts", default="reader,fed,uncompressed,memory",
                        help="any of reader, fed, uncompressed, memory, sizes")
    parser.add_argument("--small-data", default="", help="part sizes: a build (default: digits dm)")
    parser.add_argument("--big-data", default="",
                        help="part sizes: a larger build of the same dataset (default: digits 10 dm)")
    parser.add_argument("--update", action="store_true",
                        help="keep the parts of --output that this run does not take")
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="train.shuffle_buffer of the memory runs: the one thing held in memory that "
                             "grows with the data, up to this many records; keep it below the 1x size")
    args = parser.parse_args(argv)
    args.parts = args.parts.split(",")

    results = {}
    if args.update and os.path.exists(args.output):
        with open(args.output) as f:
            results = json.load(f)
    results.update({"machine": machine(), "args": vars(args)})
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        root = args.data_root or tmp
        needs_digits = not (args.parts == ["sizes"] and args.small_data and args.big_data)
        small = build(os.path.join(root, f"digits-dm{args.dm}"), args.dm) if needs_digits else ""
        large = build(os.path.join(root, f"digits-dm{10 * args.dm}"), 10 * args.dm) if needs_digits else ""
        if "reader" in args.parts:
            when = _when()
            reader = reader_rate(large, args.batch, args.reader_epochs)
            results["reader"] = {**when, **reader}
            print(f"reader: {statistics.median(reader['records_per_second']):.0f} records/s "
                  f"({reader['records_per_epoch']} records per epoch)", flush=True)
        run_fed(results, args, large, tmp)
        if "sizes" in args.parts:
            run_sizes(results, args, small, large)
        if "memory" in args.parts:
            run_memory(results, args, small, large, tmp)
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
