"""`bmvae evaluate`: a trained run -> RUN/metrics.json and RUN/plots/*.png (SPEC section 3).

The metrics follow the paper's protocol (Sects. 6.1.1, 6.1.2, 6.3) with the choices SPEC 6 fixes:

- latent_accuracy (linear probe): logistic regression on standardised posterior *means* of the
  whole train split, scored on the test split, for every non-empty subset of modalities.
- coherence "t|S": encode the test example from the modalities in S (one posterior sample),
  decode modality t, label it with t's classifier (`trainers.classifiers`, trained on real data);
  the score is the fraction equal to the true label.
- random_coherence: latents from the prior decoded into every modality; the score is the
  fraction of samples on which all classifiers agree. random_coherence_gmm does the same with
  latents from a 10-component diagonal GMM fitted on the train latents: the ex-post density
  estimate the paper uses for Table 10 (SPEC 4).
- log_likelihood: the IWAE estimate of log p(x_S) for every subset, averaged over the first
  test examples, with K = eval.log_likelihood_samples importance samples.
- robustness: every subset's latent probe scored on latents of test inputs with increasing noise,
  summarised as MultiBench's relative and effective robustness (`trainers.robustness`).
- num_examples: how many examples (and samples) each of the numbers above rests on.

RUN/report.html (`trainers.report`) shows the training curves, these tables and the plots.

The maths lives in small functions that take arrays (`latent_accuracy`, `cross_coherence`,
`joint_coherence`, `fit_latent_gmm`, `sample_gmm`) or a model and batches (`encode_split`,
`generated_predictions`, `log_likelihoods`), so each can be tested with known inputs;
`evaluate` only wires them to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cca
from bmvae_tf.trainers import classifiers as classifiers_lib
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, plots, report, robustness, run_dir

logger = logging.getLogger(__name__)

GMM_COMPONENTS = 10  # the paper's ex-post estimate (Sect. 6.3.2)
CLASSIFIER_BATCH_SIZE = 128
PLOT_EXAMPLES = 3
# Latents decoded per log_marginal call (importance samples x examples): bounds the memory of the
# decoders' activations, about 30 KB per latent for a 16x16 CNN decoder.
_LOG_LIKELIHOOD_LATENTS_PER_CALL = 4096
_LOG_LIKELIHOOD_CHUNK = 100

# The probes and the GMM are small dense problems (N x D). Multi-threaded OpenBLAS spin-waits
# against TensorFlow's thread pools on a few cores and made each fit 10-30x slower (4 s instead
# of 0.15 s on 2 cores), so sklearn runs on one BLAS thread.
_SKLEARN_BLAS_THREADS = 1

# Each random quantity gets its own stream of the run's seed, so adding one leaves the others.
_STREAM_COHERENCE, _STREAM_PRIOR, _STREAM_LOG_LIKELIHOOD, _STREAM_PLOTS = 1, 2, 3, 4


# ------------------------------------------------------------------------------------ pure maths


def latent_accuracy(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray,
                    y_test: np.ndarray) -> float:
    """Test accuracy of a linear probe on latents (Sect. 6.1.1).

    A logistic regression on standardised features (the latent scales differ by orders of
    magnitude between dimensions and models) is fitted on z_train [N, D] with labels [N] and
    scored on z_test [N', D] against y_test [N'].
    """
    probe = fit_latent_probe(z_train, y_train)
    _check_finite_latents(z_test, "test")
    return robustness.probe_accuracy(probe, z_test, y_test)


def fit_latent_probe(z_train: np.ndarray, y_train: np.ndarray):
    """The fitted probe of `latent_accuracy` (kept to score noisy latents for robustness)."""
    _check_finite_latents(z_train, "train")
    return robustness.fit_probe(z_train, y_train)


def _check_finite_latents(z: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(z)):
        raise UserError(f"the model produced non-finite {name} latents; has training diverged?")


def cross_coherence(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose generated modalities are all labelled with the true class.

    predictions: [N] class ids of one generated modality, or [T, N] for T generated modalities
    (SPEC 6: a sample is coherent only if every classifier agrees with the true label).
    labels: [N].
    """
    predictions = np.atleast_2d(np.asarray(predictions))
    return float(np.mean(np.all(predictions == np.asarray(labels)[None, :], axis=0)))


def joint_coherence(predictions: np.ndarray) -> float:
    """Fraction of samples on which every modality's classifier predicts the same class.

    predictions: [M, N], the class of modality m generated from latent n.
    """
    predictions = np.asarray(predictions)
    return float(np.mean(np.all(predictions == predictions[:1], axis=0)))


def fit_latent_gmm(z: np.ndarray, num_components: int = GMM_COMPONENTS,
                   seed: int = 0) -> GaussianMixture:
    """The ex-post density estimate p_hat(z) of the aggregate posterior (Ghosh et al., 2020).

    A diagonal Gaussian mixture fitted on latents z [N, D] (the train split's posterior means
    given all modalities); fewer components than examples when the split is tiny.
    """
    gmm = GaussianMixture(n_components=min(num_components, len(z)), covariance_type="diag",
                          random_state=seed)
    with threadpool_limits(limits=_SKLEARN_BLAS_THREADS):
        return gmm.fit(z)


def sample_gmm(gmm: GaussianMixture, num: int, seed: int) -> np.ndarray:
    """`num` latents [num, D] from a fitted diagonal GMM, drawn from an explicit seed.

    sklearn's own `sample` draws from the estimator's internal random state and returns the
    samples grouped by component; this draws component and noise from `seed` alone.
    """
    rng = np.random.default_rng(seed)
    components = rng.choice(len(gmm.weights_), size=num, p=gmm.weights_)
    noise = rng.standard_normal((num, gmm.means_.shape[1]))
    return (gmm.means_[components] + noise * np.sqrt(gmm.covariances_[components])).astype(np.float32)


# ------------------------------------------------------------------------------------ the model


def mask_inputs(inputs: Mapping[str, tf.Tensor], present: tf.Tensor | Sequence[bool],
                names: Sequence[str]) -> dict[str, tf.Tensor]:
    """Replaces absent modalities (present: bool [M]) by zeros, as the SavedModel does (SPEC 5),
    so a model that peeked at an absent modality would be caught rather than rewarded."""
    present = tf.convert_to_tensor(present, tf.bool)
    return {name: tf.where(present[m], inputs[name], tf.zeros_like(inputs[name]))
            for m, name in enumerate(names)}


def coherence_key(target: str, subset: Sequence[str]) -> str:
    """"t|a+b": generate t given a and b."""
    return f"{target}|{schema.subset_key(subset)}"


@dataclasses.dataclass
class SplitLatents:
    """What one pass over a split yields.

    labels: [N] or None without labels. means: {subset key: [N, D]} posterior means.
    cross_predictions: {"t|S": [N]} the class t's classifier gives to t generated from S;
    empty without classifiers.
    """

    labels: np.ndarray | None
    means: dict[str, np.ndarray]
    cross_predictions: dict[str, np.ndarray]

    @property
    def num_examples(self) -> int:
        return len(next(iter(self.means.values())))


def encode_split(model, batches: Iterable[Mapping[str, tf.Tensor]], *,
                 classifiers: Mapping[str, Callable] | None = None, seed: int = 0) -> SplitLatents:
    """Posterior means for every subset, and cross-generated class predictions, in one pass.

    Args:
      model: a MultimodalVAE (posterior, generate, modalities).
      batches: {modality: [B, *shape], "label": [B] (optional), ...}.
      classifiers: {modality: [B, *shape] -> logits [B, C]}; with them, each subset S draws one
        posterior sample per example (stateless, from `seed` and the batch index), decodes
        every modality t not in S and records the predicted class under "t|S".
      seed: the base of the sampling seeds.
    """
    specs = list(model.modalities)
    names = [spec.name for spec in specs]
    subsets = schema.subset_names(names)

    # `present` is an input rather than a constant, and the batch size is left open, so the
    # graph is traced once for every subset and batch: tracing, not compute, dominated the cost.
    @tf.function(input_signature=[classifiers_lib.batch_signature(specs),
                                  tf.TensorSpec([len(specs)], tf.bool), tf.TensorSpec([2], tf.int32)])
    def step(inputs, present, sample_seed):
        posterior = model.posterior(mask_inputs(inputs, present, names), present)
        out = {"mean": posterior.mean()}
        if classifiers is not None:
            # Every modality is classified, including the given ones, to keep one graph for all
            # subsets; the caller keeps the targets.
            generated = model.generate(posterior.sample(seed=sample_seed))
            out["predictions"] = tf.stack([classifiers_lib.predict_classes(
                classifiers[spec.name], spec, generated[spec.name]) for spec in specs])
        return out

    base_seed = tf.constant([seed, _STREAM_COHERENCE], tf.int32)
    masks = {schema.subset_key(s): tf.constant([n in s for n in names]) for s in subsets}
    means: dict[str, list] = {key: [] for key in masks}
    predictions: dict[str, list] = {}
    labels = []
    for index, batch in enumerate(batches):
        batch_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        inputs = {n: batch[n] for n in names}
        for k, subset in enumerate(subsets):
            key = schema.subset_key(subset)
            out = step(inputs, masks[key], tf.random.experimental.stateless_fold_in(batch_seed, k))
            means[key].append(out["mean"].numpy())
            if "predictions" in out:
                predicted = out["predictions"].numpy()                        # [M, B]
                for m, name in enumerate(names):
                    if name not in subset:
                        predictions.setdefault(coherence_key(name, subset), []).append(predicted[m])
        if "label" in batch:
            labels.append(np.asarray(batch["label"]))
    if not means[schema.subset_key(names)]:
        raise UserError("the split to evaluate holds no examples")
    return SplitLatents(labels=np.concatenate(labels) if labels else None,
                        means={k: np.concatenate(v) for k, v in means.items()},
                        cross_predictions={k: np.concatenate(v) for k, v in predictions.items()})


def generated_predictions(model, classifiers: Mapping[str, Callable], z: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """Decodes latents z [N, D] into every modality and classifies them: [M, N] class ids."""
    specs = list(model.modalities)

    @tf.function(input_signature=[tf.TensorSpec([None, model.latent_dim], tf.float32)])
    def step(z_batch):
        generated = model.generate(z_batch)
        return tf.stack([classifiers_lib.predict_classes(classifiers[s.name], s, generated[s.name])
                         for s in specs])

    parts = [step(tf.constant(z[i:i + batch_size], tf.float32)).numpy()
             for i in range(0, len(z), batch_size)]
    return np.concatenate(parts, axis=1)


def prior_latents(model, num: int, seed: int) -> np.ndarray:
    """`num` latents [num, D] from the model's prior p(z)."""
    z = model.prior().sample([num], seed=tf.constant([seed, _STREAM_PRIOR], tf.int32))
    return tf.reshape(z, [num, model.latent_dim]).numpy()


def log_likelihoods(model, batches: Iterable[Mapping[str, tf.Tensor]], *, num_samples: int,
                    seed: int) -> tuple[dict[str, float | None], int]:
    """Mean IWAE estimate of log p(x_S) for every subset S, and the number of examples.

    Each subset is scored on its own modalities with its own posterior as proposal
    (`MultimodalVAE.log_marginal`). A non-finite mean is reported as None so metrics.json stays
    valid JSON.
    """
    names = [spec.name for spec in model.modalities]
    subsets = schema.subset_names(names)
    chunk = min(num_samples, _LOG_LIKELIHOOD_CHUNK)

    @tf.function(input_signature=[classifiers_lib.batch_signature(model.modalities),
                                  tf.TensorSpec([len(names)], tf.bool), tf.TensorSpec([2], tf.int32)])
    def step(inputs, present, batch_seed):
        return tf.reduce_sum(model.log_marginal(inputs, present, num_samples, batch_seed, chunk))

    base_seed = tf.constant([seed, _STREAM_LOG_LIKELIHOOD], tf.int32)
    totals = {schema.subset_key(s): 0.0 for s in subsets}
    count = 0
    for index, batch in enumerate(batches):
        batch_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        for subset in subsets:
            present = tf.constant([name in subset for name in names])
            inputs = mask_inputs({n: batch[n] for n in names}, present, names)
            totals[schema.subset_key(subset)] += float(step(inputs, present, batch_seed))
        count += int(tf.shape(batch[names[0]])[0])
    means = {key: total / count if count and math.isfinite(total) else None
             for key, total in totals.items()}
    return means, count


def cross_generations(model, inputs: Mapping[str, tf.Tensor],
                      seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{given: {target: [n, *shape]}}: every modality generated from each single modality."""
    names = [spec.name for spec in model.modalities]
    base_seed = tf.constant([seed, _STREAM_PLOTS], tf.int32)
    out = {}
    for m, given in enumerate(names):
        present = tf.constant([name == given for name in names])
        posterior = model.posterior(mask_inputs(inputs, present, names), present)
        z = posterior.sample(seed=tf.random.experimental.stateless_fold_in(base_seed, m))
        out[given] = {target: value.numpy() for target, value in model.generate(z).items()}
    return out


# ------------------------------------------------------------------------------------ the run


def evaluate(workdir: str, data_dir: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Computes the metrics of a trained run, writes RUN/metrics.json, RUN/plots/*.png and
    RUN/report.html.

    Args:
      workdir: the run directory RUN (config.yaml, checkpoints/, history.jsonl).
      data_dir: the dataset; defaults to the one the run was trained on (config data.dir).
      overrides: `eval.key=value` settings for this evaluation only (RUN/config.yaml is kept).

    Returns:
      The metrics dict as written (SPEC section 3). Without labels in the manifest the
      label-based metrics are None and `skipped` says why.

    Raises:
      UserError: a missing run, checkpoint, dataset or split.
    """
    started = time.perf_counter()
    paths = run_dir.RunPaths(workdir)
    config, manifest, model = run_dir.load_trained_model(workdir, data_dir)
    config = with_eval_overrides(config, overrides)
    eval_config, seed = config.eval, config.train.seed
    names = manifest.modality_names
    subsets = schema.subset_names(names)
    history = run_dir.read_history(paths)
    take = eval_config.max_examples

    def batches(split: str, batch_size: int = eval_config.batch_size, limit: int = take,
                **kwargs) -> tf.data.Dataset:
        return input_pipeline.make_dataset(manifest, split, batch_size, take=limit, **kwargs)

    weights = model.mixture_weights()
    weights = None if weights is None else np.asarray(weights)
    seconds = [float(h["seconds"]) for h in history if h.get("seconds") is not None]
    metrics: dict = {
        "model": config.model.name, "dataset": manifest.name, "modalities": names,
        "epochs": int(history[-1]["epoch"]) if history else 0,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
        "latent_accuracy": None, "coherence": None, "random_coherence": None,
        "random_coherence_gmm": None, "log_likelihood": None, "robustness": None,
        "mixture_weights": None if weights is None else weights.tolist(),
        "classifier_accuracy": None, "num_examples": {}, "skipped": {},
    }
    num_examples = metrics["num_examples"]

    if manifest.label is None:
        reason = f"dataset {manifest.name!r} declares no label"
        for key in ("latent_accuracy", "coherence", "random_coherence", "random_coherence_gmm",
                    "classifier_accuracy", "robustness"):
            metrics["skipped"][key] = reason
        logger.warning("%s: skipping the label-based metrics", reason)
    else:
        _label_metrics(metrics, manifest, model, paths, batches, eval_config, seed)

    if cca.declared(manifest):
        stage = time.perf_counter()
        metrics["cca_coherence"], num_examples["cca_coherence"] = cca.cca_coherence(
            model, manifest, batches, seed=seed, prior_samples=eval_config.random_samples,
            batch_size=eval_config.batch_size)
        logger.info("CCA coherence %s: %.1f s", metrics["cca_coherence"], time.perf_counter() - stage)

    stage = time.perf_counter()
    ll_examples = min(eval_config.log_likelihood_examples, take) if take else \
        eval_config.log_likelihood_examples
    ll_batch = max(1, _LOG_LIKELIHOOD_LATENTS_PER_CALL
                   // min(eval_config.log_likelihood_samples, _LOG_LIKELIHOOD_CHUNK))
    metrics["log_likelihood"], num_examples["log_likelihood"] = log_likelihoods(
        model, batches("test", ll_batch, ll_examples),
        num_samples=eval_config.log_likelihood_samples, seed=seed)
    num_examples["log_likelihood_samples"] = eval_config.log_likelihood_samples
    logger.info("log-likelihoods of %d subsets on %d examples with K=%d: %.1f s", len(subsets),
                num_examples["log_likelihood"], eval_config.log_likelihood_samples,
                time.perf_counter() - stage)

    examples = next(iter(batches("test", PLOT_EXAMPLES, PLOT_EXAMPLES)))
    inputs = {n: examples[n] for n in names}
    written = plots.write_plots(
        paths.plots, manifest.modalities, weights=weights, history=history,
        inputs={n: v.numpy() for n, v in inputs.items()},
        generated=cross_generations(model, inputs, seed))
    if metrics["robustness"] is not None:
        written.append(os.path.join(paths.plots, plots.ROBUSTNESS))
        plots.save_figure(plots.robustness_figure(metrics["robustness"]), written[-1])
    logger.info("wrote %s", ", ".join(written))

    atomic.write_text(paths.metrics, json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s in %.1f s", paths.metrics, time.perf_counter() - started)
    logger.info("wrote %s", report.write_run_report(workdir))
    return metrics


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


def _label_metrics(metrics: dict, manifest: schema.Manifest, model, paths: run_dir.RunPaths,
                   batches: Callable[..., tf.data.Dataset], eval_config, seed: int) -> None:
    """Fills the classifier, latent-probe and coherence entries of `metrics` in place."""
    names = manifest.modality_names
    subsets = schema.subset_names(names)
    num_examples = metrics["num_examples"]
    take = eval_config.max_examples
    train_count = manifest.split("train").count
    train_count = min(train_count, take) if take else train_count

    stage = time.perf_counter()
    classifiers = classifiers_lib.load_or_train(
        paths.classifiers, manifest,
        lambda: batches("train", CLASSIFIER_BATCH_SIZE,
                        options=input_pipeline.ReadOptions(shuffle=True, seed=seed)),
        train_examples=train_count, batch_size=CLASSIFIER_BATCH_SIZE,
        epochs=eval_config.classifier_epochs, seed=seed)
    metrics["classifier_accuracy"] = classifiers_lib.accuracy(
        classifiers, manifest.modalities, batches("test"))
    num_examples["classifier"] = {"train": train_count}
    logger.info("classifiers ready (test accuracy %s): %.1f s", metrics["classifier_accuracy"],
                time.perf_counter() - stage)

    stage = time.perf_counter()
    test = encode_split(model, batches("test"), classifiers=classifiers, seed=seed)
    train = encode_split(model, batches("train"))
    logger.info("encoded %d train and %d test examples for %d subsets: %.1f s",
                train.num_examples, test.num_examples, len(subsets), time.perf_counter() - stage)

    stage = time.perf_counter()
    probes = {schema.subset_key(s): fit_latent_probe(train.means[schema.subset_key(s)], train.labels)
              for s in subsets}
    metrics["latent_accuracy"] = {}
    for key, probe in probes.items():
        _check_finite_latents(test.means[key], "test")
        metrics["latent_accuracy"][key] = robustness.probe_accuracy(probe, test.means[key], test.labels)
    metrics["coherence"] = {key: cross_coherence(predicted, test.labels)
                            for key, predicted in test.cross_predictions.items()}
    num_examples["latent_accuracy"] = {"train": train.num_examples, "test": test.num_examples}
    num_examples["coherence"] = test.num_examples
    num_examples["classifier"]["test"] = test.num_examples
    logger.info("latent probes: %.1f s", time.perf_counter() - stage)

    stage = time.perf_counter()
    count = eval_config.random_samples
    z_prior = prior_latents(model, count, seed)
    gmm = fit_latent_gmm(train.means[schema.subset_key(names)], seed=seed)
    z_gmm = sample_gmm(gmm, count, seed)
    # One decoding pass for both sources, so the decoders are traced once.
    predicted = generated_predictions(model, classifiers, np.concatenate([z_prior, z_gmm]),
                                      eval_config.batch_size)
    metrics["random_coherence"] = joint_coherence(predicted[:, :count])
    metrics["random_coherence_gmm"] = joint_coherence(predicted[:, count:])
    num_examples["random_coherence"] = count
    num_examples["random_coherence_gmm"] = {"samples": count, "gmm_fit": train.num_examples}
    logger.info("random coherence (prior and GMM): %.1f s", time.perf_counter() - stage)

    stage = time.perf_counter()
    metrics["robustness"], num_examples["robustness"] = _robustness(
        manifest, model, probes, batches, eval_config, seed, train_examples=train.num_examples)
    logger.info("robustness at %d noise levels: %.1f s", len(eval_config.robustness_noise_levels),
                time.perf_counter() - stage)


def _robustness(manifest: schema.Manifest, model, probes: dict, batches: Callable[..., tf.data.Dataset],
                eval_config, seed: int, *, train_examples: int) -> tuple[dict, dict]:
    """metrics["robustness"] (see trainers.robustness) and the example counts it rests on."""
    names = manifest.modality_names
    baselines = {}
    baseline_examples = eval_config.robustness_baseline_examples
    if baseline_examples:
        features, labels = robustness.collect_features(
            manifest.modalities, batches("train", limit=min(baseline_examples, eval_config.max_examples
                                                            or baseline_examples)))
        baselines = {schema.subset_key(s): robustness.fit_probe(robustness.subset_features(features, s),
                                                                labels)
                     for s in schema.subset_names(names)}
        baseline_examples = len(labels)
    scales = robustness.noise_scales(manifest.modalities, batches("test"))
    result = robustness.noisy_accuracy(model, batches("test"), probes, baselines,
                                       levels=eval_config.robustness_noise_levels, scales=scales,
                                       seed=seed)
    counts = {"train": train_examples, "test": result.num_test, "baseline_train": baseline_examples,
              "levels": len(result.levels)}
    return result.to_json(), counts
