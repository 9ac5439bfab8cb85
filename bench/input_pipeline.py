"""The tf.data reader (trainers/input_pipeline.py) against in-memory data, and training memory.

1. Records/s of the reader alone: shuffled, parsed, batched epochs of the digits train split.
2. The training step fed from TFRecords (the trainer's own epoch dataset through
   distribute_datasets_from_function) against the same step fed the same batches held in
   memory, interleaved in rounds of one whole epoch each (the dataset built anew per epoch, as
   the trainer builds it); target: TFRecords at >= 0.95x of memory.
   Part `uncompressed` does the same on an uncompressed copy of the shards: SPEC section 1 fixes
   GZIP shards, and this measures what gzip costs the step.
3. Peak RSS of a whole `trainers.train.train` run (one epoch) on 1x and 10x the data, each in
   a fresh subprocess (VmHWM, the peak of its own address space): the reader streams, so memory must not grow with the data
   beyond the shuffle buffer (train.shuffle_buffer records, 1000 here so that the 1x data
   already fills it; with the default 10000 and a 1x set smaller than that, the buffer itself
   grows between 1x and 10x).

    python bench/input_pipeline.py                   # digits dm = 2 (1x) and dm = 20 (10x)
    python bench/input_pipeline.py --dm 10 --output bench/results/input_pipeline_big.json
"""

from __future__ import annotations

import argparse
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


def fed_from_records_vs_memory(data_dir: str, model: str, batch: int, rounds: int, steps: int) -> dict:
    import tensorflow as tf
    from bmvae_tf import schema
    from bmvae_tf.trainers.training import inputs
    manifest = schema.read_manifest(data_dir)
    config = model_config("digits", model, 1, batch_size=batch)
    config.data.dir = data_dir
    strategy = tf.distribute.get_strategy()
    step, _ = common.build_step(config, manifest, strategy)
    validation = inputs.choose_validation(manifest, config.train)
    per_epoch = inputs.steps_per_epoch(manifest, validation, batch)

    def records(epoch):
        return iter(strategy.distribute_datasets_from_function(
            lambda ctx: inputs.epoch_dataset(ctx, manifest, config, validation, epoch, 0, per_epoch, False)))

    # A round is one whole epoch from TFRecords, its dataset built and its shuffle buffer filled as
    # the trainer does at every epoch, against as many steps on batches already in memory. Rounds
    # shorter than an epoch would charge the start-up of a pipeline to a few steps, or leave it out.
    steps = steps or per_epoch
    memory = [b for _, b in zip(range(steps), records(0))]
    for b in memory[:3]:
        float(step(b))
    rates = {"tfrecords": [], "memory": []}
    for r in range(rounds):
        started = time.perf_counter()
        loss, count = None, 0
        for b in records(r + 1):
            if count == steps:
                break
            loss = step(b)
            count += 1
        float(loss)
        rates["tfrecords"].append(count * batch / (time.perf_counter() - started))
        started = time.perf_counter()
        for b in memory:
            loss = step(b)
        float(loss)
        rates["memory"].append(len(memory) * batch / (time.perf_counter() - started))
        print(f"  round {r + 1}/{rounds} ({count} steps): tfrecords {rates['tfrecords'][-1]:.0f}, "
              f"memory {rates['memory'][-1]:.0f} examples/s", flush=True)
    assert step.experimental_get_tracing_count() == 1
    return rates


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


def fed_uncompressed(data_dir: str, directory: str, model: str, batch: int, rounds: int, steps: int) -> dict:
    from bmvae_tf import schema
    copy = uncompressed_copy(data_dir, directory)
    compression, schema.COMPRESSION = schema.COMPRESSION, ""  # what the reader would open
    try:
        return fed_from_records_vs_memory(copy, model, batch, rounds, steps)
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


def training_peak_rss(data_dir: str, workdir: str, model: str, batch: int, shuffle_buffer: int) -> dict:
    from bmvae_tf.trainers import config as config_lib
    config = model_config("digits", model, 1, batch_size=batch)
    config.data.dir = data_dir
    config.train.epochs = 1
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/input_pipeline.json")
    parser.add_argument("--data-root", default="", help="where the digits builds are kept (default: a temp dir)")
    parser.add_argument("--dm", type=int, default=2, help="dm of the 1x dataset; the 10x one uses 10 dm")
    parser.add_argument("--model", default="bmvae_m")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reader-epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default: one epoch of the 10x data)")
    parser.add_argument("--parts", default="reader,fed,uncompressed,memory")
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="train.shuffle_buffer of the memory runs: the one thing held in memory that "
                             "grows with the data, up to this many records; keep it below the 1x size")
    args = parser.parse_args(argv)

    results = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        root = args.data_root or tmp
        small = build(os.path.join(root, f"digits-dm{args.dm}"), args.dm)
        large = build(os.path.join(root, f"digits-dm{10 * args.dm}"), 10 * args.dm)

        parts = args.parts.split(",")
        if "reader" in parts:
            reader = reader_rate(large, args.batch, args.reader_epochs)
            results["reader"] = reader
            print(f"reader: {statistics.median(reader['records_per_second']):.0f} records/s "
                  f"({reader['records_per_epoch']} records per epoch)", flush=True)
        if "fed" in parts:
            print(f"{args.model} step fed from TFRecords vs memory:", flush=True)
            fed = fed_from_records_vs_memory(large, args.model, args.batch, args.rounds, args.steps)
            ratio = statistics.median(a / b for a, b in zip(fed["tfrecords"], fed["memory"]))
            results["fed"] = {"examples_per_second": fed, "tfrecords_over_memory": ratio, "target": 0.95,
                              "met": ratio >= 0.95}
        if "uncompressed" in parts:
            print(f"{args.model} step fed from uncompressed TFRecords vs memory:", flush=True)
            plain = fed_uncompressed(large, os.path.join(tmp, "uncompressed"), args.model, args.batch,
                                     args.rounds, args.steps)
            plain_ratio = statistics.median(a / b for a, b in zip(plain["tfrecords"], plain["memory"]))
            results["fed_uncompressed"] = {"examples_per_second": plain, "tfrecords_over_memory": plain_ratio}
        if "memory" in parts:
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
            results["training_memory"] = memory_rows
            results["peak_rss_10x_over_1x"] = memory_rows[1]["peak rss MB"] / memory_rows[0]["peak rss MB"]

    print()
    if "reader" in results:
        print(f"reader: {statistics.median(reader['records_per_second']):.0f} records/s")
    if "fed" in results:
        print(f"training fed from TFRecords / from memory: {ratio:.3f} (target >= 0.95)")
        print_table([{"feed": k, "ex/s": statistics.median(v)} for k, v in fed.items()], ["feed", "ex/s"])
    if "fed_uncompressed" in results:
        print(f"training fed from uncompressed TFRecords / from memory: {plain_ratio:.3f}")
    if "training_memory" in results:
        print()
        print_table(memory_rows, ["data", "train records", "seconds", "peak rss before training MB",
                                  "peak rss MB"])
        print(f"peak RSS 10x / 1x: {results['peak_rss_10x_over_1x']:.3f}")
    write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
