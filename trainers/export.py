"""`bmvae export`: a trained run as a self-contained SavedModel (SPEC section 5).

The SavedModel loads with `tf.saved_model.load` in a process that has only TensorFlow: the
TensorFlow Probability maths is traced into plain graph ops. Its signatures, with M modalities in
manifest order and B the batch size:

- `encode`: one tensor per modality, named by modality and batch-first ([B, *shape]; float32 for
  images and vectors, uint8 images included, as [0, 1] floats; int64 token ids for sequences),
  plus `present`: bool [B, M], the modalities each row gives (or bool [M], one subset for every
  row; the signature declares it of unknown rank to take both). Per-row masks make TF Serving's
  row format ("instances", one `present` list per instance) and server-side batching work.
  Returns `z_mean` [B, D], the mean of each row's joint posterior of its present modalities, and
  `z_sample` [B, D], one draw from it.
- `cross_generate`: the same inputs; returns one output per modality, named by modality: the
  decoded mean ([B, *shape] float32; [B, L] int64 most likely tokens for sequences) of a
  posterior sample. It decodes exactly `encode`'s `z_sample`.
- `sample`: `num` (int32 scalar) and `seed` (int32 scalar); returns one output per modality,
  decoded from `num` prior samples.
- `serving_default`: `cross_generate`.

Absent modalities (present[b, m] = False) are fed as zeros of their shape; they are replaced by
zeros inside the graph, so whatever values are fed for them cannot change any output.

Inputs are checked inside the graph: an empty batch, inputs whose batch sizes differ, token ids
of a present sequence outside [0, vocabulary size), `num` < 1, a `present` of another shape than
[B, M] or [M], and a row of `present` with no modality fail the call with an
InvalidArgumentError whose message names the input.

Units: a modality that the dataset job transformed (its manifest `standardization`, e.g. the
standardised vectors and rescaled [0, 255] images of `bmvae data build arrays`) is fed and
returned in the units of the source data: the signatures apply (x - offset) / scale to it on
the way in and x * scale + offset to the decoded outputs.

Determinism: every random draw is stateless. `encode` and `cross_generate` have no seed input and
draw with the fixed seed POSTERIOR_SEED = (0, 0), so the same batch always gives the same outputs.
The draw for one example depends on its row and on the batch size, not on the other rows' values.
BMVAE_P's subset posterior is a product weighted by pi ~ Dir(beta) (the paper's Sect. 6.3.1,
`model.bmvae_p.subset_weights: sample`): its pi comes from the model's own fixed stateless seed
SUBSET_WEIGHTS_SEED, keyed by the row, so `z_mean` is deterministic too; with `subset_weights:
mean` it is E[pi] and no draw. `sample` draws with the stateless seed (seed, 0).

The SavedModel also carries `manifest_json` (a tf.string scalar: the dataset manifest, with the
modality order, shapes and vocabularies) and `modality_names` (tf.string [M]), for servers, and
two kinds of asset files (in `assets/`, reachable after loading as `loaded.metadata.asset_path`
and `loaded.vocabularies[NAME].asset_path`):
- `metadata.json`: the modalities in `present`'s order with their kind, shape, serving dtype,
  likelihood and units (the source units the signatures take and return, with the offset and
  scale applied inside), each sequence's vocabulary file, the latent size and the signatures.
- `vocabulary_NAME.txt` for each sequence modality NAME: its tokens, one per line, line i (from
  0) holding token id i.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.models.base import MultimodalVAE
from bmvae_tf.trainers import run_dir

tfd = tfp.distributions

POSTERIOR_SEED = (0, 0)
PRESENT = "present"
SIGNATURE_NAMES = ("encode", "cross_generate", "sample", "serving_default")

# TensorFlow rewrites signature argument names outside this pattern (e.g. "my-image" becomes
# "my_image", "_x" becomes "arg__x"), which would break the contract that inputs are named by
# modality, so such names are refused instead of silently renamed.
_SIGNATURE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


def serving_dtype(spec: schema.ModalitySpec) -> tf.DType:
    """The dtype a modality is fed in: int64 for token ids, else float32 (uint8 images as [0, 1])."""
    return tf.int64 if spec.dtype == "int64" else tf.float32


class ServingModule(tf.Module):
    """The tf.Module whose functions become the SavedModel's signatures (see the module docstring).

    Works on an in-memory model as well: `module.signatures()[name](**feed)` takes keyword tensors
    named as in the SavedModel, and `module.encode(*tensors, present)` takes them positionally in
    manifest order.

    Args:
      model: a MultimodalVAE over the manifest's modalities. Its variables are created here first,
        when it has not been called yet, because tracing must not create variables.
      manifest: the dataset manifest the model was trained on.

    Raises:
      UserError: a modality name that cannot be a signature key unchanged, or is `present`.
    """

    def __init__(self, model: MultimodalVAE, manifest: schema.Manifest):
        super().__init__(name="bmvae_serving")
        for name in manifest.modality_names:
            if not _SIGNATURE_KEY.match(name) or name == PRESENT:
                raise UserError(f"modality {name!r} cannot name a SavedModel input: export needs names "
                                f"of ASCII letters, digits and '_', starting with a letter, other "
                                f"than {PRESENT!r}")
        if list(model.modality_names) != manifest.modality_names:
            raise ValueError(f"the model's modalities {model.modality_names} differ from the "
                             f"manifest's {manifest.modality_names}")
        run_dir.build_variables(model, manifest)
        self.model = model
        # The model's tf.Variables themselves, tracked so the SavedModel's object graph and its
        # restore op hold them: Keras 3 variables are not TensorFlow trackables, and without
        # this the functions only capture them, which tf.saved_model.load restores but the
        # session loaders of saved_model_cli run and TF Serving do not ("Could not find
        # variable"; keras-team/keras#19274).
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        self.manifest_json = tf.Variable(json.dumps(manifest.to_json()), trainable=False,
                                         name="manifest_json")
        self.modality_names = tf.Variable(manifest.modality_names, trainable=False,
                                          name="modality_names")
        self._modalities = tuple(manifest.modalities)
        self._units = {m.name: source_units(m) for m in self._modalities}

        inputs = [tf.TensorSpec([None, *m.shape], serving_dtype(m), name=m.name)
                  for m in self._modalities]
        # Unknown rank: [B, M] per row, or the [M] of one subset for every row.
        inputs.append(tf.TensorSpec(None, tf.bool, name=PRESENT))
        self.encode = tf.function(self._encode, input_signature=inputs)
        self.cross_generate = tf.function(self._cross_generate, input_signature=inputs)
        self.sample = tf.function(self._sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num"), tf.TensorSpec([], tf.int32, name="seed")])

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The four signatures, keyed by SIGNATURE_NAMES, for `tf.saved_model.save`."""
        cross_generate = self.cross_generate.get_concrete_function()
        return {"encode": self.encode.get_concrete_function(),
                "cross_generate": cross_generate,
                "sample": self.sample.get_concrete_function(),
                "serving_default": cross_generate}

    def _posterior(self, args: tuple[tf.Tensor, ...]) -> tfd.Distribution:
        """The joint posterior of the present modalities: batch [B], event [D].

        args: one [B, *shape] tensor per modality in manifest order, then present: bool [M].
        """
        *values, present = args
        present = self._present_rows(present, tf.shape(values[0])[0])                   # [B, M]
        checks = [tf.debugging.Assert(tf.reduce_all(tf.reduce_any(present, axis=1)), [
            "input `present`: every row must mark at least one modality; rows without one:",
            tf.where(tf.logical_not(tf.reduce_any(present, axis=1)))[:, 0]]),
                  *self._check_inputs(values, present)]
        # The checks run before the model: else a model op could fail first on a bad input.
        with tf.control_dependencies(checks):
            values, present = [tf.identity(x) for x in values], tf.identity(present)
        # The posterior already gives absent experts zero weight, but 0 * NaN is NaN: zeroing the
        # absent inputs makes any fed value, non-finite ones included, harmless.
        inputs = {spec.name: tf.where(_rows(present[:, i], x), self._to_model_units(spec.name, x),
                                      tf.zeros_like(x))
                  for i, (spec, x) in enumerate(zip(self._modalities, values))}
        return self.model.posterior(inputs, present)

    def _present_rows(self, present: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
        """`present` as bool [B, M] (an [M] mask holds for every row), after checking its shape."""
        num = len(self._modalities)
        shape, rank = tf.shape(present), tf.rank(present)
        wanted = (f"input `present`: must be bool [batch, {num}] (or [{num}] for every row), one "
                  f"column per modality ({', '.join(m.name for m in self._modalities)}); got shape")
        checks = [tf.debugging.Assert(
            tf.logical_and(tf.logical_or(rank == 1, rank == 2), shape[-1] == num), [wanted, shape]),
                  tf.debugging.Assert(tf.logical_or(rank == 1, shape[0] == tf.cast(batch, tf.int32)), [
                      "input `present`: its rows differ from the batch size of input "
                      f"`{self._modalities[0].name}`; got shape", shape])]
        with tf.control_dependencies(checks):
            return tf.broadcast_to(tf.reshape(present, [-1, num]), tf.stack([batch, num]))

    def _check_inputs(self, values: list[tf.Tensor], present: tf.Tensor) -> list[tf.Operation]:
        """Assertions that fail the call (InvalidArgumentError naming the input) on an empty
        batch, batches of different sizes, or token ids outside a present sequence's vocabulary."""
        batch = tf.shape(values[0], out_type=tf.int64)[0]
        first = self._modalities[0].name
        checks = [tf.debugging.assert_positive(
            batch, message=f"input `{first}`: the batch is empty (0 rows); feed at least one example")]
        for spec, x in zip(self._modalities[1:], values[1:]):
            checks.append(tf.debugging.assert_equal(tf.shape(x, out_type=tf.int64)[0], batch, message=(
                f"input `{spec.name}`: its batch size differs from that of input `{first}`")))
        for i, (spec, x) in enumerate(zip(self._modalities, values)):
            if spec.kind != "sequence":
                continue
            inside = tf.reduce_all(tf.reshape((x >= 0) & (x < spec.vocab_size), [tf.shape(x)[0], -1]), axis=1)
            checks.append(tf.debugging.Assert(tf.reduce_all(tf.logical_not(present[:, i]) | inside), [
                f"input `{spec.name}`: token ids must lie in [0, {spec.vocab_size}) (its vocabulary); "
                "got min and max", tf.reduce_min(x), tf.reduce_max(x)]))
        return checks

    def _to_model_units(self, name: str, x: tf.Tensor) -> tf.Tensor:
        if self._units[name] is None:
            return x
        offset, scale = self._units[name]
        return (x - offset) / scale

    def _to_source_units(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Decoded outputs {modality: [B, *shape]} back in the units of the source data."""
        out = dict(outputs)
        for name, units in self._units.items():
            if units is not None:
                out[name] = out[name] * units[1] + units[0]
        return out

    def _encode(self, *args: tf.Tensor) -> dict[str, tf.Tensor]:
        """{"z_mean": [B, D], "z_sample": [B, D]}."""
        posterior = self._posterior(args)
        return {"z_mean": posterior.mean(),
                "z_sample": posterior.sample(seed=tf.constant(POSTERIOR_SEED, tf.int32))}

    def _cross_generate(self, *args: tf.Tensor) -> dict[str, tf.Tensor]:
        """{modality: [B, *shape]}, decoded from the same draw as `encode`'s z_sample."""
        z = self._posterior(args).sample(seed=tf.constant(POSTERIOR_SEED, tf.int32))  # [B, D]
        return self._to_source_units(self.model.generate(z))

    def _sample(self, num: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """`num` draws from the prior p(z), decoded: {modality: [num, *shape]}."""
        with tf.control_dependencies([tf.debugging.assert_positive(
                num, message="input `num`: the number of samples must be >= 1")]):
            num = tf.identity(num)
        z = self.model.prior().sample(num, seed=tf.stack([seed, tf.constant(0, tf.int32)]))  # [num, D]
        return self._to_source_units(self.model.generate(z))


def _rows(mask: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """A per-row mask [B] shaped to broadcast against x [B, ...]."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


def source_units(spec: schema.ModalitySpec) -> tuple[tf.Tensor, tf.Tensor] | None:
    """(offset, scale), each float32 of the modality's shape, when the dataset job transformed it
    (model value = (source value - offset) / scale); None for modalities stored as they came."""
    units = spec.standardization
    if not units or spec.kind == "sequence":
        return None
    return tuple(tf.constant(np.broadcast_to(np.asarray(units[key], np.float32), spec.shape))
                 for key in ("offset", "scale"))


METADATA_FILE = "metadata.json"


def vocabulary_file(name: str) -> str:
    """The asset file of sequence modality `name`'s vocabulary."""
    return f"vocabulary_{name}.txt"


def serving_metadata(model: MultimodalVAE, manifest: schema.Manifest) -> dict:
    """What `metadata.json` says: modalities in `present`'s column order, shapes, dtypes, units,
    vocabulary files, the latent size and the signatures."""
    names = manifest.modality_names
    return {
        "model": model.name,
        "latent_dim": int(model.latent_dim),
        "present": {"dtype": "bool", "shape": ["batch", len(names)], "columns": names,
                    "also_accepts": [len(names)],
                    "meaning": "True where the row gives the modality; feed zeros for an absent one"},
        "modalities": [_modality_metadata(m) for m in manifest.modalities],
        "signatures": {
            "encode": {"inputs": [*names, PRESENT], "outputs": ["z_mean", "z_sample"]},
            "cross_generate": {"inputs": [*names, PRESENT], "outputs": names},
            "serving_default": {"inputs": [*names, PRESENT], "outputs": names},
            "sample": {"inputs": ["num", "seed"], "outputs": names},
        },
    }


def _modality_metadata(spec: schema.ModalitySpec) -> dict:
    entry = {"name": spec.name, "kind": spec.kind, "shape": ["batch", *spec.shape],
             "dtype": serving_dtype(spec).name, "likelihood": spec.likelihood}
    if spec.kind == "sequence":
        entry.update(units=f"token ids in [0, {spec.vocab_size})", vocab_size=spec.vocab_size,
                     vocabulary=vocabulary_file(spec.name))
    elif source_units(spec) is not None:
        entry.update(units="source units: the signatures apply (x - offset) / scale on the way in "
                           "and x * scale + offset to the decoded outputs",
                     standardization=spec.standardization)
    elif spec.dtype == "uint8":
        entry["units"] = "[0, 1] floats (the stored uint8 values / 255)"
    else:
        entry["units"] = "as stored in the dataset"
    return entry


def write_assets(module: ServingModule, manifest: schema.Manifest, directory: str) -> None:
    """Writes metadata.json and each sequence's vocabulary file to `directory` and tracks them
    on `module` as SavedModel assets (`module.metadata`, `module.vocabularies[name]`).

    Raises:
      UserError: a token holds a line break, which the one-token-per-line file cannot hold.
    """
    path = os.path.join(directory, METADATA_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(serving_metadata(module.model, manifest), f, indent=1)
    module.metadata = tf.saved_model.Asset(path)
    vocabularies = {}
    for spec in manifest.modalities:
        if spec.kind != "sequence":
            continue
        for token_id, token in enumerate(spec.vocab):
            if "\n" in token or "\r" in token:
                raise UserError(f"modality {spec.name!r}: token {token_id} ({token!r}) holds a line "
                                f"break; the vocabulary asset holds one token per line")
        path = os.path.join(directory, vocabulary_file(spec.name))
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(f"{token}\n" for token in spec.vocab))
        vocabularies[spec.name] = tf.saved_model.Asset(path)
    module.vocabularies = vocabularies


def export_saved_model(workdir: str, output_dir: str, data_dir: str | None = None) -> str:
    """Writes the latest checkpoint of run `workdir` as a SavedModel at `output_dir`.

    The SavedModel is written to a temporary sibling directory and renamed into place, so
    `output_dir` either holds a complete export or does not exist (on file systems with atomic
    directory renames: local and POSIX ones). An existing empty `output_dir` is replaced.

    Args:
      workdir: a run directory made by `bmvae train` (config.yaml and checkpoints/).
      output_dir: where to write; must not exist or be an empty directory.
      data_dir: the dataset directory, if it moved since training (default: the config's).

    Returns:
      output_dir, without a trailing separator.

    Raises:
      UserError: output_dir is a file or a non-empty directory; the run or dataset is unusable.
    """
    output_dir = output_dir.rstrip("/") or output_dir
    _check_free(output_dir)  # before the slow load, so a wrong --output fails at once
    _, manifest, model = run_dir.load_trained_model(workdir, data_dir)
    module = ServingModule(model, manifest)

    parent = os.path.dirname(output_dir)
    if parent:
        tf.io.gfile.makedirs(parent)
    with atomic.publishing(output_dir, directory=True) as tmp, tempfile.TemporaryDirectory() as assets:
        write_assets(module, manifest, assets)
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        _check_free(output_dir)  # something may have been written there while we saved
    return output_dir


def _check_free(output_dir: str) -> None:
    if not tf.io.gfile.exists(output_dir):
        return
    if not tf.io.gfile.isdir(output_dir):
        raise UserError(f"{output_dir}: exists and is not a directory; choose another --output")
    if tf.io.gfile.listdir(output_dir):
        raise UserError(f"{output_dir}: exists and is not empty; choose another --output or remove it")

