"""The PNGs of `bmvae evaluate` in RUN/plots/ (SPEC section 1).

- mixture_weights.png: the D x M weights of BMVAE models (alpha for BMVAE_M, E[pi] for BMVAE_P),
  colours diverging around the uniform weight 1/M;
- cross_generation_<given>.png: 10 test examples of one modality given alone, and 5 posterior
  samples of every modality generated from each (the given modality's own are reconstructions);
- prior_samples.png: every modality decoded from the same latents drawn from the prior;
- latent_embedding.png: a 2-D t-SNE of the single-modality posterior means of test examples,
  coloured by class and by encoding modality;
- training_curve.png: the loss, and each loss term history.jsonl records, per epoch;
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
from matplotlib import colormaps as matplotlib_colormaps
from matplotlib import colors as matplotlib_colors
from matplotlib import lines as matplotlib_lines
from matplotlib import patches as matplotlib_patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bmvae_tf import atomic, schema

MIXTURE_WEIGHTS = "mixture_weights.png"
PRIOR_SAMPLES = "prior_samples.png"
LATENT_EMBEDDING = "latent_embedding.png"
TRAINING_CURVE = "training_curve.png"
ROBUSTNESS = "robustness.png"

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)  # Agg renders PNGs without a display or pyplot
    return figure


def mixture_weights_figure(weights: np.ndarray, modality_names: Sequence[str],
                           private: Mapping[str, Sequence[int]] | None = None) -> Figure:
    """Heatmap of weights [D, M]: modalities on x, latent dimensions on y.

    The colours diverge around the uniform weight 1/M (white), red above and blue below, over
    the range the weights span: learned weights sit close to 1/M, and a 0-1 scale would show them
    as one colour. private: {modality: 0-based dimensions} (`bmvae analyze`) outlined in black;
    the other dimensions are shared.
    """
    weights = np.asarray(weights, np.float64)
    latent_dim, num_modalities = weights.shape
    uniform = 1.0 / num_modalities
    spread = max(float(np.max(np.abs(weights - uniform))), 1e-3)
    norm = matplotlib_colors.TwoSlopeNorm(vcenter=uniform, vmin=uniform - spread, vmax=uniform + spread)
    figure = _new_figure(1.1 * num_modalities + 2.6, min(0.26 * latent_dim + 1.6, 12.0))
    ax = figure.add_subplot()
    image = ax.imshow(weights, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_xticks(range(num_modalities), labels=list(modality_names))
    if latent_dim <= 40:
        ax.set_yticks(range(latent_dim), labels=[str(d + 1) for d in range(latent_dim)], fontsize=7)
    if latent_dim * num_modalities <= 400:
        for d in range(latent_dim):
            for m in range(num_modalities):
                dark = abs(norm(weights[d, m]) - 0.5) > 0.3  # far from 1/M: a dark cell
                ax.text(m, d, f"{weights[d, m]:.3f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    title = f"mixture weights (white: uniform 1/M = {uniform:.3f})"
    if private is not None:
        names = list(modality_names)
        for modality, dims in private.items():
            for d in dims:
                ax.add_patch(matplotlib_patches.Rectangle((names.index(modality) - 0.5, d - 0.5), 1, 1,
                                                          fill=False, edgecolor="black", linewidth=1.8))
        shared = latent_dim - sum(len(v) for v in private.values())
        title += f"\noutlined: private to that modality; {shared} of {latent_dim} dimensions shared"
    ax.set_xlabel("modality")
    ax.set_ylabel("latent dimension d")
    ax.set_title(title, fontsize=9)
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


def loss_term_names(history: Sequence[Mapping]) -> list[str]:
    """The loss terms history.jsonl records under "terms" ({"train/<term>": v, "val/<term>": v}),
    in first-seen order; none for runs trained before the terms were recorded."""
    names: list[str] = []
    for record in history:
        for key in record.get("terms") or {}:
            term = key.split("/", 1)[-1]
            if term not in names:
                names.append(term)
    return names


def loss_terms_figure(history: Sequence[Mapping]) -> Figure:
    """One panel per loss term (train solid, validation dashed) against the epoch, the total
    loss first; a run without recorded terms gets the total loss alone."""
    epochs = [int(h["epoch"]) for h in history]
    panels = [("loss (negative objective)", [h.get("loss") for h in history],
               [h.get("val_loss") for h in history])]
    for term in loss_term_names(history):
        panels.append((term, [(h.get("terms") or {}).get(f"train/{term}") for h in history],
                       [(h.get("terms") or {}).get(f"val/{term}") for h in history]))
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    figure = _new_figure(max(3.6 * cols + 0.4, 6.5), 2.7 * rows + 0.6)
    for i, (title, train, val) in enumerate(panels):
        ax = figure.add_subplot(rows, cols, i + 1)
        for values, style, label in ((train, "-", "train"), (val, "--", "validation")):
            points = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if points:
                ax.plot(*zip(*points), linestyle=style, marker="o", markersize=2.5, label=label,
                        color="C0" if label == "train" else "C1")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    figure.suptitle("loss per epoch" + ("" if len(panels) > 1 else
                                        "\n(this run's history.jsonl records no per-term values)"),
                    fontsize=9)
    figure.tight_layout()
    return figure


def coherence_matrix_figure(coherence: Mapping[str, float | None], modality_names: Sequence[str],
                            random_coherence: float | None = None) -> Figure:
    """metrics.json's coherence {"target|given": v} as a matrix: targets (rows) by given subsets
    (columns), grey where the target is given."""
    givens: list[str] = []
    for key in coherence:
        given = key.split("|", 1)[1]
        if given not in givens:
            givens.append(given)
    targets = list(modality_names)
    values = np.full((len(targets), len(givens)), np.nan)
    for key, value in coherence.items():
        target, given = key.split("|", 1)
        if target in targets and value is not None:
            values[targets.index(target), givens.index(given)] = value
    figure = _new_figure(0.95 * len(givens) + 2.8, 0.55 * len(targets) + 2.0)
    ax = figure.add_subplot()
    ax.set_facecolor("#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(range(len(givens)), labels=givens, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(targets)), labels=targets, fontsize=8)
    for r in range(len(targets)):
        for c in range(len(givens)):
            if not np.isnan(values[r, c]):
                ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if values[r, c] < 0.5 else "black")
    ax.set_xlabel("given modalities")
    ax.set_ylabel("generated (target)")
    title = "cross coherence: target | given (grey: target given)"
    if random_coherence is not None:
        title += f"\nrandom coherence from the prior: {random_coherence:.2f}"
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, label="coherence")
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
    each variant decoded from a latent with some dimensions resampled (outlined in colour).
    Drawn on one axes (`draw_cell`).

    inputs, reconstructions: [n, *shape]; variants: [n, k, *shape].
    """
    num, count = variants.shape[:2]
    cols = 2 + count
    figure = _new_figure(1.1 * cols + 0.5, 1.1 * num + 0.8)
    ax = grid_axes(figure, num, cols, top=0.6)
    for i in range(num):
        for j, value in enumerate([inputs[i], reconstructions[i], *variants[i]]):
            draw_cell(ax, i, j, spec, value, fontsize=8, edgecolor="black" if j < 2 else "C0")
    for j in range(cols):
        ax.text(j + 0.5, -0.05, ("input", "recon.")[j] if j < 2 else f"#{j - 1}", ha="center", va="bottom",
                fontsize=8)
    figure.suptitle(title, fontsize=9, y=0.995)
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


_GAP = 0.08  # between the cells of a grid, in cell widths
TSNE_MIN_POINTS = 300  # fewer points in the latent embedding: PCA


def draw_cell(ax, row: int, col: int, spec: schema.ModalitySpec, value: np.ndarray, *,
               fontsize: float, edgecolor: str = "black") -> None:
    """One example of a modality in cell (row, col) of a grid drawn on ONE axes: a grid of
    hundreds of cells as separate subplots takes seconds to render, this a fraction of one."""
    x0, y0, size = col + _GAP / 2, row + _GAP / 2, 1.0 - _GAP
    if spec.kind == "image":
        image = np.clip(np.asarray(value, np.float32), 0.0, 1.0)
        extent = (x0, x0 + size, y0 + size, y0)
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
        else:
            ax.imshow(image[..., :3], extent=extent, interpolation="nearest")
    elif spec.kind == "sequence":
        ax.text(x0 + size / 2, y0 + size / 2, repr(decode_tokens(value, spec.vocab)), ha="center",
                va="center", family="monospace", fontsize=fontsize, clip_on=True)
    else:
        values = np.asarray(value, np.float64).ravel()
        low, high = float(np.min(values)), float(np.max(values))
        scaled = (values - low) / (high - low) if high > low else np.full_like(values, 0.5)
        ax.plot(x0 + 0.05 + 0.9 * size * np.linspace(0.0, 1.0, len(values)),
                y0 + size * (0.95 - 0.9 * scaled), linewidth=0.6, color="C0")
    ax.add_patch(matplotlib_patches.Rectangle((x0, y0), size, size, fill=False, edgecolor=edgecolor,
                                              linewidth=0.8))


def grid_axes(figure: Figure, rows: int, cols: int, top: float):
    """One axes for a rows x cols grid of cells (row 0 at the top), `top` inches left for headers."""
    height = figure.get_figheight()
    ax = figure.add_axes((0.05, 0.01, 0.94, 1.0 - 0.01 - top / height))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("auto")
    ax.axis("off")
    return ax


def cross_generation_figure(specs: Sequence[schema.ModalitySpec], given: str, inputs: np.ndarray,
                            generated: Mapping[str, np.ndarray]) -> Figure:
    """n test examples (rows) of modality `given`, and k samples of every modality generated from
    it alone: columns are the input, then k per target (the given modality's own are
    reconstructions).

    Args:
      specs: the modalities, in manifest order.
      given: the name of the given modality.
      inputs: [n, *shape] real test examples of `given`.
      generated: {target: [k, n, *shape]} decoded from k posterior samples per example.
    """
    by_name = {spec.name: spec for spec in specs}
    num_samples, num_examples = next(iter(generated.values())).shape[:2]
    cols = 1 + len(specs) * num_samples
    figure = _new_figure(0.72 * cols + 0.6, 0.72 * num_examples + 0.9)
    ax = grid_axes(figure, num_examples, cols, top=0.75)
    for i in range(num_examples):
        draw_cell(ax, i, 0, by_name[given], inputs[i], fontsize=6.5)
        ax.text(-0.1, i + 0.5, f"#{i + 1}", ha="right", va="center", fontsize=7)
        for t, target in enumerate(specs):
            for k in range(num_samples):
                draw_cell(ax, i, 1 + t * num_samples + k, target, generated[target.name][k, i],
                           fontsize=6.5, edgecolor=f"C{t % 10}")
    ax.text(0.5, -0.1, f"given\n{given}", ha="center", va="bottom", fontsize=7)
    for t, target in enumerate(specs):
        for k in range(num_samples):
            ax.text(1.5 + t * num_samples + k, -0.1, f"{target.name}\n#{k + 1}", ha="center", va="bottom",
                    fontsize=7, color=f"C{t % 10}")
    figure.suptitle(f"cross generation from {given} alone: {num_examples} test examples x "
                    f"{num_samples} posterior samples per target", fontsize=9, y=0.995)
    return figure


def cross_generation_filename(given: str) -> str:
    return f"cross_generation_{given}.png"


def prior_samples_figure(specs: Sequence[schema.ModalitySpec], generated: Mapping[str, np.ndarray]) -> Figure:
    """Every modality (rows) decoded from the same n latents drawn from the prior (columns): the
    joint generation that random coherence scores."""
    num = len(next(iter(generated.values())))
    figure = _new_figure(0.85 * num + 1.0, 0.85 * len(specs) + 0.75)
    ax = grid_axes(figure, len(specs), num, top=0.55)
    for m, spec in enumerate(specs):
        ax.text(-0.1, m + 0.5, spec.name, ha="right", va="center", fontsize=8, rotation=90)
        for j in range(num):
            draw_cell(ax, m, j, spec, generated[spec.name][j], fontsize=7)
    for j in range(num):
        ax.text(j + 0.5, -0.1, f"z #{j + 1}", ha="center", va="bottom", fontsize=7)
    figure.suptitle(f"joint generation from {num} prior samples z ~ p(z) (one column per z)", fontsize=9, y=0.99)
    return figure


def embed_2d(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """points [n, D] -> ([n, 2], how): t-SNE (initialised by PCA, perplexity at most 30) from
    TSNE_MIN_POINTS points, PCA below (tests' tiny splits, where t-SNE has few neighbourhoods to
    keep and would cost seconds per evaluation). Pure numpy/scikit-learn: no TensorFlow random
    stream is drawn, so no metric moves."""
    from sklearn.decomposition import PCA  # scikit-learn is heavy; only plotting needs it
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    points = np.asarray(points, np.float64)
    if len(points) < TSNE_MIN_POINTS:
        pca = PCA(n_components=2).fit(points)
        return pca.transform(points), "PCA"
    perplexity = float(min(30.0, (len(points) - 1) / 3.0))
    # One OpenMP thread: beside TensorFlow's thread pools, sklearn's threads spin-wait against them
    # on a few cores (500 points x 3: 38 s with 2 threads, 5 s with one, the same embedding).
    with threadpool_limits(limits=1):
        embedded = TSNE(n_components=2, init="pca", perplexity=perplexity, max_iter=500,
                        random_state=seed).fit_transform(points)
    return embedded, f"t-SNE (perplexity {perplexity:g})"


def latent_embedding_figure(means: Mapping[str, np.ndarray], labels: np.ndarray | None,
                            class_names: Sequence[str] | None = None) -> Figure:
    """A 2-D t-SNE of posterior means {encoding modality: [n, D]} (the same n examples through
    each encoder, embedded together), coloured by class (when labelled) and by the modality that
    encoded them."""
    names = list(means)
    stacked = np.concatenate([np.asarray(means[n], np.float64) for n in names])
    points, how = embed_2d(stacked)
    source = np.repeat(np.arange(len(names)), [len(means[n]) for n in names])
    panels = [("modality", source, names)]
    if labels is not None:
        label_all = np.tile(np.asarray(labels), len(names))
        classes = np.unique(label_all)
        legend = [str(class_names[int(c)]) if class_names is not None and 0 <= int(c) < len(class_names)
                  else str(c) for c in classes]
        panels.insert(0, ("class", np.searchsorted(classes, label_all), legend))
    figure = _new_figure(5.0 * len(panels) + 0.5, 4.6)
    order = np.random.default_rng(0).permutation(len(points))  # no modality drawn over the others
    for i, (what, colour, legend) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), i + 1)
        cmap = matplotlib_colormaps["tab10" if len(legend) <= 10 else "tab20"]
        ax.scatter(points[order, 0], points[order, 1], c=[cmap(int(c) % cmap.N) for c in colour[order]],
                   s=5, alpha=0.7, linewidths=0)
        handles = [matplotlib_lines.Line2D([], [], marker="o", linestyle="", color=cmap(j % cmap.N),
                                           label=text) for j, text in enumerate(legend)]
        ax.legend(handles=handles, fontsize=7, title=what, title_fontsize=7, loc="best", markerscale=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"coloured by {what}", fontsize=9)
    figure.suptitle(f"posterior means of {len(means[names[0]])} test examples through each single-"
                    f"modality encoder, {how}", fontsize=9)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str) -> None:
    """Publishes the figure as a PNG at `path`."""
    atomic.write_bytes(path, figure_png(figure))


def write_plots(directory: str, specs: Sequence[schema.ModalitySpec], *,
                weights: np.ndarray | None, history: Sequence[Mapping],
                inputs: Mapping[str, np.ndarray],
                generated: Mapping[str, Mapping[str, np.ndarray]],
                prior_generated: Mapping[str, np.ndarray] | None = None,
                embedding: tuple[Mapping[str, np.ndarray], np.ndarray | None, Sequence[str] | None] | None = None
                ) -> list[str]:
    """Writes every plot that has data into `directory`; returns the paths written.

    weights: [D, M] or None (no mixture weights: no heatmap). history: history.jsonl records
    (empty: no training curve). inputs: {modality: [n, *shape]} test examples; generated:
    {given: {target: [k, n, *shape]}} (`cross_generation_figure`, one file per given modality).
    prior_generated: {modality: [n, *shape]} decoded prior samples. embedding: (posterior means
    {modality: [n, D]}, labels [n] or None, class names or None) for `latent_embedding_figure`.
    """
    tf.io.gfile.makedirs(directory)
    for stale in tf.io.gfile.glob(os.path.join(directory, "cross_generation*.png")):
        tf.io.gfile.remove(stale)  # an older evaluation's grids (another layout or modality)
    figures = {cross_generation_filename(given): cross_generation_figure(specs, given, inputs[given], out)
               for given, out in generated.items()}
    if weights is not None:
        figures[MIXTURE_WEIGHTS] = mixture_weights_figure(weights, [spec.name for spec in specs])
    if history:
        figures[TRAINING_CURVE] = loss_terms_figure(history)
    if prior_generated is not None:
        figures[PRIOR_SAMPLES] = prior_samples_figure(specs, prior_generated)
    if embedding is not None:
        figures[LATENT_EMBEDDING] = latent_embedding_figure(*embedding)
    written = []
    for filename, figure in figures.items():
        path = os.path.join(directory, filename)
        save_figure(figure, path)
        written.append(path)
    return written
