"""RUN/report.html for one run, and the rendering `bmvae compare` (`reporting.compare`) shares.

Reports are self-contained so they open offline: the HTML embeds every image as a base64 data URI
and uses no script, font or stylesheet from elsewhere; the Markdown report links PNGs written
beside it. Tables are built once as `Table` values (pure functions of metrics.json,
history.jsonl and analysis.json) and rendered to either format.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from bmvae_tf import atomic
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import plots

REPORT_HTML = "report.html"

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; }
p.note { color: #555; font-size: 0.85em; margin-top: 0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclasses.dataclass
class Image:
    caption: str
    png: bytes
    filename: str  # where the Markdown report puts it, relative to the report


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------ rendering


def render_html(title: str, sections: Sequence[tuple[str, Sequence[Table | Image | str]]]) -> str:
    """A standalone HTML page: sections of tables, images (inline PNG) and paragraphs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, Table):
                out.append(_html_table(item))
            elif isinstance(item, Image):
                data = base64.b64encode(item.png).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(item.caption)}" '
                           f'src="data:image/png;base64,{data}"><figcaption>'
                           f"{html.escape(item.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{html.escape(item)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def render_markdown(title: str, sections: Sequence[tuple[str, Sequence[Table | Image | str]]]) -> str:
    """The same content as Markdown; images link `Image.filename`."""
    out = [f"# {title}", ""]
    for heading, items in sections:
        out += [f"## {heading}", ""]
        for item in items:
            if isinstance(item, Table):
                out += [f"### {item.title}", "",
                        "| " + " | ".join(_md_cell(h) for h in item.headers) + " |",
                        "|" + "|".join(" --- " for _ in item.headers) + "|"]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in item.rows]
                out.append("")
                if item.note:
                    out += [item.note, ""]
            elif isinstance(item, Image):
                out += [f"![{item.caption}]({item.filename})", "", f"*{item.caption}*", ""]
            else:
                out += [item, ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------ tables


def history_table(history: Sequence[Mapping]) -> Table:
    return Table("Training history (history.jsonl)", ["epoch", "step", "loss", "val_loss", "seconds"],
                 [[str(h.get("epoch")), str(h.get("step")), fmt(h.get("loss"), 4),
                   fmt(h.get("val_loss"), 4), fmt(h.get("seconds"), 1)] for h in history])


def run_metric_tables(metrics: Metrics) -> list[Table]:
    """The metrics.json of one run as tables, each saying how many examples it rests on."""
    tables = []
    latent = metrics.latent_accuracy
    if latent:
        n = metrics.count("latent_accuracy") or {}
        tables.append(Table("Latent accuracy (linear probe on posterior means)", ["subset", "accuracy"],
                            [[k, fmt(v)] for k, v in latent.items()],
                            f"fitted on {n.get('train')} train examples, scored on {n.get('test')} test examples"))
    coherence = metrics.coherence
    if coherence:
        tables.append(Table("Cross coherence (target|given)", ["target|given", "coherence"],
                            [[k, fmt(v)] for k, v in coherence.items()],
                            f"{metrics.count('coherence')} test examples, one posterior sample each"))
    if metrics.random_coherence is not None:
        gmm_n = metrics.count("random_coherence_gmm") or {}
        tables.append(Table("Random coherence", ["latents from", "coherence", "samples"], [
            ["prior", fmt(metrics.random_coherence), str(metrics.count("random_coherence"))],
            [f"ex-post GMM (fitted on {gmm_n.get('gmm_fit')} train latents)",
             fmt(metrics.random_coherence_gmm), str(gmm_n.get("samples"))]]))
    classifier = metrics.classifier_accuracy
    if classifier:
        n = metrics.count("classifier") or {}
        tables.append(Table("Coherence classifiers (accuracy on real test data)", ["modality", "accuracy"],
                            [[k, fmt(v)] for k, v in classifier.items()],
                            f"trained on {n.get('train')} train examples, scored on {n.get('test')} test examples"))
    ll = metrics.log_likelihood
    if ll:
        tables.append(Table("Log-likelihood (IWAE estimate of log p(x_S))", ["subset", "log-likelihood"],
                            [[k, fmt(v, 1)] for k, v in ll.items()],
                            f"mean over {metrics.count('log_likelihood')} test examples, "
                            f"K = {metrics.count('log_likelihood_samples')} importance samples"))
    rob = metrics.robustness
    if rob:
        n = metrics.count("robustness") or {}
        rows = []
        for key, curve in rob["latent_accuracy"].items():
            base = (rob.get("baseline_accuracy") or {}).get(key)
            rows.append([key, fmt(curve[0]), fmt(curve[-1]), fmt(rob["relative"][key]),
                         fmt((rob.get("effective") or {}).get(key)),
                         fmt(base[0] if base else None), fmt((rob.get("baseline_relative") or {}).get(key))])
        levels = rob["noise_levels"]
        tables.append(Table(
            "Robustness (MultiBench): latent accuracy under input noise",
            ["subset", f"accuracy at {levels[0]:g}", f"accuracy at {levels[-1]:g}", "relative",
             "effective", "baseline clean acc.", "baseline relative"], rows,
            f"{len(levels)} noise levels {levels[0]:g}..{levels[-1]:g}; {rob.get('noise')}. "
            f"Probes fitted on {n.get('train')} clean train examples, the raw-input baseline on "
            f"{n.get('baseline_train')}; scored on {n.get('test')} test examples per level. Relative: area "
            f"under the curve; effective: accuracy kept beyond the baseline shifted to the same clean "
            f"accuracy, summed over levels."))
    timing = [["epochs", str(metrics.epochs)],
              ["seconds per epoch (mean over history.jsonl)", fmt(metrics.seconds_per_epoch, 2)]]
    tables.append(Table("Training time", ["", "value"], timing))
    skipped = metrics.skipped
    if skipped:
        tables.append(Table("Skipped", ["metric", "why"], [[k, v] for k, v in skipped.items()]))
    return tables


def analysis_tables(analysis: Mapping) -> list[Table]:
    """analysis.json (trainers.analysis) as tables."""
    dims = analysis["dimensions"]
    rows = [[f"private: {m}", ", ".join(map(str, v)) or "none"] for m, v in dims["private"].items()]
    rows.append(["shared", ", ".join(map(str, dims["shared"])) or "none"])
    tables = [Table(f"Dimension sets from the normalised {analysis['weights_name']}", ["set", "dimensions (1-based)"],
                    rows, f"private to m: m has the largest weight and (w - 1/M) / (1 - 1/M) >= "
                          f"{analysis['threshold']:g}; shared: every other dimension")]
    sub = analysis.get("subvector_accuracy")
    if sub:
        set_names = list(next(iter(sub.values())))
        n = (analysis.get("num_examples") or {}).get("subvector_accuracy") or {}
        tables.append(Table("Sub-vector latent accuracy (Table 12): encoder x dimension set",
                            ["encoder", *set_names],
                            [[enc, *[fmt(v) for v in row.values()]] for enc, row in sub.items()],
                            f"linear probes on posterior means restricted to each set; fitted on "
                            f"{n.get('train')} train, scored on {n.get('test')} test examples; rest:m is "
                            f"the complement of private:m"))
    pvf = analysis.get("private_vs_factors")
    if pvf:
        n = (analysis.get("num_examples") or {}).get("factors") or {}
        tables.append(Table(
            "Private dimensions against ground-truth private factors",
            ["modality", "private (weights)", f"carrying its factors (R^2 >= {analysis['r2_threshold']:g})",
             "precision", "recall", "rank correlation"],
            [[m, ", ".join(map(str, v["private"])) or "none", ", ".join(map(str, v["carrying"])) or "none",
              fmt(v["precision"]), fmt(v["recall"]), fmt(v.get("rank_correlation"))]
             for m, v in pvf.items()],
            f"R^2 of a cubic polynomial in one dimension of the modality's own posterior mean, fitted "
            f"on {n.get('train')} train and scored on {n.get('test')} test examples"
            + (", factors centred within each class" if analysis.get("factors_residualised_on_label") else "")
            + "; rank correlation: Spearman, over dimensions, of m's normalised weight with the best "
              "R^2 of m's factors"))
    return tables


# ------------------------------------------------------------------------------------ one run


def _read_json(path: str):
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.loads(f.read())


def _read_metrics(path: str) -> Metrics | str | None:
    """RUN/metrics.json as a record; None when absent; the error, for the report to show, when
    it cannot be read (a report, written after training too, must not fail on an old file)."""
    if not tf.io.gfile.exists(path):
        return None
    try:
        return Metrics.from_json(path)
    except UserError as e:
        return str(e)


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


PLOT_CAPTIONS = {
    plots.CROSS_GENERATION: "Cross generation: each modality given alone, every modality generated",
    plots.MIXTURE_WEIGHTS: "Mixture weights per latent dimension and modality",
    plots.ROBUSTNESS: "Latent accuracy against input noise (dashed: raw-input baseline)",
}


def analysis_pictures(analysis: Mapping) -> dict[str, str]:
    """{caption: file name in RUN/analysis/} of the pictures an analysis.json lists."""
    files = analysis.get("files") or {}
    out = {}
    if "mixture_weights" in files:
        out[f"{analysis['weights_name']} per dimension and modality, private dimensions outlined"] = \
            files["mixture_weights"]
    if "factor_r2" in files:
        out["R^2 of each ground-truth factor from each latent dimension"] = files["factor_r2"]
    for modality, grids in (files.get("swap_grids") or {}).items():
        for kind, name in grids.items():
            what = ("its private dimensions resampled from the prior, the rest kept"
                    if kind == "private_resampled" else
                    "every other dimension resampled from the prior, its private ones kept")
            out[f"Dimension swap (Fig. 7) for {modality}: {what}"] = name
    return out


def run_sections(metrics: Metrics | str | None, history: Sequence[Mapping], plot_files: Mapping[str, bytes],
                 analysis: Mapping | None, analysis_files: Mapping[str, bytes]) -> list:
    """The sections of RUN/report.html (pure: everything read is passed in)."""
    sections = []
    if history:
        sections.append(("Training", [
            Image("Training curve from history.jsonl", plots.figure_png(plots.training_curve_figure(history)),
                  "training_curve.png")]))
    if metrics is None:
        sections.append(("Metrics", ["No metrics.json yet: run `bmvae evaluate`."]))
    elif isinstance(metrics, str):
        sections.append(("Metrics", [metrics]))
    else:
        sections.append(("Metrics", run_metric_tables(metrics)))
    images = [Image(PLOT_CAPTIONS.get(name, name), png, name) for name, png in plot_files.items()
              if name != plots.TRAINING_CURVE]
    if images:
        sections.append(("Plots", images))
    if analysis is not None:
        items: list = list(analysis_tables(analysis))
        items += [Image(caption, png, f"analysis_{i}.png")
                  for i, (caption, png) in enumerate(analysis_files.items())]
        sections.append(("Mixture-weight analysis (bmvae analyze)", items))
    if history:
        sections.append(("Training history", [history_table(history)]))
    return sections


def write_run_report(workdir: str) -> str:
    """Writes RUN/report.html from what the run directory holds; returns its path."""
    paths = run_dir.RunPaths(workdir)
    metrics = _read_metrics(paths.metrics)
    history = run_dir.read_history(paths)
    plot_files = {}
    if tf.io.gfile.isdir(paths.plots):
        plot_files = {name: read_bytes(os.path.join(paths.plots, name))
                      for name in sorted(tf.io.gfile.listdir(paths.plots)) if name.endswith(".png")}
    analysis_dir = os.path.join(paths.root, "analysis")
    analysis = _read_json(os.path.join(analysis_dir, "analysis.json"))
    analysis_files = {}
    if analysis is not None:
        # Only the pictures this analysis.json names: the directory may hold older ones.
        analysis_files = {caption: read_bytes(os.path.join(analysis_dir, name))
                          for caption, name in analysis_pictures(analysis).items()
                          if tf.io.gfile.exists(os.path.join(analysis_dir, name))}
    known = isinstance(metrics, Metrics)
    name = (metrics.model if known else None) or os.path.basename(os.path.normpath(workdir))
    dataset = metrics.dataset if known else None
    title = f"bmvae run report: {name}" + (f" on {dataset}" if dataset else "")
    page = render_html(title, [("Run", [f"Run directory: {os.path.abspath(workdir)}"]),
                               *run_sections(metrics, history, plot_files, analysis, analysis_files)])
    path = os.path.join(paths.root, REPORT_HTML)
    atomic.write_text(path, page)
    return path
