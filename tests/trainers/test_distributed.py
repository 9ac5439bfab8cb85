"""tf.distribute on the CPU: MirroredStrategy over 2 logical CPUs against one device, and
MultiWorkerMirroredStrategy as two local processes on loopback ports.

Each strategy runs in a subprocess: logical devices must be configured before TensorFlow starts,
and this pytest process has started it long ago.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import synthetic
from bmvae_tf.trainers import cli
from bmvae_tf.trainers.training import strategy as strategy_lib

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"latent_dim": 4, "hidden_units": [16], "channels": [8, 8, 8], "sequence_width": 8, "K": 2}
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}

# One SGD step (its update is the gradient itself, unlike Adam's first step, which is about
# lr * sign(g) and would hide gradient differences) on the same global batch of 8, on one
# device and on two mirrored logical CPUs, 4 examples each, both fed by the trainer's input path.
_MIRRORED_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from bmvae_tf import schema
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers.training import inputs, steps
from bmvae_tf.trainers.training.trainer import Trainer

data_dir, names, model, out = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), sys.argv[4]
manifest = schema.read_manifest(data_dir)
results = {}
# One MirroredStrategy for the process: separate instances would reuse collective keys.
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for name in names:
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": {**model, "name": name},
                                   "train": {"batch_size": 8}})
    runs, feeds = {}, {}
    for kind, seed in (("default", 3), ("mirrored", 3), ("other_seed", 4)):
        strategy = mirrored if kind == "mirrored" else tf.distribute.get_strategy()
        state = Trainer(config, manifest, strategy)
        with strategy.scope():
            state.optimizer = keras.optimizers.SGD(0.1)
            state.optimizer.build(state.model.trainable_variables)
        initial = [v.numpy() for v in state.model.trainable_variables]
        step = steps.make_train_step(state, strategy, 8, seed)
        # The trainer's own input path: epoch 1's first global batch of 8, as 4 + 4 on two
        # replicas (replica r must hold rows [4 r, 4 r + 4) for the keyed noise to match).
        per_epoch = inputs.steps_per_epoch(manifest, None, 8)
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx: inputs.epoch_dataset(ctx, manifest, config, None, 1, 0, per_epoch, False))
        feed = next(iter(dataset))
        if kind == "mirrored":
            assert strategy.num_replicas_in_sync == 2
            parts = strategy.experimental_local_results(feed)
            feeds[kind] = {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}
        else:
            feeds[kind] = {k: v.numpy() for k, v in feed.items()}
        loss = float(step(feed))
        updated = [v.numpy() for v in state.model.trainable_variables]
        runs[kind] = (loss, initial, updated)
    (l1, i1, u1), (l2, i2, u2), (l3, _, u3) = runs["default"], runs["mirrored"], runs["other_seed"]
    delta = lambda u, i: np.concatenate([(a - b).ravel() for a, b in zip(u, i)])
    d1, d2, d3 = delta(u1, i1), delta(u2, i2), delta(u3, i1)
    results[name] = {
        "initial_equal": all(np.array_equal(a, b) for a, b in zip(i1, i2)),
        "same_global_batch": all(np.array_equal(feeds["default"][k], feeds["mirrored"][k])
                                 for k in feeds["default"]),
        "loss": [l1, l2],
        # Per tensor, relative to its largest entry (elementwise ratios blow up near zero).
        "max_weight_rel": max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))
                              for a, b in zip(u1, u2)),
        "max_delta_rel": float(np.max(np.abs(d1 - d2)) / np.max(np.abs(d1))),
        "other_seed_delta_rel": float(np.max(np.abs(d1 - d3)) / np.max(np.abs(d1))),
    }
json.dump(results, open(out, "w"))
"""

_WORKER_SCRIPT = """
import json, os, sys
import numpy as np
from bmvae_tf.trainers import config as config_lib, train
from bmvae_tf.trainers.training import inputs
data_dir, workdir, model, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
config = config_lib.from_dict({
    "data": {"dir": data_dir}, "model": model,
    "train": {"epochs": 2, "batch_size": 16, "strategy": "multi_worker", "checkpoint_every_steps": 3,
              "log_every_steps": 2}})
from bmvae_tf import schema
from bmvae_tf.trainers.training import strategy as strategy_lib
strategy = strategy_lib.make_strategy("multi_worker")
history, trainer = train.run_training(config, workdir, strategy=strategy)
np.savez(out, *[v.numpy() for v in trainer.model.weights])
# The records this worker's input pipeline feeds in epoch 1 (noise_seed holds the record index).
manifest = schema.read_manifest(data_dir)
steps = inputs.steps_per_epoch(manifest, None, 16)
epoch = strategy.distribute_datasets_from_function(
    lambda ctx: inputs.epoch_dataset(ctx, manifest, config, None, 1, 0, steps, False))
records = [int(r) for batch in epoch for part in strategy.experimental_local_results(batch)
           for r in part["noise_seed"].numpy().ravel()]
json.dump({"history": history, "records": records}, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("distributed"))
    synthetic.write_dataset(directory, num_train=96, num_test=32, shards=4)
    return directory


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_mirrored_step_on_two_cpus_equals_the_one_device_step(dataset, tmp_path):
    names = ["bmvae_m", "bmvae_p", "mmvae", "mvae_ms"]
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, dataset, ",".join(names),
                             json.dumps(MODEL), str(out)],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in names:
        r = results[name]
        assert r["initial_equal"], name
        assert r["same_global_batch"], name
        np.testing.assert_allclose(r["loss"][1], r["loss"][0], rtol=1e-5, err_msg=name)
        assert r["max_weight_rel"] < 1e-4, (name, r)
        assert r["max_delta_rel"] < 1e-3, (name, r)
        # The draws matter: another seed moves the weights differently.
        assert r["other_seed_delta_rel"] > 1e-2, (name, r)


@pytest.mark.slow
def test_multi_worker_training_of_two_local_processes_ends_with_identical_weights(dataset, tmp_path):
    ports = _free_ports(2)
    workers = [f"localhost:{p}" for p in ports]
    workdir = str(tmp_path / "run")
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT, dataset, workdir, json.dumps(MODEL),
             str(tmp_path / f"worker{index}.npz")],
            env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    weights = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    assert len(weights[0].files) == len(weights[1].files) > 0
    for key in weights[0].files:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)
    reports = [json.loads((tmp_path / f"worker{i}.npz.json").read_text()) for i in range(2)]
    histories = [r["history"] for r in reports]
    # Each worker feeds its own shard of the data (InputContext), 6 steps x 8 examples, and the
    # two shards are disjoint.
    records = [r["records"] for r in reports]
    assert len(records[0]) == len(records[1]) == 48
    assert not set(records[0]) & set(records[1])
    assert [h["step"] for h in histories[0]] == [6, 12]     # 96 examples / global batch 16
    assert histories[0] == [{**h, "seconds": histories[0][i]["seconds"]} for i, h in enumerate(histories[1])]
    # Only the chief writes the run directory; the other worker's scratch checkpoints are gone.
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.yaml", "history.jsonl", "logs",
                                           "progress.jsonl"]
    assert len(Path(workdir, "history.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_cli_trains_mirrored_on_simulated_devices(dataset, tmp_path):
    """With XLA, as train.jit_compile: null gives long runs: each replica's loss and gradients
    compile, the all-reduce of apply_gradients stays outside (the plain mirrored step is the
    equivalence test's)."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "bmvae_tf.trainers.cli", "train", "--data", dataset, "--workdir", str(workdir),
         "--strategy", "mirrored", "--simulate-devices", "2", "--epochs", "1",
         *[a for k, v in MODEL.items() for a in ("--set", f"model.{k}={json.dumps(v)}")],
         "--set", "train.batch_size=16", "--set", "train.jit_compile=true"],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [6] and np.isfinite(history[0]["loss"])
    assert "strategy: mirrored" in (workdir / "config.yaml").read_text()


def test_mirrored_without_devices_to_mirror_is_a_clear_error(capsys, dataset, tmp_path):
    # This process has one CPU device and no GPU.
    assert cli.main(["train", "--data", dataset, "--workdir", str(tmp_path / "run"),
                     "--strategy", "mirrored", "--epochs", "1"]) == 2
    assert "--simulate-devices" in capsys.readouterr().err


@pytest.mark.parametrize("raw, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "not valid JSON"),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "non-empty 'worker' list"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "'task' with 'type' and 'index'"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}', "not in the cluster"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": "0"}}',
     "'index' must be an integer, got '0'"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "chief", "index": 0}}', "not in the cluster"),
])
def test_malformed_tf_config_is_a_clear_error(raw, message):
    with pytest.raises(strategy_lib.UserError, match=message):
        strategy_lib.check_tf_config(raw)


def test_train_with_a_malformed_tf_config_exits_2_naming_it(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker"}}')
    assert cli.main(["train", "--data", dataset, "--workdir", str(tmp_path / "run"),
                     "--strategy", "multi_worker", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "TF_CONFIG: needs a 'task' with 'type' and 'index'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_replicas_is_a_clear_error(dataset, tmp_path, capsys):
    script = ("import sys\n"
              "from trainers import cli\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    result = subprocess.run(
        [sys.executable, "-c", script, "train", "--data", dataset, "--workdir", str(tmp_path / "run"),
         "--strategy", "mirrored", "--simulate-devices", "2", "--set", "train.batch_size=15"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.batch_size=15 is not divisible by the 2 replicas" in result.stderr
    assert "Traceback" not in result.stderr
