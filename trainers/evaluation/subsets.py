"""Subsets of modalities: masking, keys, and the one loop that runs a model on every subset.

Most metrics ask the same question of every non-empty subset S of the modalities: what does the
model make of a batch when only S is given? `run_subsets` is that loop, written once: for each
batch and each subset it zeroes the absent modalities (`mask_inputs`, as the SavedModel does,
SPEC 5) and calls one step with the subset's presence mask and a stateless seed. The seed scheme
is the caller's (`SeedScheme`), so every metric keeps the draws it always had.

Keys: a subset is its modality names joined by "+" in manifest order (`schema.subset_key`);
"t|a+b" (`coherence_key`) is modality t generated given a and b.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation.classifiers import batch_signature

# step(inputs {modality: [B, *shape]}, present bool [M], seed int32 [2]) -> anything
Step = Callable[[Mapping[str, tf.Tensor], tf.Tensor, tf.Tensor], Any]
_NO_SEED = (0, 0)  # what a step that draws nothing is passed


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


def presence_masks(names: Sequence[str], subsets: Sequence[Sequence[str]]) -> dict[str, tf.Tensor]:
    """{subset key: bool [M]}, True where the modality is given."""
    return {schema.subset_key(s): tf.constant([n in s for n in names]) for s in subsets}


def stream_seed(seed: int, stream: EvalStream) -> tf.Tensor:
    """The stateless seed int32 [2] of one of the run's random streams."""
    return tf.constant([seed, stream], tf.int32)


def masked_step(specs: Sequence[schema.ModalitySpec], body: Step, *, traced: bool = True) -> Step:
    """`body` run on the batch with its absent modalities zeroed.

    traced: wrap the step in one tf.function. `present` and the seed are inputs rather than
    constants and the batch size is left open, so the graph is traced once for every subset and
    batch: tracing, not compute, dominated the cost. A step run on one small batch (the plots)
    stays eager, where tracing would cost more than it saves.
    """
    names = [spec.name for spec in specs]

    def step(inputs, present, seed):
        return body(mask_inputs(inputs, present, names), present, seed)

    if not traced:
        return step
    return tf.function(step, input_signature=[batch_signature(specs), tf.TensorSpec([len(names)], tf.bool),
                                              tf.TensorSpec([2], tf.int32)])


class SeedScheme(enum.Enum):
    """What the seed of one (batch, subset) call folds into the stream's seed."""

    BATCH_THEN_SUBSET = "batch, then subset"  # fold_in(fold_in(seed, batch index), subset index)
    BATCH = "batch"  # fold_in(seed, batch index): every subset of a batch draws alike
    SUBSET = "subset"  # fold_in(seed, subset index): for a single batch
    NONE = "none"  # the step draws nothing


def call_seed(scheme: SeedScheme, seed: tf.Tensor | None, batch_index, subset_index) -> tf.Tensor:
    """The seed int32 [2] subset `subset_index` of batch `batch_index` is given (Python ints, or
    tensors inside a traced step)."""
    fold = tf.random.experimental.stateless_fold_in
    if scheme is SeedScheme.BATCH_THEN_SUBSET:
        return fold(fold(seed, batch_index), subset_index)
    if scheme is SeedScheme.BATCH:
        return fold(seed, batch_index)
    if scheme is SeedScheme.SUBSET:
        return fold(seed, subset_index)
    return tf.constant(_NO_SEED, tf.int32)


def run_subsets(step: Step, batches: Iterable[Mapping[str, tf.Tensor]], names: Sequence[str],
                subsets: Sequence[Sequence[str]], *, seed: tf.Tensor | None = None,
                scheme: SeedScheme = SeedScheme.NONE) -> Iterator[tuple[Mapping, dict[str, Any]]]:
    """THE per-subset loop: yields (batch, {subset key: step's output}) for every batch.

    Args:
      step: a `masked_step` (it masks the absent modalities itself).
      batches: {modality: [B, *shape], ...}; other keys (labels, metadata) are passed through.
      names: the modalities in manifest order (the order of `present`).
      subsets: the subsets to run, in order; a subset's index in this list is what it folds in.
      seed: the stream's stateless seed int32 [2] (`stream_seed`); unused with SeedScheme.NONE.
      scheme: how each call's seed derives from `seed`.
    """
    masks = presence_masks(names, subsets)
    for batch_index, batch in enumerate(batches):
        inputs = {n: batch[n] for n in names}
        outputs = {}
        for subset_index, subset in enumerate(subsets):
            key = schema.subset_key(subset)
            outputs[key] = step(inputs, masks[key], call_seed(scheme, seed, batch_index, subset_index))
        yield batch, outputs


def prior_latents(model, num: int, seed: int) -> np.ndarray:
    """`num` latents [num, D] from the model's prior p(z) (random coherence and CCA's joint)."""
    z = model.prior().sample([num], seed=stream_seed(seed, EvalStream.PRIOR))
    return tf.reshape(z, [num, model.latent_dim]).numpy()
