"""CCA coherence of image-caption datasets (CUB), SPEC section 3: `cca_coherence` in metrics.json.

Following Shi et al. (2019) and the paper's Sect. 6.2: canonical correlation analysis with 40
components is fitted on the train pairs, between image features x (ResNet-101, 2048-d) and
sentence vectors y (FastText + SIF, `bmvae_tf.pipeline.sentence_vectors`). A pair (x, y) scores the cosine
similarity of its centred, projected views,

    score(x, y) = cos(W_x^T (x - mean_x), W_y^T (y - mean_y)),

and each coherence is the mean score over pairs:
- ground_truth: the real test pairs (the paper quotes 0.273 on CUB);
- image->caption: a real test image and the caption generated from it;
- caption->image: a generated image and the real caption it was generated from;
- joint: image and caption decoded from the same prior sample (eval.random_samples of them).
Captions are decoded greedily (the most likely token at every position); an image is decoded
to the nearest (Euclidean) train image feature vector, as the paper generates CUB images.

W_x, W_y are normalised so that the canonical variates have unit variance on the train pairs
(a scale per component changes a cosine, so it has to be fixed; Shi et al.'s unit-norm
eigenvectors fix it differently). With that choice, if every canonical correlation equals rho
the expected score is rho up to O(1/components).

The maths (`fit_cca`, `cca_score`, `nearest_rows`) is pure numpy; `cca_coherence` drives a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
from threadpoolctl import threadpool_limits

from bmvae_tf import schema
from bmvae_tf.pipeline import sentence_vectors
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.context import EvalContext
from bmvae_tf.trainers.evaluation.subsets import prior_latents

logger = logging.getLogger(__name__)

COMPONENTS = 40
RIDGE = 1e-9  # relative to each covariance's mean eigenvalue; keeps tiny or collinear data solvable
_CHUNK = 4096
# Multi-threaded BLAS spin-waits against TensorFlow's thread pools on a few cores: fitting CCA on
# 2048-d features took 18 s with the default threads and 5 s with one, after TensorFlow started.
_BLAS_THREADS = 1


@dataclasses.dataclass(frozen=True)
class CCA:
    """A fitted CCA. x_weights [dx, k], y_weights [dy, k]; correlations [k] on the train pairs,
    descending."""

    x_mean: np.ndarray
    y_mean: np.ndarray
    x_weights: np.ndarray
    y_weights: np.ndarray
    correlations: np.ndarray

    def project(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical variates of x [N, dx] and y [N, dy]: [N, k] each."""
        return ((np.asarray(x, np.float64) - self.x_mean) @ self.x_weights,
                (np.asarray(y, np.float64) - self.y_mean) @ self.y_weights)


def _inverse_sqrt(covariance: np.ndarray, ridge: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 0.0) + ridge * max(float(np.mean(values)), np.finfo(float).tiny)
    return (vectors / np.sqrt(values)) @ vectors.T


def fit_cca(x: np.ndarray, y: np.ndarray, components: int = COMPONENTS, ridge: float = RIDGE) -> CCA:
    """CCA of paired views x [N, dx] and y [N, dy].

    With C the (ridge-regularised) covariances, T = C_xx^{-1/2} C_xy C_yy^{-1/2} = U S V^T gives
    W_x = C_xx^{-1/2} U_k, W_y = C_yy^{-1/2} V_k and the canonical correlations S_k, for
    k = min(components, dx, dy, N - 1). Covariances are accumulated in float64 chunks so a
    large float32 x needs no float64 copy.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if n != len(y) or n < 2:
        raise ValueError(f"CCA needs at least 2 pairs of equal count, got {len(x)} and {len(y)}")
    with threadpool_limits(limits=_BLAS_THREADS):
        return _fit_cca(x, y, components, ridge)


def _fit_cca(x: np.ndarray, y: np.ndarray, components: int, ridge: float) -> CCA:
    n = len(x)
    x_mean = x.mean(axis=0, dtype=np.float64)
    y_mean = y.mean(axis=0, dtype=np.float64)
    cxx = np.zeros((x.shape[1], x.shape[1]))
    cyy = np.zeros((y.shape[1], y.shape[1]))
    cxy = np.zeros((x.shape[1], y.shape[1]))
    for start in range(0, n, _CHUNK):
        xc = x[start:start + _CHUNK].astype(np.float64) - x_mean
        yc = y[start:start + _CHUNK].astype(np.float64) - y_mean
        cxx += xc.T @ xc
        cyy += yc.T @ yc
        cxy += xc.T @ yc
    cxx, cyy, cxy = cxx / (n - 1), cyy / (n - 1), cxy / (n - 1)
    ixx, iyy = _inverse_sqrt(cxx, ridge), _inverse_sqrt(cyy, ridge)
    u, s, vt = np.linalg.svd(ixx @ cxy @ iyy)
    k = min(components, x.shape[1], y.shape[1], n - 1)
    return CCA(x_mean, y_mean, ixx @ u[:, :k], iyy @ vt[:k].T, s[:k])


def cca_score(cca: CCA, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cosine similarity of the projected pairs (x [N, dx], y [N, dy]); a pair whose
    projection is zero scores 0."""
    px, py = cca.project(x, y)
    norms = np.linalg.norm(px, axis=1) * np.linalg.norm(py, axis=1)
    cosines = np.divide(np.sum(px * py, axis=1), norms, out=np.zeros(len(px)), where=norms > 0)
    return float(np.mean(cosines))


def nearest_rows(queries: np.ndarray, references: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[N] index of the nearest (Euclidean) row of references [R, d] for each query [N, d]."""
    references = np.asarray(references, np.float64)
    squared = np.sum(references ** 2, axis=1)
    out = []
    with threadpool_limits(limits=_BLAS_THREADS):
        for start in range(0, len(queries), chunk):
            q = np.asarray(queries[start:start + chunk], np.float64)
            out.append(np.argmin(squared[None, :] - 2.0 * q @ references.T, axis=1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------ the model


def declared(manifest: schema.Manifest) -> Mapping | None:
    """The manifest's "cca" entry ({"image", "caption", "sentence_vectors", "components"}), if any."""
    return manifest.extras.get("cca")


def unique_images(features: np.ndarray, image_ids: np.ndarray | None) -> np.ndarray:
    """The distinct image feature vectors among pairs [N, d] (one per image id when given)."""
    if image_ids is None:
        return np.unique(features, axis=0)
    _, first = np.unique(np.asarray(image_ids).ravel(), return_index=True)
    return features[np.sort(first)]


def _collect(batches, keys) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {key: [] for key in keys}
    for batch in batches:
        for key in keys:
            parts[key].append(np.asarray(batch[key]))
    if not parts[keys[0]]:
        raise UserError("the split to evaluate holds no examples")
    return {key: np.concatenate(value) for key, value in parts.items()}


def cca_coherence(model, manifest: schema.Manifest, batches: Callable[[str], tf.data.Dataset], *,
                  seed: int, prior_samples: int, batch_size: int = 256) -> tuple[dict, dict]:
    """The four CCA coherences of a trained model on a dataset that declares them.

    Args:
      model: a MultimodalVAE over (at least) the declared image and caption modalities.
      manifest: its "cca" entry names the modalities and the sentence-vector file.
      batches: split -> batches of {modality: [B, ...], metadata...}.
      seed: the run's seed (posterior samples and prior samples draw from it).
      prior_samples: latents for the joint coherence (SPEC: 1000).

    Returns:
      ({"ground_truth", "image->caption", "caption->image", "joint"}, counts of what was used).
    """
    spec = declared(manifest)
    image, caption = spec["image"], spec["caption"]
    names = manifest.modality_names
    for name in (image, caption):
        if name not in names:
            raise UserError(f"manifest 'cca' names modality {name!r}, which the dataset lacks ({names})")
    embedding = sentence_vectors.read(os.path.join(manifest.directory, spec["sentence_vectors"]),
                                      vocab=manifest.modality(caption).vocab)
    has_ids = "image_id" in manifest.metadata_keys

    train = _collect(batches("train"), [image, caption] + (["image_id"] if has_ids else []))
    cca = fit_cca(train[image], embedding.embed(train[caption]), int(spec.get("components", COMPONENTS)))
    references = unique_images(train[image], train.get("image_id"))
    logger.info("CCA on %d train pairs (%d images): canonical correlations %s ...", len(train[image]),
                len(references), np.round(cca.correlations[:3], 3).tolist())

    test = _cross_generate(model, batches("test"), image, caption, seed)
    generated_images = references[nearest_rows(test["generated_images"], references)]
    real_vectors = embedding.embed(test["real_captions"])
    joint_images, joint_captions = _joint_generate(model, prior_samples, seed, batch_size, image, caption)
    joint_images = references[nearest_rows(joint_images, references)]

    scores = {
        "ground_truth": cca_score(cca, test["real_images"], real_vectors),
        "image->caption": cca_score(cca, test["real_images"], embedding.embed(test["generated_captions"])),
        "caption->image": cca_score(cca, generated_images, real_vectors),
        "joint": cca_score(cca, joint_images, embedding.embed(joint_captions)),
    }
    counts = {"train_pairs": int(len(train[image])), "train_images": int(len(references)),
              "test_pairs": int(len(test["real_images"])), "prior_samples": int(prior_samples),
              "components": int(len(cca.correlations)),
              "train_correlations": [round(float(c), 4) for c in cca.correlations]}
    return scores, counts


def _cross_generate(model, batches, image: str, caption: str, seed: int) -> dict[str, np.ndarray]:
    """The test pairs and, for each, the caption generated from its image and the image features
    generated from its caption (one posterior sample each, stream EvalStream.CCA)."""
    names = [spec.name for spec in model.modalities]

    def generate(inputs, present, sample_seed):
        return model.generate(model.posterior(inputs, present).sample(seed=sample_seed))

    parts: dict[str, list] = {"real_images": [], "real_captions": [], "generated_captions": [],
                              "generated_images": []}
    for batch, outputs in subsets_lib.run_subsets(
            subsets_lib.masked_step(model.modalities, generate), batches, names, [[image], [caption]],
            seed=subsets_lib.stream_seed(seed, EvalStream.CCA),
            scheme=subsets_lib.SeedScheme.BATCH_THEN_SUBSET):
        parts["real_images"].append(batch[image].numpy())
        parts["real_captions"].append(batch[caption].numpy())
        parts["generated_captions"].append(outputs[image][caption].numpy())
        parts["generated_images"].append(outputs[caption][image].numpy())
    if not parts["real_images"]:
        raise UserError("the test split holds no examples")
    return {key: np.concatenate(value) for key, value in parts.items()}


def _joint_generate(model, num: int, seed: int, batch_size: int, image: str,
                    caption: str) -> tuple[np.ndarray, np.ndarray]:
    """Image features [num, d] and captions [num, L] decoded from the same prior latents."""
    z = prior_latents(model, num, seed)
    joint = [model.generate(tf.constant(z[i:i + batch_size])) for i in range(0, len(z), batch_size)]
    return (np.concatenate([j[image].numpy() for j in joint]),
            np.concatenate([j[caption].numpy() for j in joint]))


def cca_stage(context: EvalContext) -> None:
    """metrics.cca_coherence, for datasets whose manifest declares CCA (CUB)."""
    if not declared(context.manifest):
        return
    started = time.perf_counter()
    context.metrics.cca_coherence, context.metrics.num_examples["cca_coherence"] = cca_coherence(
        context.model, context.manifest, context.batches, seed=context.seed,
        prior_samples=context.eval.random_samples, batch_size=context.eval.batch_size)
    logger.info("CCA coherence %s: %.1f s", context.metrics.cca_coherence, time.perf_counter() - started)
