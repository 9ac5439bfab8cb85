"""RUN/report.html for one run, and the rendering `bmvae compare` (`reporting.compare`) shares.

Reports are self-contained so they open offline: the HTML embeds every image as a base64 data URI
and uses no script, font or stylesheet from elsewhere; the Markdown report links PNGs written
beside it. Tables are built once as `Table` values (pure functions of metrics.json,
history.jsonl and analysis.json) and rendered to either format.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import os
import subprocess
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import yaml

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
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1.2em; margin: 0.5em 0; }
dl.facts dt { font-weight: bold; } dl.facts dd { margin: 0; font-family: monospace; }
details { margin: 0.6em 0; } summary { cursor: pointer; color: #235; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
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


@dataclasses.dataclass
class Details:
    """A collapsed block of preformatted text (the resolved config)."""

    summary: str
    text: str


@dataclasses.dataclass
class Facts:
    """The header's key-value pairs (model, dataset, seed, ...)."""

    items: list[tuple[str, str]]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------ rendering


def render_html(title: str, sections: Sequence[tuple[str, Sequence[Table | Image | Details | Facts | str]]]) -> str:
    """A standalone HTML page: sections of tables, images (inline PNG) and paragraphs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, Table):
                out.append(_html_table(item))
            elif isinstance(item, Details):
                out.append(f"<details><summary>{html.escape(item.summary)}</summary>"
                           f"<pre>{html.escape(item.text)}</pre></details>")
            elif isinstance(item, Facts):
                out.append('<dl class="facts">' + "".join(
                    f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in item.items) + "</dl>")
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
            elif isinstance(item, Details):
                out += [f"{item.summary}:", "", "```", item.text.rstrip("\n"), "```", ""]
            elif isinstance(item, Facts):
                out += [f"- {k}: {v}" for k, v in item.items] + [""]
            else:
                out += [item, ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------ tables


def run_metric_tables(metrics: Metrics) -> list[Table]:
    """The metrics.json of one run as tables, each saying how many examples it rests on."""
    tables = []
    latent = metrics.latent_accuracy
    if latent:
        n = metrics.count("latent_accuracy") or {}
        tables.append(Table("Latent accuracy (linear probe on posterior means)", ["subset", "accuracy"],
                            [[k, fmt(v)] for k, v in latent.items()],
                            f"fitted on {n.get('train')} train examples, scored on {n.get('test')} test examples"))
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
    tables.extend(likelihood_tables(metrics))
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


def likelihood_tables(metrics: Metrics) -> list[Table]:
    """log p(x_S) by subset (the joint is the row of all modalities) and log p(x_T | x_S), each
    noting its estimator, examples and K."""
    tables = []
    estimators = metrics.likelihood_estimators or {}

    def note(name: str) -> str:
        return (f"nats, mean over {metrics.count(name)} test examples, K = {metrics.count(f'{name}_samples')} "
                f"importance samples; unweighted. Estimator: {estimators.get(name, 'n/a')}")

    if metrics.log_likelihood:
        tables.append(Table("Log-likelihood (IWAE estimate of log p(x_S))", ["subset", "log-likelihood"],
                            [[k, fmt(v, 1)] for k, v in metrics.log_likelihood.items()],
                            note("log_likelihood") + ". The row of all modalities is joint_log_likelihood."))
    if metrics.conditional_log_likelihood:
        tables.append(Table("Conditional log-likelihood log p(x_T | x_S)", ["T|S", "log-likelihood"],
                            [[k, fmt(v, 1)] for k, v in metrics.conditional_log_likelihood.items()],
                            note("conditional_log_likelihood")))
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


def plot_caption(name: str) -> str:
    """The caption of RUN/plots/<name> (reports and `bmvae compare`)."""
    if name.startswith("cross_generation_"):
        given = name[len("cross_generation_"):-len(".png")]
        return (f"Cross generation from {given} alone: each row a test example, then 5 posterior samples "
                f"decoded into every modality (under {given} itself: reconstructions)")
    return {
        "cross_generation.png": "Cross generation: each modality given alone, every modality generated",
        plots.MIXTURE_WEIGHTS: "Mixture weights per latent dimension and modality (white: uniform 1/M)",
        plots.ROBUSTNESS: "Latent accuracy against input noise (dashed: raw-input baseline)",
        plots.PRIOR_SAMPLES: "Joint generation from the prior: each column one z ~ p(z) decoded into every "
                             "modality (what random coherence scores)",
        plots.LATENT_EMBEDDING: "Posterior means of test examples through each single-modality encoder, "
                                "embedded together in 2-D (t-SNE): coloured by class (left) and by encoding "
                                "modality (right)",
        plots.TRAINING_CURVE: "Training curve: loss and each loss term per epoch (history.jsonl)",
    }.get(name, name)


def analysis_pictures(analysis: Mapping) -> dict[str, str]:
    """{caption: file name in RUN/analysis/} of the pictures an analysis.json lists, but its
    mixture weights: `run_pictures` draws those once, with the private dimensions outlined."""
    files = analysis.get("files") or {}
    out = {}
    if "factor_r2" in files:
        out["R^2 of each ground-truth factor from each latent dimension"] = files["factor_r2"]
    for modality, grids in (files.get("swap_grids") or {}).items():
        for kind, name in grids.items():
            what = ("its private dimensions resampled from the prior, the rest kept"
                    if kind == "private_resampled" else
                    "every other dimension resampled from the prior, its private ones kept")
            out[f"Dimension swap (Fig. 7) for {modality}: {what}"] = name
    return out


def run_pictures(metrics: Metrics | None, history: Sequence[Mapping], plot_files: Mapping[str, bytes],
                 analysis: Mapping | None, analysis_files: Mapping[str, bytes]) -> list[Image]:
    """Every picture of a run, in reading order: loss curves, mixture weights, coherence, cross
    generation, prior samples, latent embedding, robustness, then `bmvae analyze`'s."""
    images = []
    if history:
        images.append(Image("Training curve: loss and each loss term per epoch (history.jsonl)",
                            plots.figure_png(plots.loss_terms_figure(history)), plots.TRAINING_CURVE))
    weights = analysis["weights"] if analysis else (metrics.mixture_weights if metrics else None)
    if weights is not None:
        names = analysis["modalities"] if analysis else metrics.modalities
        private = ({m: [d - 1 for d in dims] for m, dims in analysis["dimensions"]["private"].items()}
                   if analysis else None)
        caption = plot_caption(plots.MIXTURE_WEIGHTS) + (
            f"; outlined: private dimensions at normalised weight >= {analysis['threshold']:g} "
            f"(bmvae analyze)" if analysis else "; run `bmvae analyze` to mark the private dimensions")
        images.append(Image(caption, plots.figure_png(plots.mixture_weights_figure(
            np.asarray(weights), names, private)), plots.MIXTURE_WEIGHTS))
    if metrics is not None and metrics.coherence:
        images.append(Image(
            f"Cross coherence as a target x given matrix: {metrics.count('coherence')} test examples, one "
            f"posterior sample each, classified by the coherence classifiers",
            plots.figure_png(plots.coherence_matrix_figure(metrics.coherence, metrics.modalities,
                                                           metrics.random_coherence)), "coherence.png"))
    names = metrics.modalities if metrics is not None else []
    order = ([plots.cross_generation_filename(n) for n in names]
             + [plots.PRIOR_SAMPLES, plots.LATENT_EMBEDDING, plots.ROBUSTNESS])
    drawn_here = {plots.TRAINING_CURVE, plots.MIXTURE_WEIGHTS}
    for name in [*order, *sorted(plot_files)]:
        if name in plot_files and name not in drawn_here:
            images.append(Image(plot_caption(name), plot_files[name], name))
            drawn_here.add(name)
    images += [Image(caption, png, f"analysis_{i}.png") for i, (caption, png) in enumerate(analysis_files.items())]
    return images


def run_header(workdir: str, metrics: Metrics | None, config: Mapping | None, config_text: str | None,
               dates: Mapping[str, str], commit: str | None) -> list:
    """Model, dataset, seed, dates, source commit, and the resolved config (collapsed)."""
    model = (metrics.model if metrics else None) or ((config or {}).get("model") or {}).get("name")
    facts = [("model", str(model or "unknown")),
             ("dataset", str((metrics.dataset if metrics else None) or ((config or {}).get("data") or {}).get("dir")
                             or "unknown")),
             ("seed", str(((config or {}).get("train") or {}).get("seed", "unknown"))),
             ("epochs", str(metrics.epochs) if metrics else "not evaluated yet")]
    facts += [(what, when) for what, when in dates.items()]
    facts.append(("source commit", f"{commit} (the source tree's git HEAD when this report was written; "
                                   f"the run does not record it)" if commit else
                  "unknown (the source tree is not a git checkout)"))
    facts.append(("run directory", os.path.abspath(workdir)))
    items: list = [Facts(facts)]
    if config_text is not None:
        items.append(Details("Resolved config (RUN/config.yaml)", config_text))
    return items


def run_sections(metrics: Metrics | str | None, history: Sequence[Mapping], plot_files: Mapping[str, bytes],
                 analysis: Mapping | None, analysis_files: Mapping[str, bytes]) -> list:
    """The sections of RUN/report.html after its header (pure: everything read is passed in):
    pictures first, then the tables of the numbers no picture shows."""
    known = metrics if isinstance(metrics, Metrics) else None
    sections = [("Pictures", run_pictures(known, history, plot_files, analysis, analysis_files))]
    if metrics is None:
        tables: list = ["No metrics.json yet: run `bmvae evaluate`."]
    elif isinstance(metrics, str):
        tables = [metrics]
    else:
        tables = run_metric_tables(metrics)
    if analysis is not None:
        tables += analysis_tables(analysis)
    sections.append(("Tables", tables))
    return sections


def source_commit() -> str | None:
    """`git rev-parse HEAD` of the source tree this package runs from, or None (no git, not a
    checkout, an installed copy)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        done = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _modified(path: str) -> str | None:
    if not tf.io.gfile.exists(path):
        return None
    seconds = tf.io.gfile.stat(path).mtime_nsec / 1e9
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _read_config(path: str) -> tuple[Mapping | None, str | None]:
    """RUN/config.yaml as (dict, text); (None, None) when absent, (None, text) when unparsable."""
    if not tf.io.gfile.exists(path):
        return None, None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None, text
    return (data if isinstance(data, dict) else None), text


def _read_run_files(paths: run_dir.RunPaths) -> tuple[dict, Mapping | None, dict]:
    """(plot PNGs {name: bytes}, analysis.json, analysis PNGs {caption: bytes})."""
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
    return plot_files, analysis, analysis_files


def write_run_report(workdir: str) -> str:
    """Writes RUN/report.html from what the run directory holds; returns its path."""
    paths = run_dir.RunPaths(workdir)
    metrics = _read_metrics(paths.metrics)
    history = run_dir.read_history(paths)
    plot_files, analysis, analysis_files = _read_run_files(paths)
    config, config_text = _read_config(paths.config)
    known = metrics if isinstance(metrics, Metrics) else None
    dates = {"history.jsonl written": _modified(paths.history), "evaluated": _modified(paths.metrics),
             "analysed": _modified(os.path.join(paths.root, "analysis", "analysis.json")),
             "report written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    header = run_header(workdir, known, config, config_text, {k: v for k, v in dates.items() if v}, source_commit())
    name = (known.model if known else None) or os.path.basename(os.path.normpath(workdir))
    dataset = known.dataset if known else None
    title = f"bmvae run report: {name}" + (f" on {dataset}" if dataset else "")
    page = render_html(title, [("Run", header), *run_sections(metrics, history, plot_files, analysis,
                                                                analysis_files)])
    path = os.path.join(paths.root, REPORT_HTML)
    atomic.write_text(path, page)
    return path
