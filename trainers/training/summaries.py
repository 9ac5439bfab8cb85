"""TensorBoard in RUN/logs, as the official MMVAE and mmJSD code use it.

Tags (every scalar's step is the global optimisation step):
- `loss`, `val_loss`: the epoch's mean training objective and the validation objective
  (`history.History`, as before);
- every `train.log_every_steps` steps: `train/<term>`, each of the model's `LossTerms.metrics`
  (bound, reconstruction, kl_mixture, ...) on that step's batch (`steps.make_terms_step`);
  `train/loss`, the mean loss since the previous log line (progress.jsonl's); `learning_rate`;
- per epoch, `epoch/train/<term>`: the mean of the terms computed in the epoch (at its log
  steps, its last step and the run's first); `epoch/val/<term>`: the terms over all the
  validation examples (both are history.jsonl's "terms");
- once per epoch: `mixture_weights` (image: the D x M weights of BMVAE models in colours that
  diverge around 1/M) and `mixture_weights/<modality>` (histograms of the D weights);
  `cross_generation` (image: validation examples, each modality given alone, and every modality
  generated from it) and `prior_samples` (image: latents of the prior decoded into every
  modality); sequences are rendered as text;
- after `bmvae evaluate`: the HParams plugin's session (`write_hparams`): the run's config
  values as hyper-parameters and the headline metrics as `eval/<metric>` scalars, so the runs of
  a comparison line up in one table.

Only the chief writes. Pictures draw from stateless seeds (`TrainingStream.SUMMARY_IMAGES`), so
they never touch the training's random state; matplotlib is imported when the first is drawn.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.random_streams import TrainingStream
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import run_dir
from bmvae_tf.trainers.evaluation.subsets import mask_inputs

log = logging.getLogger("bmvae.train")

IMAGE_EXAMPLES = 4  # validation examples in the cross-generation image
PRIOR_SAMPLES = 8  # rows of the prior-sample image


class TermMeans:
    """The loss terms of some steps (device tensors), averaged only when asked."""

    def __init__(self):
        self._values: dict[str, list[tf.Tensor]] = {}

    def add(self, metrics: Mapping[str, tf.Tensor]) -> None:
        for name, value in metrics.items():
            self._values.setdefault(name, []).append(value)

    def means(self, prefix: str = "") -> dict[str, float]:
        """{prefix + name: mean since the last `clear`}, as Python floats."""
        return {prefix + name: float(tf.reduce_mean(tf.stack(values)))
                for name, values in self._values.items() if values}

    def clear(self) -> None:
        self._values = {}


def write_scalars(writer, step: int, values: Mapping[str, float]) -> None:
    """One scalar per tag at `step` (no-op writers write nothing)."""
    with writer.as_default(step=step):
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                tf.summary.scalar(tag, value)


def learning_rate(optimizer) -> float:
    """The optimizer's current learning rate (a LossScaleOptimizer forwards its inner one)."""
    return float(tf.convert_to_tensor(optimizer.learning_rate))


class ModelImages:
    """The per-epoch pictures of a model: mixture weights, cross generation, prior samples.

    examples: {modality: [n, *shape]} numpy arrays shown in the cross-generation grid (None: no
    grid). seed: the run's seed; the pictures' draws are the same at every epoch, so they show
    how the model changes.
    """

    def __init__(self, model, specs: Sequence[schema.ModalitySpec],
                 examples: Mapping[str, np.ndarray] | None, seed: int):
        self.model, self.specs, self.examples = model, tuple(specs), examples
        self.seed = tf.constant([seed, TrainingStream.SUMMARY_IMAGES], tf.int32)

    def write(self, writer, step: int) -> None:
        with writer.as_default(step=step):
            weights = self.model.mixture_weights()
            if weights is not None:
                weights = np.asarray(weights, np.float32)
                tf.summary.image("mixture_weights", _png_tensor(mixture_weights_figure(
                    weights, [s.name for s in self.specs])))
                for m, spec in enumerate(self.specs):
                    tf.summary.histogram(f"mixture_weights/{spec.name}", weights[:, m])
            if self.examples is not None:
                tf.summary.image("cross_generation", _png_tensor(self._cross_generation()))
            tf.summary.image("prior_samples", _png_tensor(self._prior_samples()))

    def _cross_generation(self):
        """Rows: example i given modality m alone; columns: the input, then every modality."""
        names = [s.name for s in self.specs]
        inputs = {n: tf.convert_to_tensor(self.examples[n]) for n in names}
        count = len(next(iter(self.examples.values())))
        rows = []
        for m, given in enumerate(self.specs):
            present = tf.constant([n == given.name for n in names])
            z = self.model.posterior(mask_inputs(inputs, present, names), present).sample(
                seed=tf.random.experimental.stateless_fold_in(self.seed, m))
            generated = {k: np.asarray(v) for k, v in self.model.generate(z).items()}
            for i in range(count):
                cells = [(given, self.examples[given.name][i])]
                cells += [(target, generated[target.name][i]) for target in self.specs]
                rows.append((f"#{i} {given.name}", cells))
        return grid_figure(rows, ["given"] + [f"-> {n}" for n in names],
                           "cross generation (rows: example and given modality)")

    def _prior_samples(self):
        """Rows: a latent of the prior; columns: every modality decoded from it."""
        z = self.model.prior().sample([PRIOR_SAMPLES], seed=tf.random.experimental.stateless_fold_in(
            self.seed, len(self.specs)))
        z = tf.reshape(z, [PRIOR_SAMPLES, self.model.latent_dim])
        generated = {k: np.asarray(v) for k, v in self.model.generate(z).items()}
        rows = [(f"z{i}", [(s, generated[s.name][i]) for s in self.specs]) for i in range(PRIOR_SAMPLES)]
        return grid_figure(rows, [s.name for s in self.specs], "samples of the prior")


def read_examples(dataset: tf.data.Dataset, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The first batch of `dataset` as {modality: numpy array}, or None if it is empty."""
    for batch in dataset.take(1):
        return {n: batch[n].numpy() for n in names}
    return None


# ------------------------------------------------------------------------------ figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(figure)
    return figure


def _png_tensor(figure) -> tf.Tensor:
    """The figure as a [1, H, W, 4] uint8 image for tf.summary.image."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return tf.image.decode_png(buffer.getvalue(), channels=4)[None]


def mixture_weights_figure(weights: np.ndarray, modality_names: Sequence[str]):
    """Heatmap of weights [D, M] in colours diverging around the uniform weight 1/M (white), the
    scale spanning the largest deviation from it: weights of 0.30-0.39 must not all look alike."""
    from matplotlib.colors import TwoSlopeNorm

    latent_dim, num_modalities = weights.shape
    figure = _new_figure(1.2 * num_modalities + 2.0, min(0.25 * latent_dim + 1.5, 12.0))
    ax = figure.add_subplot()
    uniform = 1.0 / num_modalities
    spread = max(float(np.max(np.abs(weights - uniform))), 0.01)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=max(uniform - spread, 0.0) - 1e-6,
                        vmax=min(uniform + spread, 1.0) + 1e-6)
    image = ax.imshow(weights, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_xticks(range(num_modalities), labels=list(modality_names))
    ax.set_xlabel("modality")
    ax.set_ylabel("latent dimension")
    ax.set_title(f"mixture weights (white: 1/M = {uniform:.2f})")
    figure.colorbar(image, ax=ax, label="weight")
    figure.tight_layout()
    return figure


def grid_figure(rows: Sequence[tuple[str, Sequence[tuple[schema.ModalitySpec, np.ndarray]]]],
                titles: Sequence[str], title: str):
    """A grid of cells: each row is (label, [(spec, value), ...]); images as images, sequences
    as their text, vectors as line plots. Drawn on one axes (reporting.plots.draw_cell): as
    one subplot per cell, the six-view set's 216 cells took ~10 s per epoch on 2 cores, ten times
    the epoch's training."""
    from bmvae_tf.trainers.reporting import plots

    cols = len(titles)
    figure = _new_figure(1.5 * cols, 1.05 * len(rows) + 0.5)
    ax = plots.grid_axes(figure, len(rows), cols, top=0.5)
    for r, (label, cells) in enumerate(rows):
        for c, (spec, value) in enumerate(cells):
            plots.draw_cell(ax, r, c, spec, value, fontsize=7)
        ax.text(-0.05, r + 0.5, label, ha="right", va="center", fontsize=7, rotation=90)
    for c, text in enumerate(titles):
        ax.text(c + 0.5, -0.05, text, ha="center", va="bottom", fontsize=8)
    figure.suptitle(title, fontsize=9, y=0.995)
    return figure


# ------------------------------------------------------------------------------ HParams


def hparam_values(config: Mapping) -> dict[str, bool | int | float | str]:
    """The config as flat `section.key` hyper-parameters (lists and None as their text)."""
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    visit("", config)
    return flat


def headline_metrics(metrics: Mapping) -> dict[str, float]:
    """metrics.json's numbers as `eval/<metric>[/<key>]` tags (robustness curves and the
    mixture weights, which are not single numbers, are left to report.html)."""
    out = {}
    for name in ("random_coherence", "random_coherence_gmm", "joint_log_likelihood", "seconds_per_epoch"):
        if isinstance(metrics.get(name), (int, float)):
            out[f"eval/{name}"] = float(metrics[name])
    for name in ("latent_accuracy", "coherence", "log_likelihood", "conditional_log_likelihood",
                 "classifier_accuracy", "cca_coherence"):
        for key, value in (metrics.get(name) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval/{name}/{key}"] = float(value)
    return out


def write_hparams(workdir: str, metrics: Mapping) -> None:
    """The HParams plugin's session of run `workdir` in RUN/logs: its resolved config
    (RUN/config.yaml) as hyper-parameters and the headline metrics of `metrics` (metrics.json)
    as scalars at the run's last step, so TensorBoard's HPARAMS tab lists every run under its
    --logdir in one table."""
    from tensorboard.plugins.hparams import api as hp

    paths = run_dir.RunPaths(workdir)
    config = config_lib.to_dict(run_dir.read_config(paths))
    history = run_dir.read_history(paths)
    step = int(history[-1]["step"]) if history else 0
    writer = tf.summary.create_file_writer(paths.logs)
    with writer.as_default(step=step):
        hp.hparams(hparam_values(config), trial_id=os.path.basename(os.path.normpath(workdir)))
        for tag, value in headline_metrics(metrics).items():
            if math.isfinite(value):
                tf.summary.scalar(tag, value)
    writer.close()
