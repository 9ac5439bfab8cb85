"""Several seeds: `bmvae train --seeds`, the seed-N layout the other commands follow, and `bmvae
compare`'s statistics over seeds, checked against hand computations on hand-made metrics.json
files (no training) and, once, end to end on a tiny synthetic dataset."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cli, run_dir
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import compare, statistics
from bmvae_tf.trainers.training import seeds
from tests import synthetic


def _t_test_p_df2(diffs: list[float]) -> float:
    """The two-sided p of a paired t-test on three differences by hand: with 2 degrees of
    freedom Student's t has the closed-form CDF 1/2 + t / (2 sqrt(t^2 + 2))."""
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = abs(mean / (sd / math.sqrt(3)))
    return 1 - t / math.sqrt(t * t + 2)


# ----------------------------------------------------------------------------- seeds and layout


def test_parse_seeds_takes_lists_and_ranges_and_refuses_the_rest():
    assert seeds.parse_seeds("0,1,2") == [0, 1, 2]
    assert seeds.parse_seeds("0-2, 7") == [0, 1, 2, 7]
    for text, problem in (("a", "'a' is not a seed"), ("1,1", "seed 1 is given twice"),
                          ("0-2,2", "seed 2 is given twice"), ("3-1", "range '3-1' is empty"),
                          ("-1", "'-1' is not a seed"), ("", "'' is not a seed")):
        with pytest.raises(UserError, match=problem):
            seeds.parse_seeds(text)


def test_a_seed_root_stands_for_its_seed_runs(tmp_path):
    root = tmp_path / "w"
    for name in ("seed-10", "seed-2", "seed-x", "notes"):
        os.makedirs(root / name)
    (root / "seed-3").write_text("a file, not a run")
    assert seeds.seed_runs(str(root)) == {2: str(root / "seed-2"), 10: str(root / "seed-10")}
    assert seeds.is_seed_root(str(root)) and seeds.expand(str(root)) == [str(root / "seed-2"), str(root / "seed-10")]
    single = tmp_path / "single"
    os.makedirs(single / "seed-0")
    (single / "config.yaml").write_text("train:\n  seed: 5\n")
    assert not seeds.is_seed_root(str(single)) and seeds.expand(str(single)) == [str(single)]
    assert seeds.expand(str(tmp_path / "missing")) == [str(tmp_path / "missing")]
    # The seed a run trained with: its config's train.seed, else its directory's name.
    assert seeds.run_seed(str(single)) == 5
    assert seeds.run_seed(str(root / "seed-10")) == 10 and seeds.run_seed(str(tmp_path)) is None
    # Read without the config's checks: a key of another version does not hide the seed, and a
    # config without train.seed trained with the default, 0.
    (single / "config.yaml").write_text("train:\n  seed: 6\n  a_future_key: 1\n")
    assert seeds.run_seed(str(single)) == 6
    (single / "config.yaml").write_text("model:\n  name: mvae\n")
    assert seeds.run_seed(str(single)) == 0


def test_one_run_commands_given_a_seed_root_say_what_to_pass(tmp_path, capsys):
    root = tmp_path / "w"
    os.makedirs(root / "seed-0")
    os.makedirs(root / "seed-1")
    assert cli.main(["export", "--workdir", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds the runs of seeds 0,1" in err and f"--workdir {root / 'seed-0'}" in err
    assert cli.main(["train", "--data", str(tmp_path), "--workdir", str(root)]) == 2
    assert "or --seeds 0,1 to train every one" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train:\n  seed: 0\n")
    assert cli.main(["train", "--data", str(tmp_path), "--workdir", str(tmp_path / "run"), "--seeds", "0"]) == 2
    assert "is a single run" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path), "--workdir", str(root), "--seeds", "0",
                     "--set", "train.seed=3"]) == 2
    assert "--seeds sets each run's train.seed" in capsys.readouterr().err


def test_evaluate_and_analyze_run_once_per_seed(tmp_path):
    root = tmp_path / "w"
    for name in ("seed-0", "seed-1"):
        os.makedirs(root / name)
    seen = []
    each = cli._each_seed(lambda args, beam_args: seen.append(args.workdir) or 0)
    assert each(argparse.Namespace(workdir=str(root), data=None), []) == 0
    assert seen == [str(root / "seed-0"), str(root / "seed-1")]
    seen.clear()
    assert each(argparse.Namespace(workdir=str(tmp_path / "run")), []) == 0
    assert seen == [str(tmp_path / "run")]
    # Both commands are wired through it.
    parser = cli.build_parser()
    for command in (["evaluate", "--workdir", "w"], ["analyze", "--workdir", "w"]):
        assert parser.parse_args(command).func.__qualname__ == "_each_seed.<locals>.each"


# ------------------------------------------------------------------------------- the statistics


def test_summary_is_the_mean_and_sample_sd_of_the_known_values():
    summary = statistics.summarise([0.8, None, 0.9, 1.0, float("nan")])
    assert summary.n == 3 and summary.mean == pytest.approx(0.9) and summary.sd == pytest.approx(0.1)
    assert statistics.summarise([0.5]) == statistics.Summary(1, 0.5, None)
    assert statistics.summarise([None]) == statistics.Summary(0, None, None)


def test_paired_test_matches_a_hand_computation_on_seed_matched_pairs():
    # Seed 3 is only in A and seed 4 has no value in B: the pairs are seeds 0, 1, 2.
    a = {0: 0.90, 1: 0.80, 2: 0.70, 3: 0.99, 4: 0.5}
    b = {0: 0.85, 1: 0.70, 2: 0.68, 4: None}
    test = statistics.paired_test(a, b)
    assert test.seeds == (0, 1, 2)
    # Differences 0.05, 0.10, 0.02: mean 0.056667, sd sqrt(0.0032667 / 2) = 0.040415.
    assert test.mean == pytest.approx(0.056667, abs=1e-6) and test.sd == pytest.approx(0.040415, abs=1e-6)
    assert test.p == pytest.approx(_t_test_p_df2([0.05, 0.10, 0.02])) and test.p == pytest.approx(0.1358, abs=1e-4)
    assert not test.significant()
    steady = statistics.paired_test({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert steady.p == pytest.approx(_t_test_p_df2([0.10, 0.11, 0.12])) and steady.p < 0.01
    assert steady.significant() and not steady.significant(alpha=steady.p)
    # No test without two pairs or with all differences equal.
    assert statistics.paired_test({0: 0.9}, {0: 0.8}).p is None
    assert statistics.paired_test({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.7}).p is None
    assert statistics.paired_test({0: 0.9}, {1: 0.8}) == statistics.PairedTest((), None, None, None)


# ---------------------------------------------------------- compare on hand-made metrics.json


def _metrics(model: str, latent: float, coherence: tuple[float, float], joint: float) -> dict:
    return {
        "model": model, "dataset": "toy", "modalities": ["x", "y"], "epochs": 2, "seconds_per_epoch": 1.0,
        "latent_accuracy": {"x": 0.5, "y": 0.5, "x+y": latent},
        # Given two modalities ("x|x+y" cannot be, but the key shows it is left out of the mean).
        "coherence": {"y|x": coherence[0], "x|y": coherence[1], "x|x+y": 0.0},
        "random_coherence": 0.1, "random_coherence_gmm": 0.2,
        "log_likelihood": {"x": -10.0, "y": -20.0, "x+y": joint - 1.0},
        "joint_log_likelihood": joint, "conditional_log_likelihood": {"y|x": -10.0, "x|y": -1.0},
        "likelihood_estimators": {"log_likelihood": "IWAE", "joint_log_likelihood": "IWAE",
                                  "conditional_log_likelihood": "difference of two IWAE estimates"},
        "robustness": None, "mixture_weights": None, "classifier_accuracy": None,
        "num_examples": {"latent_accuracy": {"train": 8, "test": 4}, "coherence": 4}, "skipped": {},
    }


def _write(directory, metrics: dict, seed: int | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    if seed is not None:
        with open(os.path.join(directory, "config.yaml"), "w") as f:
            f.write(f"train:\n  seed: {seed}\n")
    return str(directory)


@pytest.fixture
def two_models(tmp_path) -> tuple[str, str]:
    """bmvae_m under a seed root (seeds 0-2 by directory name), mmvae as three runs whose seeds
    come from their config.yaml."""
    strong = [(0.90, (0.8, 0.6), -100.0), (0.91, (0.7, 0.7), -102.0), (0.92, (0.9, 0.5), -101.0)]
    weak = [(0.80, (0.6, 0.6), -105.0), (0.80, (0.5, 0.5), -100.0), (0.80, (0.9, 0.7), -110.0)]
    for seed, (latent, coherence, joint) in enumerate(strong):
        _write(tmp_path / "bmvae" / f"seed-{seed}", _metrics("bmvae_m", latent, coherence, joint))
    for seed, (latent, coherence, joint) in enumerate(weak):
        _write(tmp_path / "mmvae" / f"run{seed}", _metrics("mmvae", latent, coherence, joint), seed=seed)
    return str(tmp_path / "bmvae"), str(tmp_path / "mmvae")


def test_compare_groups_seeds_by_model_with_mean_sd_and_the_paired_test(two_models, tmp_path):
    bmvae, mmvae = two_models
    runs = compare.load_runs(compare.expand_runs([bmvae, os.path.join(mmvae, "run0"),
                                                  os.path.join(mmvae, "run1"), os.path.join(mmvae, "run2")]))
    groups = compare.group_runs(runs)
    assert [(g.label, g.seeds()) for g in groups] == [("bmvae_m", [0, 1, 2]), ("mmvae", [0, 1, 2])]
    # Mean single cross coherence per run: bmvae 0.7, 0.7, 0.7; mmvae 0.6, 0.5, 0.8.
    assert groups[1].values("cross_coherence") == pytest.approx([0.6, 0.5, 0.8])
    # The joint log-likelihood is metrics.json's joint_log_likelihood.
    assert groups[0].values("joint_log_likelihood") == [-100.0, -102.0, -101.0]

    markdown_path, _ = compare.compare([bmvae, *[os.path.join(mmvae, f"run{s}") for s in range(3)]],
                                       str(tmp_path / "out"))
    markdown = open(markdown_path).read()
    # Latent accuracy: bmvae 0.91 ± 0.01, mmvae 0.80 ± 0; differences 0.10, 0.11, 0.12 (p 0.0026).
    # Coherence: 0.700 ± 0 vs 0.633 ± 0.153 (sd of .6, .5, .8): differences .1, .2, -.1 (p 0.53).
    # Joint: -101 ± 1 vs -105 ± 5: differences 5, -2, 9 (mean 4, sd sqrt(62 / 2) = 5.57, p 0.39).
    assert "| bmvae_m | 0,1,2 | 0.910 ± 0.010 † | 0.700 ± 0.000 † | -101.0 ± 1.0 † |" in markdown
    assert "| mmvae | 0,1,2 | 0.800 ± 0.000 * | 0.633 ± 0.153 | -105.0 ± 5.0 |" in markdown
    p_coherence, p_joint = _t_test_p_df2([0.1, 0.2, -0.1]), _t_test_p_df2([5.0, -2.0, 9.0])
    assert (f"| bmvae_m - mmvae | 0,1,2 | +0.110 ± 0.010 * | 0.003 | +0.067 ± 0.153 | {p_coherence:.3f} | "
            f"+4.0 ± 5.6 | {p_joint:.3f} |") in markdown
    assert f"p < {statistics.ALPHA}" in markdown and statistics.TEST in markdown
    # Per-subset means over seeds, and the per-run tables as before.
    assert "| bmvae_m | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.910 ± 0.010 |" in markdown
    assert "| bmvae/seed-1 | 0.500 | 0.500 | 0.910 |" in markdown
    assert "comparison of 2 models (6 runs)" in markdown


def test_the_joint_log_likelihood_is_used_when_metrics_json_has_it():
    metrics = Metrics.from_json(_metrics("m", 0.9, (0.5, 0.5), -100.0))
    assert compare.headline_numbers(metrics)["joint_log_likelihood"] == -100.0  # not log_likelihood's -101
    metrics.joint_log_likelihood = -90.5
    assert compare.headline_numbers(metrics) == {
        "latent_accuracy": 0.9, "cross_coherence": 0.5, "joint_log_likelihood": -90.5}


def test_two_runs_of_one_model_with_one_seed_are_refused(tmp_path):
    first = _write(tmp_path / "a" / "seed-0", _metrics("mmvae", 0.9, (0.5, 0.5), -1.0))
    second = _write(tmp_path / "b", _metrics("mmvae", 0.8, (0.5, 0.5), -1.0), seed=0)
    with pytest.raises(UserError, match="two runs of mmvae on toy with seed 0"):
        compare.group_runs(compare.load_runs([first, second]))


def test_one_run_per_model_is_reported_without_a_test(tmp_path):
    first = _write(tmp_path / "alpha", _metrics("bmvae_m", 0.9, (0.5, 0.5), -1.0))
    second = _write(tmp_path / "beta", _metrics("mmvae", 0.8, (0.5, 0.5), -2.0))
    tables = compare.seed_tables(compare.group_runs(compare.load_runs([first, second])))
    assert [t.title for t in tables] == ["Headline numbers over seeds (mean ± sd)",
                                         "Differences between models over seed-matched runs"]
    assert tables[0].rows == [["bmvae_m", "1 unknown", "0.900 †", "0.500 †", "-1.0 †"],
                              ["mmvae", "1 unknown", "0.800", "0.500", "-2.0"]]
    assert tables[1].rows == [["bmvae_m - mmvae", "none", *["n/a"] * 6]]


# ------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_seeds_trains_one_resumable_run_per_seed(tmp_path, capsys):
    data, root = str(tmp_path / "data"), tmp_path / "w"
    synthetic.write_dataset(data, num_train=32, num_test=16)
    tiny = [*synthetic.TINY_CLI, "--set", "train.batch_size=16"]
    assert cli.main(["train", "--data", data, "--workdir", str(root), "--epochs", "1", "--seeds", "1", *tiny]) == 0
    first = run_dir.read_history(run_dir.RunPaths(str(root / "seed-1")))
    # The rerun with both seeds leaves the finished seed-1 as it was and trains seed-0.
    assert cli.main(["train", "--data", data, "--workdir", str(root), "--epochs", "1", "--seeds", "0,1", *tiny]) == 0
    out = capsys.readouterr().out
    assert f"trained {root / 'seed-0'}: epoch 1" in out and f"trained {root / 'seed-1'}: epoch 1" in out
    histories = {}
    for seed in (0, 1):
        paths = run_dir.RunPaths(str(root / f"seed-{seed}"))
        assert run_dir.read_config(paths).train.seed == seed
        histories[seed] = run_dir.read_history(paths)
        assert [r["epoch"] for r in histories[seed]] == [1]
    assert histories[1] == first
    assert histories[0][0]["loss"] != histories[1][0]["loss"]
    assert sorted(os.listdir(root)) == ["seed-0", "seed-1"]


def test_runs_scored_on_different_splits_are_refused(tmp_path):
    first = _write(tmp_path / "a", _metrics("mmvae", 0.9, (0.5, 0.5), -1.0), seed=0)
    second = _write(tmp_path / "b", {**_metrics("bmvae_m", 0.8, (0.5, 0.5), -1.0), "split": "validation"},
                    seed=0)
    with pytest.raises(UserError, match="different splits"):
        compare.load_runs([first, second])
    assert len(compare.load_runs([first])) == 1
