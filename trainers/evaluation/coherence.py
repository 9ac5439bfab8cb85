"""Coherence (paper Sects. 6.1.2, 6.3.2): do generated modalities carry the right class?

- cross coherence "t|S": encode the test example from the modalities in S (one posterior
  sample), decode modality t, label it with t's classifier (`classifiers`, trained on real
  data); the score is the fraction equal to the true label.
- joint coherence: the fraction of latents whose decodings every classifier labels alike
  (random coherence, `random_coherence`, scores it on prior and GMM latents).
- classifier accuracy: how well the classifiers label real test data, which bounds the above.
"""

from __future__ import annotations

import logging

import numpy as np

from bmvae_tf.trainers.evaluation import classifiers as classifiers_lib
from bmvae_tf.trainers.evaluation import dataset_cache
from bmvae_tf.trainers.evaluation.context import EvalContext

logger = logging.getLogger(__name__)

_CACHE_KIND = "classifier_accuracy"


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


def classifier_accuracy_stage(context: EvalContext) -> None:
    """metrics.classifier_accuracy: each coherence classifier's accuracy on real test data; a
    function of the data and the classifiers alone, so with eval.shared_cache read from the
    dataset cache after the first evaluation on a dataset."""
    metrics = context.metrics
    classifiers = context.classifiers
    fingerprint = {"classifiers": context.classifier_fingerprints, "split": context.resolve("test"),
                   "max_examples": int(context.eval.max_examples)}
    cached = dataset_cache.lookup(context.manifest, _CACHE_KIND, fingerprint) if context.eval.shared_cache else None
    if cached is not None:
        metrics.classifier_accuracy = cached
    else:
        metrics.classifier_accuracy = classifiers_lib.accuracy(
            classifiers, context.manifest.modalities, context.batches("test"))
        if context.eval.shared_cache:
            dataset_cache.store(context.manifest, _CACHE_KIND, fingerprint, metrics.classifier_accuracy)
    metrics.num_examples["classifier"] = {"train": context.train_count,
                                          "test": context.test_latents.num_examples}
    logger.info("classifier test accuracy %s", metrics.classifier_accuracy)


def cross_coherence_stage(context: EvalContext) -> None:
    """metrics.coherence: {"t|S": cross coherence} from the test encodings' predictions."""
    test = context.test_latents
    context.metrics.coherence = {key: cross_coherence(predicted, test.labels)
                                 for key, predicted in test.cross_predictions.items()}
    context.metrics.num_examples["coherence"] = test.num_examples
