"""One pass over a split: posterior means of every subset and cross-generated class predictions.

Latent probes, cross coherence and the ex-post GMM all read the same encodings, so the evaluation
context computes them once per split (`EvalContext.train_latents`, `test_latents`);
`bmvae analyze` uses them too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import batched
from bmvae_tf.trainers.evaluation import subsets as subsets_lib


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
        posterior sample per example (stateless, from `seed`, the batch and the subset index),
        decodes every modality t not in S and records the predicted class under "t|S".
      seed: the run's seed (stream EvalStream.COHERENCE).
    """
    specs = list(model.modalities)
    names = [spec.name for spec in specs]
    subsets = schema.subset_names(names)
    outputs_of = _all_subsets_encoder(model, subsets, classifiers)
    means: dict[str, list] = {schema.subset_key(s): [] for s in subsets}
    predictions: dict[str, list] = {}
    labels = []
    for batch_index, batch in enumerate(batches):
        outputs = outputs_of({n: batch[n] for n in names}, subsets_lib.stream_seed(seed, EvalStream.COHERENCE),
                             tf.constant(batch_index, tf.int32))
        for subset in subsets:
            out = outputs[schema.subset_key(subset)]
            means[schema.subset_key(subset)].append(out["mean"])
            for name, predicted in out["predictions"].items():
                predictions.setdefault(subsets_lib.coherence_key(name, subset), []).append(predicted)
        if "label" in batch:
            labels.append(np.asarray(batch["label"]))
    if not means[schema.subset_key(names)]:
        raise UserError("the split to evaluate holds no examples")
    return SplitLatents(labels=np.concatenate(labels) if labels else None,
                        means={k: np.concatenate(v) for k, v in means.items()},
                        cross_predictions={k: np.concatenate(v) for k, v in predictions.items()})


def _all_subsets_encoder(model, subsets: list[tuple[str, ...]], classifiers: Mapping[str, Callable] | None):
    """(inputs, stream seed, batch index) -> {subset key: {"mean": [B, D], "predictions":
    {target: [B]} (with classifiers)}}: every subset encoded in one traced call with each encoder
    run once (`batched.posterior_step`); each modality t is decoded and classified once, from the
    posterior samples of all subsets that lack it, as one batch. The draws are those of the
    per-subset loop (`SeedScheme.BATCH_THEN_SUBSET`)."""
    step = batched.posterior_step(model, subsets)
    names = [spec.name for spec in model.modalities]
    predict = None if classifiers is None else batched.prediction_step(model, classifiers)
    lacking = {t: [k for k, s in enumerate(subsets) if t not in s] for t in names}

    def run(inputs, seed, batch_index):
        outputs = step(inputs, seed, batch_index)                  # {"mean", "z"}: [S, B, D]
        means = outputs["mean"].numpy()
        result = {schema.subset_key(s): {"mean": means[k], "predictions": {}} for k, s in enumerate(subsets)}
        if predict is None:
            return result
        z = outputs["z"]
        latents = [tf.reshape(tf.gather(z, lacking[t]), [-1, z.shape[-1]]) for t in names]   # [S_t * B, D]
        for target, predicted in zip(names, predict(latents)):
            for k, part in zip(lacking[target], np.split(predicted.numpy(), max(len(lacking[target]), 1))):
                result[schema.subset_key(subsets[k])]["predictions"][target] = part
        return result

    return run
