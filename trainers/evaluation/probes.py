"""Linear probes: latent accuracy (paper Sect. 6.1.1), and the probe robustness reuses.

latent_accuracy: a logistic regression on standardised posterior *means* of the whole train
split, scored on the test split, for every non-empty subset of modalities (SPEC 6). The same
probe (`fit_probe`) scores the raw-input baseline of robustness, so the model and the baseline
are judged alike.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Callable, Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers.evaluation.context import EvalContext

logger = logging.getLogger(__name__)

_PROBE_MAX_ITER = 5000
# The probes are small dense problems (N x D). Multi-threaded OpenBLAS spin-waits against
# TensorFlow's thread pools on a few cores and made each fit 10-30x slower (4 s instead of 0.15 s
# on 2 cores), so sklearn runs on one BLAS thread.
SKLEARN_BLAS_THREADS = 1


def fit_probe(features: np.ndarray, labels: np.ndarray):
    """A logistic regression on standardised features [N, F] fitted to labels [N]."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=_PROBE_MAX_ITER))
    with threadpool_limits(limits=SKLEARN_BLAS_THREADS):
        return probe.fit(features, labels)


def fit_probes(tasks: Mapping[str, tuple[np.ndarray, np.ndarray]], fit: Callable = fit_probe) -> dict:
    """{key: fit(features, labels)} for every (features, labels) in `tasks`, fitted side by side
    (`side_by_side`): every probe is the one a lone fit makes."""
    return side_by_side(fit, tasks)


def side_by_side(fn: Callable, tasks: Mapping[str, tuple]) -> dict:
    """{key: fn(*args)} for every args in `tasks`, on as many threads as there are cores
    (`SideBySide`)."""
    with SideBySide() as run:
        return run(fn, tasks)


class SideBySide:
    """A context whose call `run(fn, tasks)` -> {key: fn(*args)} runs the tasks on as many threads
    as there are cores. BLAS keeps one thread (the limit is set once for the whole context), so
    each result is the one a lone call gives; numpy and sklearn's loss release the GIL in their
    loops, so the calls overlap. One context serves many calls (robustness scores every batch)."""

    def __enter__(self):
        self._limits = threadpool_limits(limits=SKLEARN_BLAS_THREADS)
        workers = os.cpu_count() or 1
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        return self

    def __call__(self, fn: Callable, tasks: Mapping[str, tuple]) -> dict:
        if self._pool is None or len(tasks) < 2:
            return {key: fn(*args) for key, args in tasks.items()}
        futures = {key: self._pool.submit(fn, *args) for key, args in tasks.items()}
        return {key: future.result() for key, future in futures.items()}

    def __exit__(self, *exc_info):
        if self._pool is not None:
            self._pool.shutdown()
        self._limits.restore_original_limits()


def probe_accuracy(probe, features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of features [N, F] the probe labels as labels [N]."""
    with threadpool_limits(limits=SKLEARN_BLAS_THREADS):
        return float(probe.score(features, labels))


def latent_accuracy(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray,
                    y_test: np.ndarray) -> float:
    """Test accuracy of a linear probe on latents (Sect. 6.1.1).

    A logistic regression on standardised features (the latent scales differ by orders of
    magnitude between dimensions and models) is fitted on z_train [N, D] with labels [N] and
    scored on z_test [N', D] against y_test [N'].
    """
    probe = fit_latent_probe(z_train, y_train)
    check_finite_latents(z_test, "test")
    return probe_accuracy(probe, z_test, y_test)


def fit_latent_probe(z_train: np.ndarray, y_train: np.ndarray):
    """The fitted probe of `latent_accuracy` (kept to score noisy latents for robustness)."""
    check_finite_latents(z_train, "train")
    return fit_probe(z_train, y_train)


def check_finite_latents(z: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(z)):
        raise UserError(f"the model produced non-finite {name} latents; has training diverged?")


def latent_probes(context: EvalContext) -> dict:
    """{subset key: probe fitted on the clean train means}, fitted once per evaluation."""
    if "latent_probes" not in context.shared:
        train = context.train_latents
        context.shared["latent_probes"] = fit_probes(
            {schema.subset_key(s): (train.means[schema.subset_key(s)], train.labels) for s in context.subsets},
            fit=fit_latent_probe)
    return context.shared["latent_probes"]


def latent_accuracy_stage(context: EvalContext) -> None:
    """metrics.latent_accuracy: every subset's probe scored on the test means."""
    started = time.perf_counter()
    test, metrics = context.test_latents, context.metrics
    metrics.latent_accuracy = {}
    for key, probe in latent_probes(context).items():
        check_finite_latents(test.means[key], "test")
        metrics.latent_accuracy[key] = probe_accuracy(probe, test.means[key], test.labels)
    metrics.num_examples["latent_accuracy"] = {"train": context.train_latents.num_examples,
                                               "test": test.num_examples}
    logger.info("latent probes: %.1f s", time.perf_counter() - started)
