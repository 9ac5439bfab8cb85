"""bench/gpu_scaling.py runs the distributed training step on 2 logical CPU devices (the check
that lets the GPU script be trusted without a GPU) and reports an efficiency in range."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_efficiencies_are_relative_to_one_device_in_the_same_round():
    import gpu_scaling
    rates = {(1, "off"): [100.0, 50.0], (2, "off"): [150.0, 100.0],
             (1, "on"): [200.0, 200.0], (2, "on"): [200.0, 400.0]}
    rows = {(r["devices"], r["xla"]): r for r in gpu_scaling.efficiencies(rates, [1, 2], ["off", "on"])}
    assert rows[(1, "off")]["efficiency"] == 1.0
    assert rows[(2, "off")]["efficiency_range"] == [0.75, 1.0]
    assert rows[(2, "off")]["efficiency"] == pytest.approx(0.875)
    assert rows[(2, "on")]["xla_over_plain"] == pytest.approx((200 / 150 + 400 / 100) / 2)


def test_device_counts_always_include_one():
    import gpu_scaling
    args = gpu_scaling.parse_args(["--counts", "2,4"])
    assert gpu_scaling.device_counts(args, 4) == [1, 2, 4]
    with pytest.raises(SystemExit):
        gpu_scaling.device_counts(args, 2)


@pytest.mark.slow
def test_runs_on_two_logical_cpu_devices(tmp_path):
    out = tmp_path / "scaling.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_scaling.py"), "--cpu-devices", "2",
         "--dataset", "digits", "--model", "bmvae_m", "--K", "1", "--per-replica-batch", "4",
         "--xla", "off", "--warmup", "1", "--steps", "2", "--rounds", "3", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [d.split(":")[-2:] for d in result["devices"]] == [["CPU", "0"], ["CPU", "1"]]
    rows = {r["devices"]: r for r in result["rows"]}
    assert set(rows) == {1, 2} and rows[1]["efficiency"] == 1.0
    assert 0.0 < rows[2]["efficiency"] <= 2.0          # weak scaling: 2 x the examples per step
    assert rows[1]["cpu_clock_efficiency"] == 1.0 and 0.0 < rows[2]["cpu_clock_efficiency"] <= 4.0
    assert rows[2]["per_replica_batch"] == 4 and result["weights_bytes"] == 4 * result["trainable_weights"]
    assert "efficiency" in done.stdout
