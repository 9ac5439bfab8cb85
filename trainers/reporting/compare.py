"""`bmvae compare`: several evaluated runs side by side, OUTPUT/report.md (+ images/) and
OUTPUT/report.html, rendered as `reporting.report` renders one run.

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
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import plots
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


def run_labels(paths: Sequence[str]) -> list[str]:
    """Short unique labels: the directory names, with parent directories added (to all of them)
    until they differ."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
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
        runs.append(RunSummary(label, path, metrics, run_dir.read_history(run_paths), plot_files))
    return runs


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
    runs = load_runs(paths)
    tables = compare_tables(runs)
    images = compare_images(runs)
    sources = [f"{r.label}: {os.path.abspath(r.path)}" for r in runs]
    sections = [("Runs compared", sources), ("Tables", tables), ("Plots", images)]
    title = f"bmvae comparison of {len(runs)} runs"
    tf.io.gfile.makedirs(os.path.join(output, "images"))
    for image in images:
        atomic.write_bytes(os.path.join(output, image.filename), image.png)
    markdown_path = os.path.join(output, COMPARE_MARKDOWN)
    html_path = os.path.join(output, COMPARE_HTML)
    atomic.write_text(markdown_path, render_markdown(title, sections))
    atomic.write_text(html_path, render_html(title, sections))
    return markdown_path, html_path
