"""What every metric stage of `bmvae evaluate` shares: the run, its data, and cached encodings.

A stage (`evaluate.STAGES`) is a function of one `EvalContext` that fills its fields of
`context.metrics`. What several stages need is computed on first use and kept: the coherence
classifiers and the encodings of the train and the scored split.

The scored split is `test` unless `bmvae evaluate --split validation` asks for `validation`
(`EvalContext.split`). Stages name it "test" (`batches("test")`, `test_latents`); the context
reads the scored split in its place, so no stage can score one split and report another. Stages keep their own caches in
`shared` (e.g. the fitted latent probes, which robustness scores again on noisy inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import keras
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.trainers import config as config_lib
from bmvae_tf.trainers import input_pipeline, run_dir
from bmvae_tf.trainers.evaluation import classifiers as classifiers_lib
from bmvae_tf.trainers.evaluation.encodings import SplitLatents, encode_split
from bmvae_tf.trainers.evaluation.metrics import Metrics

logger = logging.getLogger(__name__)

CLASSIFIER_BATCH_SIZE = 128


@dataclasses.dataclass
class EvalContext:
    """One evaluation of a trained run.

    model: the MultimodalVAE with the run's weights. eval: the `eval` config section (with this
    evaluation's overrides). seed: the run's seed, the base of every random stream
    (`bmvae_tf.random_streams.EvalStream`). metrics: the record the stages fill.
    """

    model: Any
    manifest: schema.Manifest
    eval: config_lib.EvalConfig
    seed: int
    paths: run_dir.RunPaths
    history: list[dict]
    metrics: Metrics
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str = schema.TEST  # the scored split: test, or validation (`bmvae evaluate --split`)

    def __post_init__(self) -> None:
        # Every split is read for its fully observed rows only (`batches`); the record says how many.
        self.metrics.examples_fully_observed = self.manifest.fully_observed_count(self.split)

    @property
    def names(self) -> list[str]:
        return self.manifest.modality_names

    @property
    def subsets(self) -> list[tuple[str, ...]]:
        return schema.subset_names(self.names)

    def batches(self, split: str, batch_size: int | None = None, limit: int | None = None,
                options: input_pipeline.ReadOptions = input_pipeline.ReadOptions()) -> tf.data.Dataset:
        """One pass over `split` in batches of eval.batch_size, cut to eval.max_examples.
        "test" means the scored split (`self.split`)."""
        options = dataclasses.replace(options, fully_observed=True)  # rows missing a modality: not scored
        return input_pipeline.make_dataset(
            self.manifest, self.resolve(split), self.eval.batch_size if batch_size is None else batch_size, options,
            take=self.eval.max_examples if limit is None else limit)

    def resolve(self, split: str) -> str:
        """The split read for `split`: the scored split for "test", else `split` itself."""
        return self.split if split == schema.TEST else split

    @functools.cached_property
    def train_count(self) -> int:
        """Train examples the classifiers and probes see (eval.max_examples caps the split)."""
        count = self.manifest.fully_observed_count("train")
        return min(count, self.eval.max_examples) if self.eval.max_examples else count

    @functools.cached_property
    def classifiers(self) -> dict[str, keras.Model]:
        """The coherence classifiers: cached in RUN/classifiers or the dataset cache, else trained
        on real data."""
        started = time.perf_counter()
        classifiers = classifiers_lib.load_or_train(
            self.paths.classifiers, self.manifest,
            lambda: self.batches("train", CLASSIFIER_BATCH_SIZE,
                                 options=input_pipeline.ReadOptions(shuffle=True, seed=self.seed)),
            train_examples=self.train_count, batch_size=CLASSIFIER_BATCH_SIZE,
            epochs=self.eval.classifier_epochs, seed=self.seed, shared=self.eval.shared_cache)
        logger.info("classifiers ready: %.1f s", time.perf_counter() - started)
        return classifiers

    @property
    def classifier_fingerprints(self) -> dict[str, dict]:
        """{modality: what identifies its coherence classifier} (`classifiers.shared_fingerprints`)."""
        return classifiers_lib.shared_fingerprints(
            self.manifest, train_examples=self.train_count, batch_size=CLASSIFIER_BATCH_SIZE,
            epochs=self.eval.classifier_epochs, seed=self.seed)

    @functools.cached_property
    def test_latents(self) -> SplitLatents:
        """The scored split's means and cross-generated predictions (one posterior sample each)."""
        return self._encode("test", classifiers=self.classifiers, seed=self.seed)

    @functools.cached_property
    def train_latents(self) -> SplitLatents:
        """The train split's means (the probes' and the GMM's training data)."""
        return self._encode("train")

    def _encode(self, split: str, **kwargs) -> SplitLatents:
        started = time.perf_counter()
        latents = encode_split(self.model, self.batches(split), **kwargs)
        logger.info("encoded %d %s examples for %d subsets: %.1f s", latents.num_examples, self.resolve(split),
                    len(self.subsets), time.perf_counter() - started)
        return latents
