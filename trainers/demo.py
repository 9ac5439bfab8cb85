"""`bmvae demo`: the embedded Digits data end to end, then a summary table.

build (Beam, DirectRunner) -> train bmvae_m with configs/digits/bmvae_m.yaml -> evaluate ->
analyze (the mixture-weight views) -> export; RUN/report.html then has every section. Rerunning reuses the built data and resumes the run, so a second demo is quick.
"""

from __future__ import annotations

import logging
import os
import shutil

from bmvae_tf import schema
from bmvae_tf.errors import UserError

log = logging.getLogger("bmvae.demo")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "digits", "bmvae_m.yaml")
DEMO_ANALYSIS_THRESHOLD = 0.02


def run_demo(workdir: str, epochs: int | None = None, stream=None) -> dict:
    """Runs the demo in `workdir` (data/, run/, export/) and prints the summary; returns metrics."""
    from bmvae_tf.pipeline.build_digits import build_digits
    from bmvae_tf.trainers import analysis, export, train
    from bmvae_tf.trainers.evaluation import evaluate

    if not os.path.exists(DEMO_CONFIG):
        raise UserError(f"{DEMO_CONFIG}: the demo config is missing (install the project from its "
                        f"source tree, e.g. `pip install -e .`)")
    data_dir = os.path.join(workdir, "data")
    run = os.path.join(workdir, "run")
    export_dir = os.path.join(workdir, "export")

    if os.path.exists(schema.manifest_path(data_dir)):
        log.info("reusing the digits dataset in %s", data_dir)
    else:
        # No manifest means no finished build: anything there is a failed build's leftovers.
        log.info("building the digits dataset in %s", data_dir)
        build_digits(data_dir, overwrite=True)

    overrides = [] if epochs is None else [f"train.epochs={epochs}"]
    config = train.resolve_config(run, data_dir, DEMO_CONFIG, overrides)
    train.train(config, run)
    metrics = evaluate.evaluate(run)
    # The demo's weights stay near uniform (lambda_c = 140 is chosen for coherence), so the
    # default threshold 0.5 calls no dimension private and draws no swap grid; at 0.02 the
    # private sets match the ground-truth factors (README, "Results on Digits").
    analysis.analyze(run, threshold=DEMO_ANALYSIS_THRESHOLD)  # also rewrites RUN/report.html
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)  # the demo's own previous export
    export.export_saved_model(run, export_dir)
    print(summary_table(metrics, data_dir=data_dir, run=run, export_dir=export_dir), file=stream)
    return metrics


def summary_table(metrics: dict, *, data_dir: str, run: str, export_dir: str) -> str:
    """Latent accuracy per subset, cross coherence per target|given, and where each file is."""
    # Metrics that need labels are null for unlabelled data; print n/a rather than fail.
    latent = metrics.get("latent_accuracy") or {}
    coherence = metrics.get("coherence") or {}
    lines = [f"bmvae demo: {metrics.get('model')} on {metrics.get('dataset')}, "
             f"{metrics.get('epochs')} epochs, {_fmt(metrics.get('seconds_per_epoch'), 1)} s/epoch", ""]
    lines.append("latent accuracy (test)")
    for subset, value in latent.items():
        lines.append(f"  {subset:<32}{_fmt(value):>8}")
    lines.append("")
    lines.append("coherence (target|given)")
    for key, value in coherence.items():
        lines.append(f"  {key:<32}{_fmt(value):>8}")
    singles = [v for k, v in coherence.items() if "+" not in k and v is not None]
    if singles:
        lines.append(f"  {'mean over single givens':<32}{_fmt(sum(singles) / len(singles)):>8}")
    lines.append(f"  {'random (prior)':<32}{_fmt(metrics.get('random_coherence')):>8}")
    if "random_coherence_gmm" in metrics:
        lines.append(f"  {'random (ex-post GMM)':<32}{_fmt(metrics.get('random_coherence_gmm')):>8}")
    lines += ["", "files:",
              f"  dataset     {data_dir}/manifest.json",
              f"  run         {run}/ (config.yaml, checkpoints/, history.jsonl, logs/)",
              f"  metrics     {run}/metrics.json",
              f"  plots       {run}/plots/",
              f"  analysis    {run}/analysis/ (analysis.json, mixture weights, swap grids)",
              f"  report      {run}/report.html",
              f"  SavedModel  {export_dir}"]
    return "\n".join(lines)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
