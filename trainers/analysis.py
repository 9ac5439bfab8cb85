"""`bmvae analyze`: the mixture-weight analysis of the paper's Section 7 on a trained BMVAE run.

The learned weights w [D, M] (alpha for BMVAE_M, E[pi] for BMVAE_P; each row sums to 1) say
which modality's expert each latent dimension trusts (Sect. 7.1, Fig. 6). From them:

- normalised weights w~_{d,m} = (w_{d,m} - 1/M) / (1 - 1/M): 0 is the uniform weight, 1 all
  weight on m. Dimension d is *private* to m = argmax_m w_{d,m} when w~_{d,m} >= threshold,
  and *shared* otherwise (the paper reads these sets off the heatmap by eye);
- sub-vector latent classification (Sect. 7.2, Table 12): linear probes on the posterior means of
  each encoder restricted to a set of dimensions, fitted on train and scored on test;
- dimension-swap generation (Sect. 7.3, Fig. 7): a latent from one modality's posterior with its
  private dimensions resampled from the prior (the rest kept), then the reverse, decoded into
  that modality;
- on data whose manifest declares ground-truth private factors (`factors`: Digits' street
  colours and shift, text padding):
  the out-of-sample R^2 with which each latent dimension alone (of the modality's own posterior
  mean) predicts each factor's class-independent part, the dimensions that carry a modality's
  factors (R^2 >= r2_threshold), the precision and recall of the dimensions the weights call
  private against them, and, free of both thresholds, the rank correlation over dimensions of
  the normalised weight of m with the best R^2 of m's factors.

The maths is in pure functions of arrays; `analyze` wires them to the run directory and writes
RUN/analysis/analysis.json and PNGs, then refreshes RUN/report.html.

Dimensions are numbered from 1 in analysis.json, the PNGs and the report, as in the paper and the
heatmap of `bmvae evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from scipy import stats

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import evaluation as evaluate_lib
from bmvae_tf.trainers import input_pipeline, run_dir
from bmvae_tf.trainers.reporting import plots, report

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_R2_THRESHOLD = 0.1
DEFAULT_SWAP_EXAMPLES = 6
DEFAULT_SWAP_SAMPLES = 8
POLYNOMIAL_DEGREE = 3  # a factor may be encoded monotonically but not linearly in a dimension
ANALYSIS_JSON = "analysis.json"


# ------------------------------------------------------------------------------------ weights


def normalised_weights(weights: np.ndarray) -> np.ndarray:
    """(w - 1/M) / (1 - 1/M) of weights [D, M] whose rows sum to 1: 0 = uniform, 1 = one-hot."""
    weights = np.asarray(weights, np.float64)
    num_modalities = weights.shape[1]
    if num_modalities < 2:
        raise ValueError("mixture weights over a single modality have nothing to compare")
    uniform = 1.0 / num_modalities
    return (weights - uniform) / (1.0 - uniform)


@dataclasses.dataclass
class DimensionSets:
    """0-based dimension indices: private[m] for each modality m, and the shared rest."""

    private: dict[str, list[int]]
    shared: list[int]

    def named_sets(self) -> dict[str, list[int]]:
        """The sets sub-vector classification uses: "all", "shared", and for every modality m
        "private:m" and its complement "rest:m" (the paper's D_S and D_S-bar)."""
        dims = sorted(self.shared + [d for v in self.private.values() for d in v])
        sets = {"all": dims, "shared": list(self.shared)}
        for name, private in self.private.items():
            sets[f"private:{name}"] = list(private)
            sets[f"rest:{name}"] = [d for d in dims if d not in private]
        return sets

    def to_json(self) -> dict:
        return {"private": {m: [d + 1 for d in v] for m, v in self.private.items()},
                "shared": [d + 1 for d in self.shared]}


def dimension_sets(weights: np.ndarray, names: Sequence[str], threshold: float) -> DimensionSets:
    """Splits the D dimensions of weights [D, M] into private-per-modality and shared sets.

    d is private to m = argmax_m w_{d,m} when normalised_weights(w)[d, m] >= threshold, in (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(names):
        raise ValueError(f"weights {weights.shape} do not match the modalities {list(names)}")
    normalised = normalised_weights(weights)
    top = np.argmax(weights, axis=1)
    private: dict[str, list[int]] = {name: [] for name in names}
    shared = []
    for d, m in enumerate(top):
        if normalised[d, m] >= threshold:
            private[names[m]].append(d)
        else:
            shared.append(d)
    return DimensionSets(private=private, shared=shared)


# ------------------------------------------------------------------------------------ probes


def subvector_accuracy(train_means: Mapping[str, np.ndarray], y_train: np.ndarray,
                       test_means: Mapping[str, np.ndarray], y_test: np.ndarray,
                       sets: Mapping[str, Sequence[int]]) -> dict[str, dict[str, float | None]]:
    """Table 12: {encoder: {set name: test accuracy of a linear probe on z[:, set]}}.

    train_means, test_means: {encoder (a subset key): posterior means [N, D]}. An empty set has
    no features and scores None.
    """
    out = {}
    for encoder, z_train in train_means.items():
        out[encoder] = {}
        for set_name, dims in sets.items():
            dims = list(dims)
            out[encoder][set_name] = None if not dims else evaluate_lib.latent_accuracy(
                z_train[:, dims], y_train, test_means[encoder][:, dims], y_test)
    return out


# ------------------------------------------------------------------------------------ swaps


def swap_latents(base: np.ndarray, replacement: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """[n, k, D]: k copies of each base latent [n, D] with `dims` taken from replacement [n, k, D]."""
    base = np.asarray(base)
    out = np.repeat(base[:, None, :], replacement.shape[1], axis=1)
    dims = list(dims)
    out[:, :, dims] = np.asarray(replacement)[:, :, dims]
    return out


# ------------------------------------------------------------------------------------ factors


def factor_columns(metadata: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Names and values [N, F] of the factor columns: "key" for one-value keys, "key[i]" else."""
    names, columns = [], []
    for key, value in metadata.items():
        value = np.asarray(value, np.float64).reshape(len(value), -1)
        for i in range(value.shape[1]):
            names.append(key if value.shape[1] == 1 else f"{key}[{i}]")
            columns.append(value[:, i])
    return names, np.stack(columns, axis=1)


def factor_r2(z_train: np.ndarray, f_train: np.ndarray, z_test: np.ndarray, f_test: np.ndarray,
              degree: int = POLYNOMIAL_DEGREE) -> np.ndarray:
    """[D, F]: the test R^2 with which latent dimension d alone predicts factor f.

    Per dimension, a least-squares polynomial of the given degree in the standardised z_d
    (standardised with the train statistics) is fitted to every factor on train, and scored on
    test as 1 - SSE / SST (SST around the test mean), so a dimension that does not predict a
    factor scores about 0 and can score below it. A factor constant on test gets NaN.

    z_train [N, D], f_train [N, F], z_test [N', D], f_test [N', F].
    """
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    f_train, f_test = np.asarray(f_train, np.float64), np.asarray(f_test, np.float64)
    latent_dim, num_factors = z_train.shape[1], f_train.shape[1]
    sst = np.sum((f_test - f_test.mean(0)) ** 2, axis=0)                      # [F]
    r2 = np.full((latent_dim, num_factors), np.nan)
    for d in range(latent_dim):
        mean, std = z_train[:, d].mean(), z_train[:, d].std()
        std = std if std > 0 else 1.0
        design = lambda z: np.vander((z - mean) / std, degree + 1)  # noqa: E731
        coef, *_ = np.linalg.lstsq(design(z_train[:, d]), f_train, rcond=None)  # [degree+1, F]
        sse = np.sum((f_test - design(z_test[:, d]) @ coef) ** 2, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2[d] = np.where(sst > 0, 1.0 - sse / sst, np.nan)
    return r2


def residualise_on_labels(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                          y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factors [N, F] minus their train mean within each class, so what a dimension is credited
    with is the factor's class-independent part (Digits' text padding ranges over fewer values
    for longer class names, so a class-carrying dimension predicts some of it). A class unseen in
    train keeps the overall train mean."""
    f_train, f_test = np.asarray(f_train, np.float64), np.asarray(f_test, np.float64)
    overall = f_train.mean(axis=0)
    means = {c: f_train[y_train == c].mean(axis=0) for c in np.unique(y_train)}
    centre = lambda f, y: f - np.stack([means.get(c, overall) for c in y])  # noqa: E731
    return centre(f_train, y_train), centre(f_test, y_test)


def carrying_dimensions(r2: np.ndarray, threshold: float) -> list[int]:
    """0-based dimensions whose R^2 [D, F] reaches `threshold` for at least one factor."""
    r2 = np.nan_to_num(np.asarray(r2, np.float64), nan=-np.inf)
    return [int(d) for d in np.flatnonzero(np.max(r2, axis=1) >= threshold)] if r2.size else []


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two per-dimension scores; None when either is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def precision_recall(predicted: Sequence[int], actual: Sequence[int]) -> dict:
    """Precision |P & A| / |P| and recall |P & A| / |A| (None when the denominator is 0)."""
    predicted, actual = set(predicted), set(actual)
    hits = len(predicted & actual)
    return {"true_positives": hits,
            "precision": hits / len(predicted) if predicted else None,
            "recall": hits / len(actual) if actual else None}


# ------------------------------------------------------------------------------------ the run


def default_factors(manifest: schema.Manifest) -> dict[str, str]:
    """{metadata key: modality}: the ground-truth private factors the manifest declares."""
    return dict(manifest.factors)


def parse_factors(items: Sequence[str], manifest: schema.Manifest) -> dict[str, str]:
    """`KEY=MODALITY` items -> {metadata key: modality}, checked against the manifest."""
    factors = {}
    for item in items:
        key, sep, modality = item.partition("=")
        key, modality = key.strip(), modality.strip()
        if not sep or not key or not modality:
            raise UserError(f"--factor {item!r}: expected METADATA_KEY=MODALITY")
        if key not in manifest.metadata_keys:
            raise UserError(f"--factor {item!r}: {key!r} is not a metadata key of {manifest.name!r} "
                            f"(it has {sorted(manifest.metadata_keys)})")
        if modality not in manifest.modality_names:
            raise UserError(f"--factor {item!r}: no modality {modality!r} in {manifest.modality_names}")
        factors[key] = modality
    return factors


def _collect_metadata(batches, keys: Sequence[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {k: [] for k in keys}
    for batch in batches:
        for key in keys:
            parts[key].append(np.asarray(batch[key]))
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclasses.dataclass
class FactorScores:
    """What the factors section of analysis.json holds, and the R^2 heatmap it draws.

    factors: {factor column: {"modality", "r2": [D] (None for NaN)}}. private_vs_factors:
    {modality: private and carrying dimensions (1-based), precision, recall, rank correlation}.
    r2: [D, F] over all factor columns, in the order of `columns`. marked: (dimension, column)
    cells where the dimension is private to the column's modality.
    """

    factors: dict[str, dict]
    private_vs_factors: dict[str, dict]
    columns: list[str]
    r2: np.ndarray
    marked: list[tuple[int, int]]


def score_factors(factors: Mapping[str, str], train, test, meta_train: Mapping[str, np.ndarray],
                  meta_test: Mapping[str, np.ndarray], weights: np.ndarray, names: Sequence[str],
                  sets: DimensionSets, r2_threshold: float) -> FactorScores:
    """Scores each modality's latent dimensions against that modality's factors.

    train, test: encoded splits (`evaluate.encode_split`): `means` {encoder: [N, D]} and
    `labels` [N] or None (with labels, the factors are residualised on them first).
    meta_train, meta_test: {metadata key: [N, ...]} of every key in `factors`.
    weights: the mixture weights [D, M] over `names`.
    """
    scores = FactorScores(factors={}, private_vs_factors={}, columns=[], r2=np.zeros((0, 0)), marked=[])
    r2_columns = []
    for modality in dict.fromkeys(factors.values()):
        keys = [k for k, m in factors.items() if m == modality]
        columns, f_train = factor_columns({k: meta_train[k] for k in keys})
        _, f_test = factor_columns({k: meta_test[k] for k in keys})
        if test.labels is not None:
            f_train, f_test = residualise_on_labels(f_train, train.labels, f_test, test.labels)
        r2 = factor_r2(train.means[modality], f_train, test.means[modality], f_test)
        first = len(scores.columns)
        for c, column in enumerate(columns):
            scores.factors[column] = {"modality": modality,
                                      "r2": [None if np.isnan(v) else float(v) for v in r2[:, c]]}
            scores.columns.append(column)
            r2_columns.append(r2[:, c])
        private = sets.private[modality]
        carrying = carrying_dimensions(r2, r2_threshold)
        scores.private_vs_factors[modality] = {
            "private": [d + 1 for d in private], "carrying": [d + 1 for d in carrying],
            **precision_recall(private, carrying),
            # Threshold-free: do dimensions that weight m more carry more of m's factors?
            "rank_correlation": rank_correlation(normalised_weights(weights)[:, names.index(modality)],
                                                 np.nan_to_num(r2, nan=0.0).max(axis=1))}
        scores.marked += [(d, first + c) for d in private for c in range(len(columns))]
    scores.r2 = np.stack(r2_columns, axis=1)
    return scores


def _check_settings(r2_threshold: float, swap_examples: int, swap_samples: int) -> None:
    if not 0.0 <= r2_threshold <= 1.0:
        raise UserError(f"r2 threshold must be in [0, 1], got {r2_threshold}")
    if swap_examples < 1 or swap_samples < 1:
        raise UserError("swap examples and samples must be at least 1")


def _fresh_directory(run_root: str) -> str:
    """RUN/analysis/, without the swap grids a previous analysis (another threshold) drew."""
    directory = os.path.join(run_root, "analysis")
    tf.io.gfile.makedirs(directory)
    for stale in tf.io.gfile.glob(os.path.join(directory, "swap_*.png")):
        tf.io.gfile.remove(stale)
    return directory


def _dimension_labels(latent_dim: int) -> list[str]:
    return [str(d + 1) for d in range(latent_dim)]


def _plot_factor_r2(scores: FactorScores, latent_dim: int, path: str) -> None:
    plots.save_figure(plots.heatmap_figure(
        np.clip(np.nan_to_num(scores.r2, nan=0.0), 0.0, 1.0), _dimension_labels(latent_dim),
        scores.columns,
        title="R^2 of each factor from one latent dimension of its modality's encoder\n"
              "(red: dimensions the weights call private to that modality)",
        colour_label="test R^2 (clipped to [0, 1])", marked=scores.marked), path)


def _plot_weights(weights: np.ndarray, names: Sequence[str], sets: DimensionSets, threshold: float,
                  weights_name: str, path: str) -> None:
    figure = plots.mixture_weights_figure(weights, names, private=sets.private)
    figure.axes[0].set_title(f"{weights_name} per dimension and modality (white: 1/M)\n"
                             f"outlined: private at normalised weight >= {threshold:g}", fontsize=9)
    plots.save_figure(figure, path)


def _swap_grids(model, manifest: schema.Manifest, sets: DimensionSets, inputs: Mapping[str, tf.Tensor],
                directory: str, samples: int, seed: int) -> dict[str, dict[str, str]]:
    """Fig. 7 for every modality with private dimensions; returns {modality: {kind: filename}}."""
    names = manifest.modality_names
    num = int(tf.shape(inputs[names[0]])[0])
    base_seed = tf.constant([seed, EvalStream.DIMENSION_SWAP], tf.int32)
    written = {}
    for m, spec in enumerate(manifest.modalities):
        private = sets.private[spec.name]
        rest = [d for d in range(model.latent_dim) if d not in private]
        if not private or not rest:
            continue
        present = tf.constant([n == spec.name for n in names])
        base = model.posterior(evaluate_lib.mask_inputs(inputs, present, names), present).mean().numpy()
        prior = tf.reshape(model.prior().sample(
            [num, samples], seed=tf.random.experimental.stateless_fold_in(base_seed, m)),
            [num, samples, model.latent_dim]).numpy()
        reconstruction = model.generate(tf.constant(base))[spec.name].numpy()
        written[spec.name] = {}
        for kind, dims, title in (
                ("private_resampled", private, f"{spec.name}: its {len(private)} private dimensions "
                                               f"resampled from the prior, the other {len(rest)} kept"),
                ("rest_resampled", rest, f"{spec.name}: the {len(rest)} non-private dimensions "
                                         f"resampled from the prior, its {len(private)} private kept")):
            z = swap_latents(base, prior, dims)
            generated = model.generate(tf.constant(z, tf.float32))[spec.name].numpy()
            filename = f"swap_{spec.name}_{kind}.png"
            plots.save_figure(plots.swap_grid_figure(spec, np.asarray(inputs[spec.name]), reconstruction,
                                                     generated, title), os.path.join(directory, filename))
            written[spec.name][kind] = filename
    return written


@dataclasses.dataclass
class _Analysis:
    """One analysis under way: the trained run, its dataset, the weights [D, M] and their sets."""

    config: config_lib.Config
    manifest: schema.Manifest
    model: object
    weights: np.ndarray
    sets: DimensionSets
    directory: str  # RUN/analysis

    @property
    def names(self) -> list[str]:
        return self.manifest.modality_names

    def batches(self, split: str, batch_size: int | None = None, limit: int | None = None):
        """The split as evaluation reads it (eval.batch_size, at most eval.max_examples)."""
        return input_pipeline.make_dataset(self.manifest, split, batch_size or self.config.eval.batch_size,
                                           take=limit or self.config.eval.max_examples)


def _subvector_section(run: _Analysis, train, test, result: dict) -> None:
    """Table 12: probes on each encoder's means restricted to every named set of dimensions."""
    if test.labels is None:
        result["skipped"]["subvector_accuracy"] = f"dataset {run.manifest.name!r} declares no label"
        return
    stage = time.perf_counter()
    named = run.sets.named_sets()
    encoders = [*run.names, schema.subset_key(run.names)]
    result["subvector_accuracy"] = subvector_accuracy(
        {e: train.means[e] for e in encoders}, train.labels,
        {e: test.means[e] for e in encoders}, test.labels, named)
    result["subvector_sets"] = {k: [d + 1 for d in v] for k, v in named.items()}
    result["num_examples"]["subvector_accuracy"] = {"train": train.num_examples, "test": test.num_examples}
    logger.info("sub-vector probes: %.1f s", time.perf_counter() - stage)


def _factor_section(run: _Analysis, factors: Mapping[str, str], r2_threshold: float, train, test,
                    result: dict) -> None:
    """The private dimensions against the ground-truth factors, and RUN/analysis/factor_r2.png."""
    if not factors:
        result["skipped"]["factors"] = (
            f"dataset {run.manifest.name!r} declares no ground-truth factors (its manifest's "
            f"'factors' is empty or absent); name them with --factor KEY=MODALITY")
        return
    stage = time.perf_counter()
    scores = score_factors(factors, train, test, _collect_metadata(run.batches("train"), list(factors)),
                           _collect_metadata(run.batches("test"), list(factors)), run.weights, run.names,
                           run.sets, r2_threshold)
    result["factors"], result["private_vs_factors"] = scores.factors, scores.private_vs_factors
    result["num_examples"]["factors"] = {"train": train.num_examples, "test": test.num_examples}
    result["factors_residualised_on_label"] = test.labels is not None
    _plot_factor_r2(scores, run.model.latent_dim, os.path.join(run.directory, "factor_r2.png"))
    result["files"]["factor_r2"] = "factor_r2.png"
    logger.info("factor R^2: %.1f s", time.perf_counter() - stage)


def _picture_section(run: _Analysis, threshold: float, swap_examples: int, swap_samples: int,
                     result: dict) -> None:
    """The weights heatmap (Fig. 6) and the dimension-swap grids (Fig. 7)."""
    _plot_weights(run.weights, run.names, run.sets, threshold, result["weights_name"],
                  os.path.join(run.directory, "mixture_weights.png"))
    result["files"]["mixture_weights"] = "mixture_weights.png"
    examples = next(iter(run.batches("test", swap_examples, swap_examples)))
    result["files"]["swap_grids"] = _swap_grids(
        run.model, run.manifest, run.sets, {n: examples[n] for n in run.names}, run.directory,
        swap_samples, run.config.train.seed)
    result["num_examples"]["swap_grids"] = {"examples": int(tf.shape(examples[run.names[0]])[0]),
                                            "samples": swap_samples}


def analyze(workdir: str, data_dir: str | None = None, *, threshold: float = DEFAULT_THRESHOLD,
            r2_threshold: float = DEFAULT_R2_THRESHOLD, factors: Mapping[str, str] | None = None,
            swap_examples: int = DEFAULT_SWAP_EXAMPLES, swap_samples: int = DEFAULT_SWAP_SAMPLES) -> dict:
    """Runs the Section 7 analysis of a trained BMVAE run; writes RUN/analysis/ and returns the
    dict written to RUN/analysis/analysis.json.

    Args:
      workdir: the run directory.
      data_dir: the dataset (default: the one the run trained on).
      threshold: normalised weight at or above which a dimension is private, in (0, 1].
      r2_threshold: R^2 at or above which a dimension carries a factor.
      factors: {metadata key: modality} ground-truth private factors; None: the ones the
        dataset's manifest declares (`default_factors`), {} for none.
      swap_examples, swap_samples: rows and resampled columns of each swap grid.

    Raises:
      UserError: a model without mixture weights, a bad threshold, a missing run or dataset.
    """
    started = time.perf_counter()
    config, manifest, model = run_dir.load_trained_model(workdir, data_dir)
    weights = model.mixture_weights()
    if weights is None:
        raise UserError(f"{workdir}: model {config.model.name!r} has no mixture weights; "
                        f"`bmvae analyze` reads the alpha of bmvae_m or the E[pi] of bmvae_p")
    _check_settings(r2_threshold, swap_examples, swap_samples)
    weights = np.asarray(weights, np.float64)
    sets = dimension_sets(weights, manifest.modality_names, threshold)
    factors = default_factors(manifest) if factors is None else dict(factors)
    run = _Analysis(config, manifest, model, weights, sets, _fresh_directory(run_dir.RunPaths(workdir).root))
    result: dict = {
        "model": config.model.name, "dataset": manifest.name, "modalities": run.names,
        "dimension_numbering": "1-based", "weights_name": model.MIXTURE_WEIGHTS_NAME,
        "weights": weights.tolist(), "normalised_weights": normalised_weights(weights).tolist(),
        "threshold": threshold, "dimensions": sets.to_json(),
        "subvector_accuracy": None, "factors": None, "private_vs_factors": None,
        "r2_threshold": r2_threshold, "num_examples": {}, "files": {}, "skipped": {},
    }
    with input_pipeline.reading(manifest):  # a damaged shard: one error naming it
        stage = time.perf_counter()
        train = evaluate_lib.encode_split(model, run.batches("train"))
        test = evaluate_lib.encode_split(model, run.batches("test"))
        logger.info("encoded %d train and %d test examples: %.1f s", train.num_examples,
                    test.num_examples, time.perf_counter() - stage)
        _subvector_section(run, train, test, result)
        _factor_section(run, factors, r2_threshold, train, test, result)
        _picture_section(run, threshold, swap_examples, swap_samples, result)

    path = os.path.join(run.directory, ANALYSIS_JSON)
    atomic.write_text(path, json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s in %.1f s", path, time.perf_counter() - started)
    logger.info("wrote %s", report.write_run_report(workdir))
    return result
