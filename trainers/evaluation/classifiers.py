"""Coherence classifiers: one small Keras classifier per modality, trained on real data.

Coherence (paper Sects. 6.1.2 and 6.3.2, SPEC 3) labels *generated* samples with a classifier
trained on *real* data of the same modality. The networks are deliberately small and
independent of the VAE's own encoders, so a coherence score does not reward a model for fooling
a network that shares its architecture:

- images with both sides >= 8: one to three stride-2 convolutions, then a dense layer;
  smaller images: an MLP;
- sequences: a token embedding, a 1-D convolution and global max pooling (shift-invariant, as
  MNIST-SVHN-Text pads its words by a random number of spaces);
- vectors: feature standardisation (adapted on the train split), then an MLP.

Every classifier outputs logits [batch, num_classes]. Trained classifiers are cached in
RUN/classifiers/<modality>.keras beside a <modality>.json fingerprint (dataset, shape, classes,
examples, epochs, seed); a cached classifier is reused only when its fingerprint matches. They
depend on the data and the seed alone, so the dataset cache (`dataset_cache`) also keeps them
for every later run evaluated on the same data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Iterable, Mapping

import keras
import tensorflow as tf

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.trainers.evaluation import dataset_cache

logger = logging.getLogger(__name__)

_MIN_CNN_SIDE = 8  # below this a stack of halving convolutions has nothing left to see
_MAX_HALVINGS = 3
_LEARNING_RATE = 1e-3
_FIT_BATCH_SIZE = 128


def classifier_input(spec: schema.ModalitySpec, x: tf.Tensor) -> tf.Tensor:
    """Casts a batch of modality values [B, *shape] to the dtype its classifier takes.

    Sequences come as int64 token ids (from the data and from `generate`'s argmax); the
    embedding takes int32. Everything else is float32.
    """
    return tf.cast(x, tf.int32 if spec.kind == "sequence" else tf.float32)


def batch_signature(specs: Iterable[schema.ModalitySpec]) -> dict[str, tf.TensorSpec]:
    """{modality: TensorSpec [None, *shape]} of a batch as `trainers.input_pipeline` yields it
    (int64 token ids; float32 otherwise, uint8 images arriving decoded), for tf.function
    signatures that trace once whatever the batch size."""
    return {spec.name: tf.TensorSpec([None, *spec.shape],
                                     tf.int64 if spec.dtype == "int64" else tf.float32)
            for spec in specs}


def build_classifier(spec: schema.ModalitySpec, num_classes: int) -> keras.Model:
    """An untrained classifier for one modality: [B, *shape] -> logits [B, num_classes].

    Vector classifiers start with a `Normalization` layer that still has to be adapted
    (`train_classifiers` does it on the train split).
    """
    name = f"classifier_{spec.name}"
    if spec.kind == "sequence":
        inputs = keras.Input(shape=spec.shape, dtype="int32", name=spec.name)
        h = keras.layers.Embedding(spec.vocab_size, 32)(inputs)
        h = keras.layers.Conv1D(64, 3, padding="same", activation="relu")(h)
        h = keras.layers.GlobalMaxPooling1D()(h)
        h = keras.layers.Dense(64, activation="relu")(h)
    elif spec.kind == "image" and min(spec.shape[:2]) >= _MIN_CNN_SIDE:
        inputs = keras.Input(shape=spec.shape, dtype="float32", name=spec.name)
        h, side = inputs, min(spec.shape[:2])
        # Stride-2 convolutions rather than conv + max-pool: a quarter of the FLOPs for the same
        # accuracy on Digits' street images (0.81 after 5 epochs either way), which matters
        # when the classifiers are trained on 2 CPU cores.
        for filters in (32, 64, 64)[:_MAX_HALVINGS]:
            if side < _MIN_CNN_SIDE:
                break
            h = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h)
            side //= 2
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(128, activation="relu")(h)
    else:
        inputs = keras.Input(shape=spec.shape, dtype="float32", name=spec.name)
        h = keras.layers.Flatten()(inputs)
        if spec.kind == "vector":
            # Vectors are unbounded (ResNet features, user arrays); images are already in [0, 1].
            h = keras.layers.Normalization(name="standardise")(h)
        h = keras.layers.Dense(256, activation="relu")(h)
        h = keras.layers.Dense(128, activation="relu")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, logits, name=name)


def train_classifiers(specs: Iterable[schema.ModalitySpec], num_classes: int,
                      make_train_dataset: Callable[[], tf.data.Dataset], *, steps_per_epoch: int,
                      epochs: int, seed: int) -> dict[str, keras.Model]:
    """Trains one classifier per modality in `specs` with one pass over the data per epoch.

    The classifiers share no weights and each has its own loss, so fitting them as outputs of
    one Keras model is the same as fitting them one by one, but reads the split once per epoch
    instead of once per modality and epoch.

    Args:
      specs: the modalities to train classifiers for.
      num_classes: C.
      make_train_dataset: returns one pass of shuffled batches {modality: [B, *shape],
        "label": [B]}.
      steps_per_epoch: batches per epoch. The data is repeated and cut into epochs by count,
        because Keras cannot size an epoch of a TFRecord stream of unknown length.
      epochs: passes over the data.
      seed: seeds weight initialisation and any other Keras randomness.

    Returns:
      {modality: trained classifier, [B, *shape] -> logits [B, C]}.
    """
    specs = list(specs)
    keras.utils.set_random_seed(seed)
    classifiers = {spec.name: build_classifier(spec, num_classes) for spec in specs}
    for spec in specs:
        if spec.kind == "vector":
            layer = classifiers[spec.name].get_layer("standardise")
            # A static feature size: Normalization was built for [None, size].
            flat = make_train_dataset().map(lambda b, n=spec.name, size=spec.size: tf.reshape(
                tf.cast(b[n], tf.float32), [-1, size]))
            layer.adapt(flat)

    inputs = {spec.name: keras.Input(shape=spec.shape, dtype=classifiers[spec.name].inputs[0].dtype,
                                     name=spec.name) for spec in specs}
    joint = keras.Model(inputs, {n: classifiers[n](x) for n, x in inputs.items()})
    joint.compile(optimizer=keras.optimizers.Adam(_LEARNING_RATE),
                  loss={n: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                        for n in classifiers})
    by_name = {spec.name: spec for spec in specs}

    def to_features_and_labels(batch):
        features = {n: classifier_input(by_name[n], batch[n]) for n in classifiers}
        return features, {n: batch["label"] for n in classifiers}

    start = time.perf_counter()
    joint.fit(make_train_dataset().map(to_features_and_labels).repeat(), epochs=epochs,
              steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0)
    logger.info("trained classifiers %s for %d epochs in %.1f s", sorted(classifiers), epochs,
                time.perf_counter() - start)
    return classifiers


def predict_classes(classifier: Callable[[tf.Tensor], tf.Tensor], spec: schema.ModalitySpec,
                    x: tf.Tensor) -> tf.Tensor:
    """Predicted class ids [B] (int64) of a batch of values [B, *shape]; graph-safe."""
    logits = classifier(classifier_input(spec, x), training=False)
    return tf.argmax(logits, axis=-1)


def accuracy(classifiers: Mapping[str, keras.Model], specs: Iterable[schema.ModalitySpec],
                  batches: Iterable[Mapping[str, tf.Tensor]]) -> dict[str, float]:
    """{modality: fraction of examples its classifier labels correctly}, over `batches`."""
    specs = [spec for spec in specs if spec.name in classifiers]

    signature = {**batch_signature(specs), "label": tf.TensorSpec([None], tf.int64)}

    @tf.function(input_signature=[signature])
    def correct(batch):
        return {spec.name: tf.reduce_sum(tf.cast(
            predict_classes(classifiers[spec.name], spec, batch[spec.name]) == batch["label"],
            tf.int64)) for spec in specs}

    hits = {spec.name: 0 for spec in specs}
    total = 0
    for batch in batches:
        for name, value in correct({key: batch[key] for key in signature}).items():
            hits[name] += int(value)
        total += int(tf.shape(batch["label"])[0])
    return {name: hits[name] / max(total, 1) for name in hits}


def fingerprint(manifest: schema.Manifest, spec: schema.ModalitySpec, *, train_examples: int,
                epochs: int, seed: int) -> dict:
    """What a cached classifier was trained on; a mismatch means it must be trained again."""
    return {"dataset": manifest.name, "modality": spec.name, "kind": spec.kind,
            "shape": list(spec.shape), "num_classes": manifest.label.num_classes,
            "train_examples": int(train_examples), "epochs": int(epochs), "seed": int(seed)}


def load_or_train(directory: str, manifest: schema.Manifest,
                  make_train_dataset: Callable[[], tf.data.Dataset], *, train_examples: int,
                  batch_size: int, epochs: int, seed: int, shared: bool = False) -> dict[str, keras.Model]:
    """Every modality's classifier: from `directory` when cached and current, else from the
    dataset cache (with `shared`), else trained.

    Only the classifiers found in neither place are trained (together); they are saved to
    `directory`/<modality>.keras with their fingerprint beside them, both written atomically,
    and with `shared` to the dataset cache, where the next run evaluated on the same data finds
    them (`dataset_cache`: the classifiers depend on the data and the seed, not on the model).

    Args:
      directory: RUN/classifiers.
      manifest: must have a label.
      make_train_dataset: returns one pass of shuffled train batches {modality: [B, *shape],
        "label": [B]} of `batch_size` examples.
      train_examples: how many train examples one pass holds (goes into the fingerprint).
      epochs, seed: as `train_classifiers`.
      shared: read and fill the dataset cache (eval.shared_cache).
    """
    if manifest.label is None:
        raise ValueError(f"dataset {manifest.name!r} has no labels to train classifiers on")
    tf.io.gfile.makedirs(directory)
    classifiers: dict[str, keras.Model] = {}
    stale = []
    expected_of = {spec.name: fingerprint(manifest, spec, train_examples=train_examples, epochs=epochs, seed=seed)
                   for spec in manifest.modalities}
    for spec in manifest.modalities:
        expected = expected_of[spec.name]
        model_path, print_path = _paths(directory, spec.name)
        if _read_fingerprint(print_path) != expected or not tf.io.gfile.exists(model_path):
            if not (shared and _copy_from_dataset_cache(manifest, expected, directory, spec.name, batch_size)):
                stale.append(spec)
                continue
        classifiers[spec.name] = _load_model(model_path)
        logger.info("reusing the cached classifier %s", model_path)
    if stale:
        trained = train_classifiers(stale, manifest.label.num_classes, make_train_dataset,
                                    steps_per_epoch=max(1, math.ceil(train_examples / batch_size)),
                                    epochs=epochs, seed=seed)
        for spec in stale:
            model_path, print_path = _paths(directory, spec.name)
            _save_model_atomic(trained[spec.name], model_path)
            _write_fingerprint(print_path, expected_of[spec.name])
            if shared:
                dataset_cache.store(manifest, _CACHE_KIND, _shared_fingerprint(expected_of[spec.name], batch_size),
                                    expected_of[spec.name], files={".keras": model_path})
        classifiers.update(trained)
    return {spec.name: classifiers[spec.name] for spec in manifest.modalities}


_CACHE_KIND = "classifiers"


def shared_fingerprints(manifest: schema.Manifest, *, train_examples: int, batch_size: int, epochs: int,
                        seed: int) -> dict[str, dict]:
    """{modality: the dataset cache's fingerprint of its classifier}: what identifies the
    classifiers, for results computed from them alone (their test accuracy)."""
    return {spec.name: _shared_fingerprint(fingerprint(manifest, spec, train_examples=train_examples,
                                                       epochs=epochs, seed=seed), batch_size)
            for spec in manifest.modalities}


def _shared_fingerprint(expected: dict, batch_size: int) -> dict:
    # Beyond the run cache's fingerprint: the training recipe, which a cache outliving the code
    # that filled it must also match (a changed network bumps `recipe`).
    return {**expected, "batch_size": int(batch_size), "learning_rate": _LEARNING_RATE, "recipe": 1}


def _copy_from_dataset_cache(manifest: schema.Manifest, expected: dict, directory: str, modality: str,
                             batch_size: int) -> bool:
    """Copies the dataset cache's classifier for `expected` into RUN/classifiers; False if absent."""
    shared = _shared_fingerprint(expected, batch_size)
    source = dataset_cache.entry_path(manifest, _CACHE_KIND, shared, ".keras")
    if dataset_cache.lookup(manifest, _CACHE_KIND, shared) is None or not tf.io.gfile.exists(source):
        return False
    model_path, print_path = _paths(directory, modality)
    with atomic.publishing(model_path, keep_suffix=".keras") as tmp:
        tf.io.gfile.copy(source, tmp, overwrite=True)
    _write_fingerprint(print_path, expected)
    return True


def _load_model(path: str) -> keras.Model:
    """A cached classifier; one that cannot be loaded safely (a Lambda layer, which would run
    arbitrary code, or a damaged file) is a UserError naming it."""
    try:
        return keras.saving.load_model(path)  # safe_mode: no Lambda layers, no pickled code
    except Exception as e:  # noqa: BLE001 -- Keras raises ValueError, OSError, zip and HDF5 errors
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        reason = "it holds a Lambda layer (arbitrary code), refused" if "Lambda" in str(e) \
            else f"cannot be loaded ({first[:200]})"
        raise UserError(f"{path}: {reason}; delete it and `bmvae evaluate` trains the classifier "
                        "again") from None


def _paths(directory: str, modality: str) -> tuple[str, str]:
    return os.path.join(directory, f"{modality}.keras"), os.path.join(directory, f"{modality}.json")


def _write_fingerprint(path: str, expected: dict) -> None:
    atomic.write_text(path, json.dumps(expected, indent=2) + "\n")


def _read_fingerprint(path: str) -> dict | None:
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except json.JSONDecodeError:
        return None  # a corrupt fingerprint only costs a retraining


def _save_model_atomic(model: keras.Model, path: str) -> None:
    # Keras insists on the .keras suffix, so the temporary name keeps it.
    with atomic.publishing(path, keep_suffix=".keras") as tmp:
        model.save(tmp)

