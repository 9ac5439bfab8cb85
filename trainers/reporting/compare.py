"""`bmvae compare`: several evaluated runs side by side, OUTPUT/report.md (+ images/) and
OUTPUT/report.html, rendered as `reporting.report` renders one run.

Runs are grouped by model (and dataset): a RUN argument made by `bmvae train --seeds` stands for
its seed-N runs. Each group's headline numbers (`HEADLINES`) are reported as mean +- sd over its
seeds, and two models' difference is marked significant only when the paired t-test over
seed-matched runs of `statistics` says so (docs/compare.md).

Robustness is compared as MultiBench does: each run's relative and effective robustness are
min-max normalised across the compared runs (`minmax_normalise`), and their mean is the paper's
Fig. 5a score.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.training import seeds as seeds_lib
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import plots, statistics
from bmvae_tf.trainers.reporting.report import (Image, Table, fmt, plot_caption, read_bytes, render_html,
                                                render_markdown)

COMPARE_MARKDOWN = "report.md"
COMPARE_HTML = "report.html"


def minmax_normalise(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """MultiBench's `maxmin_normalize` across methods: (v - min) / (max - min). With fewer than
    two distinct values there is nothing to normalise against and every value maps to None."""
    known = [v for v in values.values() if v is not None]
    if len(set(known)) < 2:
        return {k: None for k in values}
    low, high = min(known), max(known)
    return {k: None if v is None else (v - low) / (high - low) for k, v in values.items()}


@dataclasses.dataclass
class RunSummary:
    label: str
    path: str
    metrics: Metrics
    history: list[dict]
    plot_files: dict[str, bytes]
    seed: int | None = None  # train.seed of RUN/config.yaml (or N of a seed-N directory)


def run_labels(paths: Sequence[str]) -> list[str]:
    """Short unique labels: the directory names (with their parent's for seed-N runs), with
    parent directories added (to all of them) until they differ."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    # A seed-N run is named with its parent (the model's WORKDIR of `bmvae train --seeds`).
    start = 2 if any(seeds_lib.is_seed_name(p[-1]) for p in parts) else 1
    for depth in range(start, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise UserError(f"the same run is named twice: {list(paths)}")


def load_runs(paths: Sequence[str]) -> list[RunSummary]:
    runs = []
    for label, path in zip(run_labels(paths), paths):
        run_paths = run_dir.RunPaths(path)
        if not tf.io.gfile.exists(run_paths.metrics):
            raise UserError(f"{run_paths.metrics}: not found; run `bmvae evaluate --workdir {path}` first")
        metrics = Metrics.from_json(run_paths.metrics)
        plot_files = {}
        if tf.io.gfile.isdir(run_paths.plots):
            plot_files = {n: read_bytes(os.path.join(run_paths.plots, n))
                          for n in sorted(tf.io.gfile.listdir(run_paths.plots)) if n.endswith(".png")}
        runs.append(RunSummary(label, path, metrics, run_dir.read_history(run_paths), plot_files,
                               seeds_lib.run_seed(path)))
    _check_one_split(runs)
    return runs


def _check_one_split(runs: Sequence[RunSummary]) -> None:
    """Numbers scored on validation and on test are not comparable: refuse the mix."""
    splits = {r.metrics.split for r in runs}
    if len(splits) > 1:
        named = "; ".join(f"{r.path}: {r.metrics.split}" for r in runs)
        raise UserError(f"the runs were scored on different splits ({named}); evaluate them all on "
                        f"one (`bmvae evaluate --split test|validation`)")


def expand_runs(paths: Sequence[str]) -> list[str]:
    """The run directories named by `paths`: a WORKDIR of `bmvae train --seeds` stands for its
    seed-N runs, in seed order."""
    return [run for path in paths for run in seeds_lib.expand(path)]


def _union_keys(dicts: Sequence[Mapping | None]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts if d for k in d))


def _by_run_table(title: str, runs: Sequence[RunSummary], key: str, digits: int, note: str) -> Table | None:
    values = [getattr(r.metrics, key) for r in runs]
    columns = _union_keys(values)
    if not columns:
        return None
    rows = [[r.label, *[fmt((v or {}).get(c), digits) for c in columns]] for r, v in zip(runs, values)]
    return Table(title, ["run", *columns], rows, note)


def robustness_scores(runs: Sequence[RunSummary]) -> dict[str, dict]:
    """Per run, on the all-modality subset: relative and effective robustness, each min-max
    normalised across the runs as MultiBench does, and their mean (the paper's Fig. 5a)."""
    raw = {}
    for run in runs:
        rob = run.metrics.robustness
        key = schema.subset_key(run.metrics.modalities)
        if rob and key in rob.get("relative", {}):
            raw[run.label] = {"relative": rob["relative"][key],
                              "effective": (rob.get("effective") or {}).get(key),
                              "clean": rob["latent_accuracy"][key][0]}
    relative = minmax_normalise({k: v["relative"] for k, v in raw.items()})
    effective = minmax_normalise({k: v["effective"] for k, v in raw.items()})
    for label, scores in raw.items():
        scores["relative_normalised"] = relative[label]
        scores["effective_normalised"] = effective[label]
        both = [v for v in (relative[label], effective[label]) if v is not None]
        scores["mean_normalised"] = float(np.mean(both)) if len(both) == 2 else None
    return raw


def compare_tables(runs: Sequence[RunSummary]) -> list[Table]:
    """The paper-shaped tables with one row per run."""
    tables = [Table("Runs", ["run", "model", "dataset", "epochs", "seconds per epoch"],
                    [[r.label, str(r.metrics.model), str(r.metrics.dataset),
                      str(r.metrics.epochs), fmt(r.metrics.seconds_per_epoch, 2)] for r in runs],
                    "seconds per epoch: mean of history.jsonl's per-epoch wall time; only comparable "
                    "between runs on the same machine and load")]

    def counts(key: str) -> str:
        def describe(value) -> str:
            if isinstance(value, Mapping):
                return " / ".join(f"{v} {k}" for k, v in value.items())
            return str(value)

        return "; ".join(f"{r.label}: {describe(r.metrics.count(key))}" for r in runs)

    for table in (
            _by_run_table("Latent accuracy by subset (linear probe, test)", runs, "latent_accuracy", 3,
                          f"examples - {counts('latent_accuracy')}"),
            _by_run_table("Cross coherence by target|given", runs, "coherence", 3,
                          f"test examples - {counts('coherence')}"),
            _by_run_table("Log-likelihood by subset (IWAE)", runs, "log_likelihood", 1,
                          f"test examples - {counts('log_likelihood')}; K - {counts('log_likelihood_samples')}")):
        if table is not None:
            tables.append(table)
    tables.append(Table("Random coherence", ["run", "prior", "ex-post GMM", "samples"],
                        [[r.label, fmt(r.metrics.random_coherence),
                          fmt(r.metrics.random_coherence_gmm),
                          str(r.metrics.count("random_coherence"))] for r in runs]))
    scores = robustness_scores(runs)
    if scores:
        tables.append(Table(
            "Robustness (MultiBench), all modalities given",
            ["run", "clean accuracy", "relative", "effective", "relative (normalised)",
             "effective (normalised)", "mean (normalised)"],
            [[label, fmt(s["clean"]), fmt(s["relative"]), fmt(s["effective"]),
              fmt(s["relative_normalised"]), fmt(s["effective_normalised"]), fmt(s["mean_normalised"])]
             for label, s in scores.items()],
            "normalised: min-max across the compared runs (MultiBench's maxmin_normalize; n/a with "
            "fewer than two distinct values); mean: the average of the two, as the paper's Fig. 5a"))
    return tables


# ------------------------------------------------------------------------ models over seeds

# (key, column title, digits): the numbers a model is judged by; higher is better for each.
HEADLINES = (("latent_accuracy", "latent accuracy (all modalities)", 3),
             ("cross_coherence", "mean cross coherence", 3),
             ("joint_log_likelihood", "joint log-likelihood (nats)", 1))


def headline_numbers(metrics: Metrics) -> dict[str, float | None]:
    """A run's headline numbers (None where metrics.json has none):

    - latent_accuracy: the linear probe's test accuracy on the subset of all modalities;
    - cross_coherence: the mean of the cross coherences "t|s" given one other modality;
    - joint_log_likelihood: metrics.json's `joint_log_likelihood` (the unweighted IWAE estimate
      of log p(x_1..M) with the joint posterior as proposal).
    """
    full = schema.subset_key(metrics.modalities)
    singles = [v for k, v in (metrics.coherence or {}).items()
               if "+" not in k.split("|", 1)[-1] and _number(v) is not None]
    joint = _number(metrics.joint_log_likelihood)
    return {"latent_accuracy": _number((metrics.latent_accuracy or {}).get(full)),
            "cross_coherence": float(np.mean(singles)) if singles else None,
            "joint_log_likelihood": joint}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclasses.dataclass
class ModelGroup:
    """The runs of one model on one dataset (its seeds)."""

    label: str
    runs: list[RunSummary]

    def values(self, key: str) -> list[float | None]:
        return [headline_numbers(r.metrics)[key] for r in self.runs]

    def by_seed(self, key: str) -> dict[int, float | None]:
        return {r.seed: headline_numbers(r.metrics)[key] for r in self.runs if r.seed is not None}

    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs if r.seed is not None)


def group_runs(runs: Sequence[RunSummary]) -> list[ModelGroup]:
    """The runs grouped by (model, dataset), in the order the models first appear; labelled by
    the model, with the dataset when the runs span several.

    Raises:
      UserError: two runs of one group have the same seed (two configurations of one model,
        which a group by model would mix).
    """
    keyed: dict[tuple[str, str], list[RunSummary]] = {}
    for run in runs:
        keyed.setdefault((run.metrics.model, run.metrics.dataset), []).append(run)
    several_datasets = len({dataset for _, dataset in keyed}) > 1
    groups = []
    for (model, dataset), members in keyed.items():
        seen: dict[int, RunSummary] = {}
        for run in members:
            if run.seed is not None and run.seed in seen:
                raise UserError(
                    f"{seen[run.seed].path} and {run.path}: two runs of {model} on {dataset} with "
                    f"seed {run.seed}; compare groups runs by model, so compare each configuration "
                    "of a model in its own report")
            if run.seed is not None:
                seen[run.seed] = run
        groups.append(ModelGroup(f"{model} ({dataset})" if several_datasets else model, members))
    return groups


def _mean_sd(summary: statistics.Summary, digits: int, runs: int) -> str:
    if summary.mean is None:
        return "n/a"
    text = fmt(summary.mean, digits) + ("" if summary.sd is None else f" ± {fmt(summary.sd, digits)}")
    return text if summary.n == runs else f"{text} (n={summary.n})"


def headline_table(groups: Sequence[ModelGroup], alpha: float = statistics.ALPHA) -> Table:
    """One row per model: its seeds and each headline number's mean ± sd over them; in each
    column the best mean is marked † and every model below it by the paired test * ."""
    cells = {g.label: [] for g in groups}
    for key, _, digits in HEADLINES:
        summaries = {g.label: statistics.summarise(g.values(key)) for g in groups}
        known = [g for g in groups if summaries[g.label].mean is not None]
        best = max(known, key=lambda g: summaries[g.label].mean) if len(known) > 1 else None
        for group in groups:
            text = _mean_sd(summaries[group.label], digits, len(group.runs))
            if best is not None and group is best:
                text += " †"
            elif best is not None and summaries[group.label].mean is not None:
                test = statistics.paired_test(best.by_seed(key), group.by_seed(key))
                if test.significant(alpha) and test.mean > 0:
                    text += " *"
            cells[group.label].append(text)
    rows = [[g.label, _seed_list(g), *cells[g.label]] for g in groups]
    return Table("Headline numbers over seeds (mean ± sd)", ["model", "seeds", *[t for _, t, _ in HEADLINES]],
                 rows, _headline_note(groups, alpha))


def _seed_list(group: ModelGroup) -> str:
    unknown = sum(r.seed is None for r in group.runs)
    listed = ",".join(map(str, group.seeds()))
    return ", ".join(part for part in (listed, f"{unknown} unknown" if unknown else "") if part)


def _headline_note(groups: Sequence[ModelGroup], alpha: float) -> str:
    note = (f"mean ± sample sd (ddof 1) over a model's runs; (n=k): only k of its runs have the number. "
            f"† the column's best mean; * below it by a {statistics.TEST}, p < {alpha} (uncorrected); "
            "no mark: the test does not tell it from the best, or cannot run (fewer than two "
            "seed-matched pairs). latent accuracy: the linear probe on all modalities (test); mean "
            "cross coherence: the mean over every target given one other modality (test); joint "
            "log-likelihood: metrics.json's joint_log_likelihood, in nats")
    return note


def pairwise_table(groups: Sequence[ModelGroup], alpha: float = statistics.ALPHA) -> Table | None:
    """Every pair of models A, B: the mean ± sd of A - B over their seed-matched runs and the
    paired t-test's p for each headline number; * marks p < alpha."""
    if len(groups) < 2:
        return None
    headers = ["A - B", "paired seeds"]
    for _, title, _ in HEADLINES:
        headers += [f"{title}: A - B", "p"]
    rows = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            row = [f"{a.label} - {b.label}", ",".join(map(str, sorted(set(a.seeds()) & set(b.seeds())))) or "none"]
            for key, _, digits in HEADLINES:
                test = statistics.paired_test(a.by_seed(key), b.by_seed(key))
                row += [_difference(test, digits, alpha), _p_value(test.p)]
            rows.append(row)
    return Table("Differences between models over seed-matched runs", headers, rows,
                 f"A - B: the mean ± sd of the per-seed differences (positive: A is better, as each "
                 f"number is higher-is-better); p: {statistics.TEST}; "
                 f"* p < {alpha} (uncorrected for the {len(rows) * len(HEADLINES)} tests here); "
                 "n/a: fewer than two seed-matched pairs, or all differences equal")


def _difference(test: statistics.PairedTest, digits: int, alpha: float) -> str:
    if test.mean is None:
        return "n/a"
    text = f"{test.mean:+.{digits}f}" + ("" if test.sd is None else f" ± {fmt(test.sd, digits)}")
    return text + (" *" if test.significant(alpha) else "")


def _p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _by_group_table(title: str, groups: Sequence[ModelGroup], key: str, digits: int) -> Table | None:
    """A per-subset metric as mean ± sd over each model's runs."""
    columns = _union_keys([getattr(r.metrics, key) for g in groups for r in g.runs])
    if not columns:
        return None
    rows = [[g.label, *[_mean_sd(statistics.summarise([(getattr(r.metrics, key) or {}).get(c) for r in g.runs]),
                                 digits, len(g.runs)) for c in columns]] for g in groups]
    return Table(f"{title}, mean ± sd over seeds", ["model", *columns], rows)


def seed_tables(groups: Sequence[ModelGroup], alpha: float = statistics.ALPHA) -> list[Table]:
    """The tables over seeds: headline numbers, the pairwise differences and, when some model
    has several runs, the per-subset metrics as mean ± sd."""
    tables = [headline_table(groups, alpha)]
    pairwise = pairwise_table(groups, alpha)
    if pairwise is not None:
        tables.append(pairwise)
    if any(len(g.runs) > 1 for g in groups):
        for title, key, digits in (("Latent accuracy by subset", "latent_accuracy", 3),
                                   ("Cross coherence by target|given", "coherence", 3),
                                   ("Log-likelihood by subset (IWAE)", "log_likelihood", 1)):
            table = _by_group_table(title, groups, key, digits)
            if table is not None:
                tables.append(table)
    return tables


def compare_images(runs: Sequence[RunSummary]) -> list[Image]:
    images = []
    histories = {r.label: r.history for r in runs if r.history}
    if histories:
        images.append(Image("Training curves of every run", plots.figure_png(
            plots.runs_training_curves_figure(histories)), "images/training_curves.png"))
    curves = {}
    for run in runs:
        rob = run.metrics.robustness
        key = schema.subset_key(run.metrics.modalities)
        if rob and key in rob["latent_accuracy"]:
            curves[run.label] = (rob["noise_levels"], rob["latent_accuracy"][key])
    if curves:
        images.append(Image("Latent accuracy of all modalities against input noise", plots.figure_png(
            plots.runs_robustness_figure(curves, "all modalities")), "images/robustness.png"))
    for index, run in enumerate(runs):
        for name, png in run.plot_files.items():
            images.append(Image(f"{run.label}: {plot_caption(name)}", png,
                                f"images/run{index + 1}_{name}"))
    return images


def compare(paths: Sequence[str], output: str) -> tuple[str, str]:
    """Writes OUTPUT/report.md (+ OUTPUT/images/) and OUTPUT/report.html; returns both paths."""
    if not paths:
        raise UserError("compare needs at least one run directory")
    if tf.io.gfile.exists(output) and not tf.io.gfile.isdir(output):
        raise UserError(f"--output {output}: is a file, not a directory")
    runs = load_runs(expand_runs(paths))
    groups = group_runs(runs)
    tables = compare_tables(runs)
    images = compare_images(runs)
    sources = [f"{r.label}: {os.path.abspath(r.path)}" for r in runs]
    sections = [("Runs compared", sources), ("Models over seeds", seed_tables(groups)),
                ("Tables", tables), ("Plots", images)]
    title = f"bmvae comparison of {len(groups)} models ({len(runs)} runs)"
    tf.io.gfile.makedirs(os.path.join(output, "images"))
    for image in images:
        atomic.write_bytes(os.path.join(output, image.filename), image.png)
    markdown_path = os.path.join(output, COMPARE_MARKDOWN)
    html_path = os.path.join(output, COMPARE_HTML)
    atomic.write_text(markdown_path, render_markdown(title, sections))
    atomic.write_text(html_path, render_html(title, sections))
    return markdown_path, html_path
