"""Every named random stream of the product, in one place.

A stream id tags one random quantity within a seed: the evaluation draws from the stateless seed
(run seed, stream) [2], a data build from numpy's `default_rng([seed, stream, ...])`. Giving each
quantity its own id means adding a quantity leaves every other number as it was. Ids only have to
differ within a family (the quantities drawn from the same seed); `tests/test_random_streams.py`
fails if two members of a family share one.

Data builds tag the second entropy word with a non-zero id: numpy's SeedSequence treats entropy
lists that differ only by trailing zeros as equal ([s] == [s, 0]).

Keyed by counters rather than ids, and so not listed: the training step's noise
(run seed, global step) and the validation loss's (run seed, batch index) in `trainers/train.py`,
split into per-term streams by `bmvae_tf.noise.Noise.split`; the epoch order's shuffle seed
(`seed * 100003 + epoch`); the SavedModel's fixed posterior seed (0, 0) and `sample`'s (seed, 0)
in `trainers/export.py`.
"""

from __future__ import annotations

import enum


class EvalStream(enum.IntEnum):
    """Streams of the run's seed drawn by `bmvae evaluate` and `bmvae analyze`."""

    COHERENCE = 1  # one posterior sample per test example and subset, decoded for coherence
    PRIOR = 2  # prior latents of random coherence and CCA's joint coherence
    LOG_LIKELIHOOD = 3  # importance samples of the IWAE estimates
    CROSS_GENERATION_PLOT = 4  # the posterior samples drawn for cross_generation_<given>.png
    ROBUSTNESS_NOISE = 5  # the noise added to the test inputs at each level
    DIMENSION_SWAP = 6  # prior draws of `bmvae analyze`'s dimension-swap grids
    CCA = 7  # posterior samples of CCA's cross coherences (was 5, which robustness also used)
    PRIOR_SAMPLE_PLOT = 8  # the prior latents drawn for prior_samples.png


class TrainingStream(enum.IntEnum):
    """Streams of the run's seed drawn during training, outside the optimisation step."""

    TEXT_PADDING = 0  # MNIST-SVHN-Text's padding, redrawn per batch (`input_pipeline.make_dataset`)
    SUMMARY_IMAGES = 1  # TensorBoard's cross-generation and prior-sample images (`training/summaries.py`)
    MODALITY_DROPOUT = 2  # folded into the step's seed (run seed, global step): which modalities
    # `train.modality_dropout` hides (`training/steps.training_inputs`, `keras_fit`)


class DigitsStream(enum.IntEnum):
    """Streams of `bmvae data build digits`' seed (`pipeline/digits.py`); the split permutation
    uses `default_rng(seed)` itself."""

    PAIRING = 1  # which images of a class pair up
    RENDER = 2  # the private factors each pair is rendered with
    VALIDATION = 3  # which train source images are held out for the validation split


class MnistSvhnStream(enum.IntEnum):
    """Streams of `bmvae data build mnist-svhn`'s seed (`pipeline/mnist_svhn.py`)."""

    PAIRING = 1  # the per-class random permutations that pair MNIST with SVHN
    TEXT = 2  # the text modality's padding
    ORDER = 3  # the order of the written examples
    VALIDATION = 4  # which train source images of each class are held out for validation


class ArraysStream(enum.IntEnum):
    """Streams of `bmvae data build arrays`' seed (`pipeline/arrays.py`)."""

    TEST_SPLIT = 7  # keys the permutation that picks the test rows (and, next in its order,
    # the validation rows when the archive has no `split`)
    VALIDATION_SPLIT = 8  # keys the validation rows carved from a `split` key's train rows


class CubStream(enum.IntEnum):
    """Streams of `bmvae data build cub`'s seed (`pipeline/cub.py`); FastText takes the seed itself."""

    VALIDATION = 1  # which train (trainval) classes are held out for the validation split


class ModelStream(enum.IntEnum):
    """Fixed seeds (stream, 0) a model draws from inside `posterior`, which no run seed reaches.

    As with the SavedModel's fixed posterior seed, a draw depends on the example's row and on the
    batch size, not on the other rows' values, so evaluation and export stay deterministic.
    """

    SUBSET_WEIGHTS = 1  # BMVAE_P's pi ~ Dir(beta) of a subset posterior (`subset_weights: sample`)


FAMILIES: tuple[type[enum.IntEnum], ...] = (EvalStream, TrainingStream, DigitsStream, MnistSvhnStream,
                                            ArraysStream, CubStream, ModelStream)
