"""Every subset of a batch in one traced call, each encoder run once per distinct input.

`subsets.run_subsets` calls one step per subset and batch, and in each the model runs all M
encoders on the batch with the absent modalities zeroed: 2^M - 1 passes of every encoder per
batch (63 x 6 on a six-view set), although each encoder only ever sees two distinct inputs, its
modality's values or zeros. Encoding was most of the evaluation's compute.

`run_all_subsets` yields what `run_subsets` yields, bit for bit, from one traced call per batch:
the step builds each subset's inputs from the same two tensors per modality (the values, or one
zeros tensor), and `encoders_once` makes the model's encoders return the output of their first
call on a given tensor. Every expert is then computed once for real values and once for zeros,
and each subset's posterior combines them exactly as before (an encoder's output on a tensor does
not depend on which subset asked). The seeds are those of `run_subsets`' schemes, computed in the
graph.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.trainers.evaluation.classifiers import batch_signature
from bmvae_tf.trainers.evaluation.subsets import SeedScheme

# body(inputs {modality: [B, *shape]} with the absent ones zeroed, present bool [M], seed int32 [2])
Body = Callable[[Mapping[str, tf.Tensor], tf.Tensor, tf.Tensor], Any]


@contextlib.contextmanager
def encoders_once(model):
    """While the block runs (a trace), the model's encoders are memoised by input tensor: a second
    call on the same tensor returns the first call's output, so one graph holds one pass per
    distinct input. A model without `encoders` (test stand-ins) is left as it is."""
    originals = getattr(model, "encoders", None)
    if originals is None:
        yield
        return
    memo: dict = {}

    def once(index: int, encoder):
        def call(x, *args, **kwargs):
            if args or kwargs or not isinstance(x, tf.Tensor):
                return encoder(x, *args, **kwargs)
            key = (index, x.ref())
            if key not in memo:
                memo[key] = encoder(x)
            return memo[key]
        return call

    # object.__setattr__: Keras would track the wrappers as layers; they live only for the trace.
    object.__setattr__(model, "encoders", [once(i, e) for i, e in enumerate(originals)])
    try:
        yield
    finally:
        object.__setattr__(model, "encoders", originals)


def subset_seeds(scheme: SeedScheme, seed: tf.Tensor, batch_index: tf.Tensor, count: int) -> list[tf.Tensor]:
    """The seeds int32 [2] `run_subsets` passes to subsets 0..count-1 of batch `batch_index`."""
    fold = tf.random.experimental.stateless_fold_in
    if scheme is SeedScheme.BATCH_THEN_SUBSET:
        batch_seed = fold(seed, batch_index)
        return [fold(batch_seed, k) for k in range(count)]
    if scheme is SeedScheme.BATCH:
        return [fold(seed, batch_index)] * count
    if scheme is SeedScheme.SUBSET:
        return [fold(seed, k) for k in range(count)]
    return [tf.zeros([2], tf.int32)] * count


def subset_inputs(inputs: Mapping[str, tf.Tensor], names: Sequence[str],
                  subsets: Sequence[Sequence[str]]) -> list[tuple[dict[str, tf.Tensor], tf.Tensor]]:
    """(inputs with the absent modalities zeroed, present bool [M]) of every subset, built from
    one zeros tensor per modality (so `encoders_once` sees two distinct inputs per encoder)."""
    zeros = {n: tf.zeros_like(inputs[n]) for n in names}
    return [({n: inputs[n] if n in subset else zeros[n] for n in names}, tf.constant([n in subset for n in names]))
            for subset in subsets]


def all_subsets_step(model, body: Body, subsets: Sequence[Sequence[str]], scheme: SeedScheme) -> Callable:
    """One tf.function (inputs, seed int32 [2], batch index int32 []) -> [body's output per subset],
    traced once for every batch."""
    specs = list(model.modalities)
    names = [spec.name for spec in specs]

    def step(inputs, seed, batch_index):
        seeds = subset_seeds(scheme, seed, batch_index, len(subsets))
        with encoders_once(model):
            return [body(given, present, seeds[k])
                    for k, (given, present) in enumerate(subset_inputs(inputs, names, subsets))]

    return tf.function(step, input_signature=[batch_signature(specs), tf.TensorSpec([2], tf.int32),
                                              tf.TensorSpec([], tf.int32)])


def run_all_subsets(model, body: Body, batches: Iterable[Mapping[str, tf.Tensor]],
                    subsets: Sequence[Sequence[str]], *, seed: tf.Tensor | None = None,
                    scheme: SeedScheme = SeedScheme.NONE) -> Iterator[tuple[Mapping, dict[str, Any]]]:
    """`subsets.run_subsets(masked_step(model.modalities, body), ...)` in one call per batch:
    yields (batch, {subset key: body's output}) with the same values and seeds."""
    names = [spec.name for spec in model.modalities]
    step = all_subsets_step(model, body, subsets, scheme)
    seed = tf.zeros([2], tf.int32) if seed is None else seed
    for batch_index, batch in enumerate(batches):
        outputs = step({n: batch[n] for n in names}, seed, tf.constant(batch_index, tf.int32))
        yield batch, {schema.subset_key(s): out for s, out in zip(subsets, outputs)}
