"""`bmvae evaluate`: a trained run -> RUN/metrics.json, RUN/plots/*.png and RUN/report.html
(scoring test), or RUN/metrics-validation.json alone (scoring validation).

The metrics (SPEC section 3) follow the paper's protocol (Sects. 6.1.1, 6.1.2, 6.3) with the
choices SPEC 6 fixes; each family lives in its own module of this package and is computed by one
stage in `STAGES`. A stage is a function of the shared `EvalContext` (model, data, eval config,
seed, cached classifiers and encodings) that fills its fields of the `Metrics` record. To add a
metric: a module with its maths and a stage, a field in `metrics.Metrics`, a line in `STAGES`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from threadpoolctl import threadpool_limits

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir
from bmvae_tf.trainers.evaluation import (cca, coherence, encodings, likelihood, probes, random_coherence,
                                          robustness)
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.context import EvalContext
from bmvae_tf.trainers.evaluation.metrics import Metrics
from bmvae_tf.trainers.reporting import plots, report
from bmvae_tf.trainers.training import inputs, summaries

logger = logging.getLogger(__name__)

PLOT_EXAMPLES = 10  # test examples in each cross-generation grid, and prior samples drawn
PLOT_SAMPLES = 5  # posterior samples per example and target in the cross-generation grids
EMBEDDING_EXAMPLES = 500  # test examples per encoder in the latent embedding (t-SNE of 500 x M points)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the evaluation. needs_labels: the metrics it leaves None, with the reason in
    `skipped`, when the dataset declares no label."""

    run: Callable[[EvalContext], None]
    needs_labels: tuple[str, ...] = ()


# In the order they run (the classifiers and encodings are made on first use).
STAGES: list[Stage] = [
    Stage(coherence.classifier_accuracy_stage, needs_labels=("classifier_accuracy",)),
    Stage(probes.latent_accuracy_stage, needs_labels=("latent_accuracy",)),
    Stage(coherence.cross_coherence_stage, needs_labels=("coherence",)),
    Stage(random_coherence.random_coherence_stage, needs_labels=("random_coherence", "random_coherence_gmm")),
    Stage(robustness.robustness_stage, needs_labels=("robustness",)),
    Stage(cca.cca_stage),
    Stage(likelihood.log_likelihood_stage),
]


def evaluate(workdir: str, data_dir: str | None = None, overrides: Sequence[str] = (),
             split: str = schema.TEST) -> dict:
    """Computes the metrics of a trained run. Scoring test writes RUN/metrics.json,
    RUN/plots/*.png and RUN/report.html; scoring validation writes RUN/metrics-validation.json
    only, so that the test scores, plots and report of the run stay as they were.

    Args:
      workdir: the run directory RUN (config.yaml, checkpoints/, history.jsonl).
      data_dir: the dataset; defaults to the one the run was trained on (config data.dir).
      overrides: `eval.key=value` settings for this evaluation only (RUN/config.yaml is kept).
      split: the split scored, "test" (default) or "validation"; the metrics file records it.

    Returns:
      The metrics dict as written (SPEC section 3). Without labels in the manifest the
      label-based metrics are None and `skipped` says why.

    Raises:
      UserError: a missing run, checkpoint, dataset or split.
    """
    started = time.perf_counter()
    context = _context(workdir, data_dir, overrides, split)
    unlabelled = context.manifest.label is None
    if unlabelled:
        reason = f"dataset {context.manifest.name!r} declares no label"
        logger.warning("%s: skipping the label-based metrics", reason)
    scoring_test = split == schema.TEST  # validation scores a choice of settings: no plots, no report
    # One BLAS/OpenMP thread for the whole evaluation. The probes and t-SNE limit it too, from two
    # threads at once (the plots draw beside the stages), and threadpoolctl's limit is process-wide:
    # nested in this one, every limit they leave restores 1, and this one restores the caller's.
    with input_pipeline.reading(context.manifest), threadpool_limits(limits=probes.SKLEARN_BLAS_THREADS), \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bmvae-plots") as background:
        plotted = _start_plots(context, background) if scoring_test else None
        for stage in STAGES:
            if unlabelled and stage.needs_labels:
                context.metrics.skipped.update({key: reason for key in stage.needs_labels})
            else:
                stage.run(context)
        written_plots = plotted.result() if plotted else []  # a plotting error is raised here
    written = context.paths.metrics_for(split)
    if not scoring_test:  # the run's test record, plots and report stay as they are
        context.metrics.write(written)
        logger.info("wrote %s in %.1f s", written, time.perf_counter() - started)
        return context.metrics.to_json()
    _finish_plots(context, written_plots)
    context.metrics.write(written)
    summaries.write_hparams(workdir, context.metrics.to_json())  # TensorBoard's HPARAMS table
    logger.info("wrote %s in %.1f s", written, time.perf_counter() - started)
    logger.info("wrote %s", report.write_run_report(workdir))
    return context.metrics.to_json()


def _context(workdir: str, data_dir: str | None, overrides: Sequence[str], split: str) -> EvalContext:
    """The run's model (latest or best checkpoint), data and history, and an empty record."""
    if split not in schema.EVALUATION_SPLITS:
        raise UserError(f"--split {split!r}: evaluate scores one of {list(schema.EVALUATION_SPLITS)}")
    paths = run_dir.RunPaths(workdir)
    config, manifest, model = run_dir.load_trained_model(workdir, data_dir)
    if split not in manifest.splits:
        raise UserError(f"--split {split}: {schema.manifest_path(manifest.directory)} has no {split} split "
                        f"(built before validation splits existed); rebuild it with "
                        f"`{inputs.rebuild_command(manifest)}`")
    config = with_eval_overrides(config, overrides)
    history = run_dir.read_history(paths)
    weights = model.mixture_weights()
    seconds = [float(h["seconds"]) for h in history if h.get("seconds") is not None]
    metrics = Metrics(
        model=config.model.name, dataset=manifest.name, modalities=manifest.modality_names,
        epochs=int(history[-1]["epoch"]) if history else 0, split=split,
        seconds_per_epoch=float(np.mean(seconds)) if seconds else None,
        mixture_weights=None if weights is None else np.asarray(weights).tolist())
    return EvalContext(model=model, manifest=manifest, eval=config.eval, seed=config.train.seed,
                       paths=paths, history=history, metrics=metrics, split=split)


def with_eval_overrides(config: config_lib.Config, overrides: Sequence[str]) -> config_lib.Config:
    """`config` with `eval.key=value` overrides applied and validated; other keys are errors,
    because the model and data of a trained run are fixed."""
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("eval."):
            raise UserError(f"--set {item!r}: evaluate takes only eval.* keys")
    if not overrides:
        return config
    data = config_lib.apply_overrides(config_lib.to_dict(config), list(overrides))
    return config_lib.from_dict(data, source="--set")


def cross_generations(model, inputs, seed: int, num_samples: int = PLOT_SAMPLES) -> dict[str, dict[str, np.ndarray]]:
    """{given: {target: [num_samples, n, *shape]}}: every modality generated from each single
    modality, from `num_samples` posterior samples per example (stream
    EvalStream.CROSS_GENERATION_PLOT, which no metric reads)."""
    names = [spec.name for spec in model.modalities]

    def generate(masked, present, sample_seed):
        z = model.posterior(masked, present).sample(num_samples, seed=sample_seed)   # [k, n, D]
        return {target: value.numpy() for target, value in model.generate(z).items()}

    _, out = next(subsets_lib.run_subsets(
        subsets_lib.masked_step(model.modalities, generate, traced=False), [inputs], names,
        [[given] for given in names], seed=subsets_lib.stream_seed(seed, EvalStream.CROSS_GENERATION_PLOT),
        scheme=subsets_lib.SeedScheme.SUBSET))
    return out


def prior_generations(model, num: int, seed: int) -> dict[str, np.ndarray]:
    """{modality: [num, *shape]} decoded from `num` prior latents (stream
    EvalStream.PRIOR_SAMPLE_PLOT: the latents random coherence scores are drawn elsewhere)."""
    z = model.prior().sample([num], seed=subsets_lib.stream_seed(seed, EvalStream.PRIOR_SAMPLE_PLOT))
    return {name: value.numpy() for name, value in model.generate(tf.reshape(z, [num, model.latent_dim])).items()}


def _embedding_means(context: EvalContext) -> tuple[dict[str, np.ndarray], np.ndarray | None, list | None]:
    """The single-modality posterior means of the first EMBEDDING_EXAMPLES test examples, their
    labels and the class names: the metrics' cached encodings on labelled data, where the stages
    need them anyway, else a pass without sampling."""
    if context.manifest.label is not None:  # the label-based stages encode the test split anyway
        latents = context.test_latents
    else:
        latents = encodings.encode_split(context.model, context.batches("test", limit=EMBEDDING_EXAMPLES))
    means = {n: latents.means[n][:EMBEDDING_EXAMPLES] for n in context.names}
    labels = None if latents.labels is None else latents.labels[:EMBEDDING_EXAMPLES]
    label = context.manifest.label
    return means, labels, (list(label.names) if label is not None and label.names else None)


def _start_plots(context: EvalContext, background: concurrent.futures.Executor) -> concurrent.futures.Future:
    """Starts RUN/plots' figures that need no metric (all but robustness) on `background`.

    What they need from TensorFlow is computed here, on the calling thread: a batch of test
    examples, their cross generations, decoded prior samples and the embedding's posterior means
    (with labels, the stages' cached test encodings, made now if no stage has yet). The drawing
    (t-SNE, matplotlib, PNG encoding) takes no TensorFlow and mostly runs outside the GIL, so it
    overlaps the metric stages on a second core. Returns the future of the paths written."""
    examples = next(iter(context.batches("test", PLOT_EXAMPLES, PLOT_EXAMPLES)))
    inputs = {n: examples[n] for n in context.names}
    weights = context.model.mixture_weights()
    return background.submit(
        plots.write_plots, context.paths.plots, context.manifest.modalities,
        weights=None if weights is None else np.asarray(weights), history=context.history,
        inputs={n: v.numpy() for n, v in inputs.items()},
        generated=cross_generations(context.model, inputs, context.seed),
        prior_generated=prior_generations(context.model, PLOT_EXAMPLES, context.seed),
        embedding=_embedding_means(context))


def _finish_plots(context: EvalContext, written: list[str]) -> None:
    """Adds the robustness figure, which needs the metrics, to the figures `_start_plots` wrote."""
    written = list(written)
    if context.metrics.robustness is not None:
        written.append(os.path.join(context.paths.plots, plots.ROBUSTNESS))
        plots.save_figure(plots.robustness_figure(context.metrics.robustness), written[-1])
    logger.info("wrote %s", ", ".join(written))
