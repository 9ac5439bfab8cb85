"""Random coherence (paper Sect. 6.3.2): joint coherence of latents the model was never given.

random_coherence: latents from the prior decoded into every modality; the score is the fraction
of samples on which all classifiers agree. random_coherence_gmm does the same with latents from a
10-component diagonal GMM fitted on the train latents: the ex-post density estimate the paper
uses for Table 10 (SPEC 4).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from bmvae_tf import schema
from bmvae_tf.trainers.evaluation import batched
from bmvae_tf.trainers.evaluation.coherence import joint_coherence
from bmvae_tf.trainers.evaluation.context import EvalContext
from bmvae_tf.trainers.evaluation.probes import SKLEARN_BLAS_THREADS
from bmvae_tf.trainers.evaluation.subsets import prior_latents

logger = logging.getLogger(__name__)

GMM_COMPONENTS = 10  # the paper's ex-post estimate (Sect. 6.3.2)


def fit_latent_gmm(z: np.ndarray, num_components: int = GMM_COMPONENTS,
                   seed: int = 0) -> GaussianMixture:
    """The ex-post density estimate p_hat(z) of the aggregate posterior (Ghosh et al., 2020).

    A diagonal Gaussian mixture fitted on latents z [N, D] (the train split's posterior means
    given all modalities); fewer components than examples when the split is tiny.
    """
    gmm = GaussianMixture(n_components=min(num_components, len(z)), covariance_type="diag",
                          random_state=seed)
    with threadpool_limits(limits=SKLEARN_BLAS_THREADS):
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


def generated_predictions(model, classifiers: Mapping[str, Callable], z: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """Decodes latents z [N, D] into every modality and classifies them: [M, N] class ids."""
    predict = batched.prediction_step(model, classifiers)
    parts = []
    for i in range(0, len(z), batch_size):
        z_batch = tf.constant(z[i:i + batch_size], tf.float32)
        parts.append(np.stack([p.numpy() for p in predict([z_batch] * len(model.modalities))]))
    return np.concatenate(parts, axis=1)


def random_coherence_stage(context: EvalContext) -> None:
    """metrics.random_coherence (prior) and random_coherence_gmm (ex-post GMM)."""
    started = time.perf_counter()
    count, seed, metrics = context.eval.random_samples, context.seed, context.metrics
    train = context.train_latents
    z_prior = prior_latents(context.model, count, seed)
    gmm = fit_latent_gmm(train.means[schema.subset_key(context.names)], seed=seed)
    z_gmm = sample_gmm(gmm, count, seed)
    # One decoding pass for both sources, so the decoders are traced once.
    predicted = generated_predictions(context.model, context.classifiers, np.concatenate([z_prior, z_gmm]),
                                      context.eval.batch_size)
    metrics.random_coherence = joint_coherence(predicted[:, :count])
    metrics.random_coherence_gmm = joint_coherence(predicted[:, count:])
    metrics.num_examples["random_coherence"] = count
    metrics.num_examples["random_coherence_gmm"] = {"samples": count, "gmm_fit": train.num_examples}
    logger.info("random coherence (prior and GMM): %.1f s", time.perf_counter() - started)
