"""The PNGs of `bmvae evaluate` in RUN/plots/ (SPEC section 1).

- mixture_weights.png: the D x M weights of BMVAE models (alpha for BMVAE_M, E[pi] for BMVAE_P);
- cross_generation.png: a few test examples, each modality given alone, and what the model
  generates for every modality from it (the diagonal is reconstruction);
- training_curve.png: loss and val_loss per epoch from RUN/history.jsonl;
- robustness.png: latent accuracy of every subset against the input noise level, with the
  raw-input baseline dashed (trainers/evaluation/robustness.py).

`bmvae analyze` (trainers/analysis.py) adds the dimension-swap grids and the factor R^2 heatmap
in RUN/analysis/; `bmvae compare` overlays the training and robustness curves of several runs.

The `*_figure` helpers are pure (arrays in, a matplotlib Figure out) and never touch pyplot's
global state, so they are safe in threads and tests; `save_figure` writes atomically.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from matplotlib import patches as matplotlib_patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bmvae_tf import atomic, schema

MIXTURE_WEIGHTS = "mixture_weights.png"
CROSS_GENERATION = "cross_generation.png"
TRAINING_CURVE = "training_curve.png"
ROBUSTNESS = "robustness.png"

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)  # Agg renders PNGs without a display or pyplot
    return figure


def mixture_weights_figure(weights: np.ndarray, modality_names: Sequence[str]) -> Figure:
    """Heatmap of weights [D, M]: modalities on x, latent dimensions on y, values in [0, 1]."""
    weights = np.asarray(weights)
    latent_dim, num_modalities = weights.shape
    figure = _new_figure(1.2 * num_modalities + 2.0, min(0.25 * latent_dim + 1.5, 12.0))
    ax = figure.add_subplot()
    image = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(range(num_modalities), labels=list(modality_names))
    if latent_dim <= 40:
        ax.set_yticks(range(latent_dim), labels=[str(d + 1) for d in range(latent_dim)])
    ax.set_xlabel("modality")
    ax.set_ylabel("latent dimension d")
    ax.set_title("mixture weights")
    figure.colorbar(image, ax=ax, label="weight")
    figure.tight_layout()
    return figure


def training_curve_figure(history: Sequence[Mapping]) -> Figure:
    """loss and val_loss against the 1-based epoch of each history.jsonl record."""
    epochs = [int(h["epoch"]) for h in history]
    figure = _new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    ax.plot(epochs, [h.get("loss") for h in history], marker="o", label="loss")
    validated = [(e, h["val_loss"]) for e, h in zip(epochs, history) if h.get("val_loss") is not None]
    if validated:
        ax.plot(*zip(*validated), marker="o", label="val_loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative objective per example")
    ax.set_title("training curve")
    ax.legend()
    figure.tight_layout()
    return figure


def robustness_figure(robustness: Mapping) -> Figure:
    """Accuracy against noise level per subset, from metrics.json's "robustness" entry; the
    baseline of each subset (same colour) dashed."""
    levels = robustness["noise_levels"]
    figure = _new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    baseline = robustness.get("baseline_accuracy") or {}
    for i, (key, curve) in enumerate(robustness["latent_accuracy"].items()):
        line, = ax.plot(levels, curve, marker="o", markersize=3, label=key, color=f"C{i % 10}")
        if key in baseline:
            ax.plot(levels, baseline[key], linestyle="--", linewidth=0.8, color=line.get_color())
    ax.set_xlabel("noise level")
    ax.set_ylabel("latent accuracy (test)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("robustness (dashed: linear probe on the raw inputs)")
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def runs_training_curves_figure(histories: Mapping[str, Sequence[Mapping]]) -> Figure:
    """loss (solid) and val_loss (dashed) per epoch of several runs {label: history records}."""
    figure = _new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    for i, (label, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        epochs = [int(h["epoch"]) for h in history]
        ax.plot(epochs, [h.get("loss") for h in history], color=colour, label=label)
        validated = [(e, h["val_loss"]) for e, h in zip(epochs, history) if h.get("val_loss") is not None]
        if validated:
            ax.plot(*zip(*validated), color=colour, linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative objective per example")
    ax.set_title("training curves (dashed: val_loss)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def runs_robustness_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                           subset: str) -> Figure:
    """Latent accuracy against noise level of several runs {label: (levels, accuracy)}."""
    figure = _new_figure(7.0, 4.5)
    ax = figure.add_subplot()
    for label, (levels, accuracy) in curves.items():
        ax.plot(levels, accuracy, marker="o", markersize=3, label=label)
    ax.set_xlabel("noise level")
    ax.set_ylabel(f"latent accuracy of {subset} (test)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("robustness")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def heatmap_figure(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
                   title: str, colour_label: str, vmin: float = 0.0, vmax: float = 1.0,
                   marked: Sequence[tuple[int, int]] = ()) -> Figure:
    """A [rows, cols] heatmap with each value written in its cell; `marked` (row, col) cells are
    outlined."""
    values = np.asarray(values, np.float64)
    rows, cols = values.shape
    figure = _new_figure(0.9 * cols + 3.0, min(0.32 * rows + 1.8, 14.0))
    ax = figure.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    ax.set_xticks(range(cols), labels=list(col_labels), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(rows), labels=list(row_labels), fontsize=8)
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                v = values[r, c]
                ax.text(c, r, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if v < (vmin + vmax) / 2 else "black")
    for r, c in marked:
        ax.add_patch(matplotlib_patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False,
                                                  edgecolor="red", linewidth=1.5))
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label=colour_label)
    figure.tight_layout()
    return figure


def swap_grid_figure(spec: schema.ModalitySpec, inputs: np.ndarray, reconstructions: np.ndarray,
                     variants: np.ndarray, title: str) -> Figure:
    """Rows: examples. Columns: the input, its reconstruction from the unchanged latent, then
    each variant decoded from a latent with some dimensions resampled.

    inputs, reconstructions: [n, *shape]; variants: [n, k, *shape].
    """
    num, count = variants.shape[:2]
    cols = 2 + count
    figure = _new_figure(1.1 * cols + 0.5, 1.1 * num + 0.8)
    for i in range(num):
        cells = [inputs[i], reconstructions[i], *variants[i]]
        for j, value in enumerate(cells):
            ax = figure.add_subplot(num, cols, i * cols + j + 1)
            _draw(ax, spec, value)
            if i == 0:
                ax.set_title(("input", "recon.")[j] if j < 2 else f"#{j - 1}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (for reports that embed their images)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def decode_tokens(tokens: Sequence[int], vocab: Sequence[str]) -> str:
    """Token ids [L] -> text. Drops `<pad>`, stops at `<eos>`; characters are joined without
    spaces, word vocabularies (CUB) with spaces. Out-of-range ids show as '?'."""
    characters = all(len(symbol) == 1 for symbol in vocab if not _is_special(symbol))
    symbols = []
    for token in np.asarray(tokens).ravel():
        symbol = vocab[token] if 0 <= token < len(vocab) else "?"
        if symbol == "<eos>":
            break
        if symbol != "<pad>":
            symbols.append(symbol)
    return ("" if characters else " ").join(symbols)


def _is_special(symbol: str) -> bool:
    return len(symbol) > 2 and symbol.startswith("<") and symbol.endswith(">")


def _draw(ax, spec: schema.ModalitySpec, value: np.ndarray) -> None:
    """One example of a modality in one grid cell."""
    ax.set_xticks([])
    ax.set_yticks([])
    if spec.kind == "image":
        image = np.clip(np.asarray(value, np.float32), 0.0, 1.0)
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(image[..., :3])
    elif spec.kind == "sequence":
        ax.text(0.5, 0.5, repr(decode_tokens(value, spec.vocab)), ha="center", va="center",
                family="monospace", fontsize=8, wrap=True, transform=ax.transAxes)
    else:
        ax.plot(np.asarray(value).ravel(), linewidth=0.8)


def cross_generation_figure(specs: Sequence[schema.ModalitySpec], inputs: Mapping[str, np.ndarray],
                            generated: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """A grid of n examples x M given modalities (rows) by 1 + M columns.

    Args:
      specs: the modalities, in manifest order.
      inputs: {modality: [n, *shape]} real test examples.
      generated: {given modality: {target modality: [n, *shape]}}: what the model generates for
        each target from the given modality alone (targets include the given one).
    """
    names = [spec.name for spec in specs]
    num_examples = len(next(iter(inputs.values())))
    rows, cols = num_examples * len(specs), 1 + len(specs)
    figure = _new_figure(1.7 * cols, 1.3 * rows)
    for i in range(num_examples):
        for m, given in enumerate(specs):
            row = i * len(specs) + m
            ax = figure.add_subplot(rows, cols, row * cols + 1)
            _draw(ax, given, inputs[given.name][i])
            ax.set_ylabel(f"#{i} {given.name}", fontsize=8)
            if row == 0:
                ax.set_title("given", fontsize=9)
            for t, target in enumerate(specs):
                ax = figure.add_subplot(rows, cols, row * cols + 2 + t)
                _draw(ax, target, generated[given.name][target.name][i])
                if row == 0:
                    ax.set_title(f"-> {names[t]}", fontsize=9)
    figure.suptitle("cross generation (rows: example and given modality)", fontsize=10)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str) -> None:
    """Publishes the figure as a PNG at `path`."""
    atomic.write_bytes(path, figure_png(figure))


def write_plots(directory: str, specs: Sequence[schema.ModalitySpec], *,
                weights: np.ndarray | None, history: Sequence[Mapping],
                inputs: Mapping[str, np.ndarray],
                generated: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
    """Writes every plot that has data into `directory`; returns the paths written.

    weights: [D, M] or None (no mixture weights: no heatmap). history: history.jsonl records
    (empty: no training curve). inputs, generated: as `cross_generation_figure`.
    """
    tf.io.gfile.makedirs(directory)
    figures = {CROSS_GENERATION: cross_generation_figure(specs, inputs, generated)}
    if weights is not None:
        figures[MIXTURE_WEIGHTS] = mixture_weights_figure(weights, [spec.name for spec in specs])
    if history:
        figures[TRAINING_CURVE] = training_curve_figure(history)
    written = []
    for filename, figure in figures.items():
        path = os.path.join(directory, filename)
        save_figure(figure, path)
        written.append(path)
    return written
