"""Every subset of a batch in one traced call, each encoder run once per distinct input.

`subsets.run_subsets` calls one step per subset and batch, and in each the model runs all M
encoders on the batch with the absent modalities zeroed: 2^M - 1 passes of every encoder per
batch (63 x 6 on a six-view set), although each encoder only ever sees two distinct inputs, its
modality's values or zeros. Encoding was most of the evaluation's compute.

`run_all_subsets` yields what `run_subsets` yields, bit for bit, from one traced call per batch:
each encoder runs once on its modality's values and once on zeros, and a tf.map_fn over the
subsets runs the step's body with the encoders answering from those outputs
(`encoders_selected`): an encoder's output on a subset's masked input is one of the two, so each
subset's posterior combines exactly what it combined before. The graph holds one copy of the
body whatever the number of subsets (63 on six views), so tracing stays cheap. The seeds are
those of `run_subsets`' schemes, computed in the graph.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import tensorflow as tf

from bmvae_tf import distributions, schema
from bmvae_tf.trainers.evaluation.classifiers import batch_signature, predict_classes
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from bmvae_tf.trainers.evaluation.subsets import SeedScheme

# body(inputs {modality: [B, *shape]} with the absent ones zeroed, present bool [M], seed int32 [2])
Body = Callable[[Mapping[str, tf.Tensor], tf.Tensor, tf.Tensor], Any]


@contextlib.contextmanager
def encoders_selected(model, real: Sequence, zeros: Sequence, present: tf.Tensor):
    """While the block runs (a trace), encoder m returns its precomputed output on the modality's
    values, real[m], where present[m], and on zeros, zeros[m], elsewhere: what it computes on the
    inputs of subset `present` with the absent modalities zeroed, without running again. A model
    without `encoders` (test stand-ins) is left as it is and computes as usual."""
    originals = getattr(model, "encoders", None)
    if originals is None:
        yield
        return

    def selected(index: int):
        def call(x, *args, **kwargs):
            del x, args, kwargs  # the subset's masked input: its two possible outputs are known
            return tf.nest.map_structure(lambda r, z: tf.where(present[index], r, z), real[index], zeros[index])
        return call

    # object.__setattr__: Keras would track the wrappers as layers; they live only for the trace.
    object.__setattr__(model, "encoders", [selected(i) for i in range(len(originals))])
    try:
        yield
    finally:
        object.__setattr__(model, "encoders", originals)


def all_subsets_step(model, body: Body, subsets: Sequence[Sequence[str]], scheme: SeedScheme,
                     output_signature) -> Callable:
    """One tf.function (inputs, seed int32 [2], batch index int32 []) -> body's outputs stacked over
    the subsets ([S, ...] each), traced once for every batch and for any number of subsets.

    Each encoder runs twice per batch, on its modality's values and on zeros; a tf.map_fn over
    the subsets then runs `body` on each subset's masked inputs with the encoders answering from
    those two outputs (`encoders_selected`), so the graph holds one copy of `body`.
    output_signature: body's output structure of dtypes (tf.map_fn's fn_output_signature).
    """
    specs = list(model.modalities)
    names = [spec.name for spec in specs]
    masks = tf.constant([[n in subset for n in names] for subset in subsets])                # [S, M]
    encoders = getattr(model, "encoders", None)

    def step(inputs, seed, batch_index):
        real = zeros = None
        if encoders is not None:
            real = [encoder(inputs[n]) for n, encoder in zip(names, encoders)]
            zeros = [encoder(tf.zeros_like(inputs[n])) for n, encoder in zip(names, encoders)]

        def one(subset_index):
            present = masks[subset_index]
            with encoders_selected(model, real, zeros, present):
                return body(subsets_lib.mask_inputs(inputs, present, names), present,
                            subsets_lib.call_seed(scheme, seed, batch_index, subset_index))

        return tf.map_fn(one, tf.range(len(subsets)), fn_output_signature=output_signature)

    return tf.function(step, input_signature=[batch_signature(specs), tf.TensorSpec([2], tf.int32),
                                              tf.TensorSpec([], tf.int32)])


def run_all_subsets(model, body: Body, batches: Iterable[Mapping[str, tf.Tensor]],
                    subsets: Sequence[Sequence[str]], *, output_signature, seed: tf.Tensor | None = None,
                    scheme: SeedScheme = SeedScheme.NONE,
                    step: Callable | None = None) -> Iterator[tuple[Mapping, dict[str, Any]]]:
    """`subsets.run_subsets(masked_step(model.modalities, body), ...)` in one call per batch:
    yields (batch, {subset key: body's output}) with the same values and seeds. step: an
    `all_subsets_step` of the same body and subsets already traced, to reuse."""
    names = [spec.name for spec in model.modalities]
    step = step or all_subsets_step(model, body, subsets, scheme, output_signature)
    seed = tf.zeros([2], tf.int32) if seed is None else seed
    for batch_index, batch in enumerate(batches):
        outputs = step({n: batch[n] for n in names}, seed, tf.constant(batch_index, tf.int32))
        yield batch, {schema.subset_key(s): tf.nest.map_structure(lambda t, k=k: t[k], outputs)
                      for k, s in enumerate(subsets)}


_POSTERIOR_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def posterior_step(model, subsets: Sequence[Sequence[str]]) -> Callable:
    """The `all_subsets_step` of {"mean": posterior mean [B, D], "z": one posterior sample [B, D]}
    with `SeedScheme.BATCH_THEN_SUBSET`, made once per model and subsets: the evaluation encodes
    the train, test and noisy test splits with one traced graph."""
    key = tuple(tuple(s) for s in subsets)
    cache = _POSTERIOR_STEPS.setdefault(model, {})
    if key not in cache:
        def body(inputs, present, sample_seed):
            posterior = model.posterior(inputs, present)
            return {"mean": posterior.mean(), "z": posterior.sample(seed=sample_seed)}
        cache[key] = all_subsets_step(model, body, subsets, SeedScheme.BATCH_THEN_SUBSET,
                                      {"mean": tf.float32, "z": tf.float32})
    return cache[key]


_PREDICTION_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prediction_step(model, classifiers: Mapping[str, Callable]) -> Callable:
    """A tf.function ([z_m [N_m, D] for every modality m]) -> [classes [N_m] of modality m decoded
    from z_m and labelled by its classifier]: each modality decodes only its own latents (cross
    coherence decodes for a modality the samples of the subsets that lack it, random coherence the
    same latents for all). Made and traced once per model and classifiers."""
    cache = _PREDICTION_STEPS.setdefault(model, {})
    key = tuple((name, id(classifier)) for name, classifier in classifiers.items())
    if key not in cache:
        specs = list(model.modalities)

        def decode(index, spec, z):
            if hasattr(model, "decode_params"):  # only this modality's decoder
                return distributions.likelihood_mean(spec, model.decode_params(index, z))
            return model.generate(z)[spec.name]  # a stand-in with `generate` alone

        @tf.function(input_signature=[[tf.TensorSpec([None, model.latent_dim], tf.float32) for _ in specs]])
        def predict(latents):
            return [predict_classes(classifiers[spec.name], spec, decode(m, spec, z))
                    for m, (spec, z) in enumerate(zip(specs, latents))]

        cache[key] = predict
    return cache[key]
