"""The data contract: DIR/manifest.json and the tf.train.Example layout (SPEC section 2).

This module is the single source of truth shared by the Beam writers (`pipeline/`), the tf.data
reader (`trainers/input_pipeline.py`) and the SavedModel signatures (`trainers/export.py`), so the
three cannot drift apart. It holds no model code and touches the file system only in
`read_manifest` / `write_manifest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from bmvae_tf import atomic
from bmvae_tf.errors import UserError

FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"
COMPRESSION = "GZIP"

MODALITY_KINDS = ("image", "sequence", "vector")
LIKELIHOODS = ("laplace", "gaussian", "categorical")
DTYPES = ("float32", "int64", "uint8")


class SchemaError(UserError):
    """A manifest or record does not follow the data contract. The message names the culprit."""


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """One modality: its name is also its feature key in every tf.train.Example."""

    name: str
    kind: str  # image | sequence | vector
    shape: tuple[int, ...]
    dtype: str = "float32"
    likelihood: str = "laplace"
    likelihood_weight: float = 1.0
    vocab: tuple[str, ...] | None = None  # sequences only: token id -> symbol
    # Set when the values were standardised by the pipeline; kept so export can apply them again.
    standardization: dict | None = None

    @property
    def size(self) -> int:
        """Number of scalars in one example of this modality."""
        return int(np.prod(self.shape))

    @property
    def vocab_size(self) -> int:
        if self.vocab is None:
            raise SchemaError(f"modality {self.name!r} has no vocabulary")
        return len(self.vocab)

    def validate(self) -> None:
        where = f"modality {self.name!r}"
        if not self.name or "+" in self.name or "|" in self.name:
            raise SchemaError(f"{where}: names must be non-empty and free of '+' and '|'")
        if self.kind not in MODALITY_KINDS:
            raise SchemaError(f"{where}: kind {self.kind!r} is not one of {MODALITY_KINDS}")
        if self.dtype not in DTYPES:
            raise SchemaError(f"{where}: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.likelihood not in LIKELIHOODS:
            raise SchemaError(f"{where}: likelihood {self.likelihood!r} is not one of {LIKELIHOODS}")
        if not self.shape or any(int(s) <= 0 for s in self.shape):
            raise SchemaError(f"{where}: shape {list(self.shape)} must be non-empty and positive")
        expected_rank = {"image": 3, "sequence": 1, "vector": 1}[self.kind]
        if len(self.shape) != expected_rank:
            raise SchemaError(f"{where}: a {self.kind} has rank {expected_rank}, got shape {list(self.shape)}")
        if self.kind == "sequence":
            if self.dtype != "int64" or self.likelihood != "categorical" or not self.vocab:
                raise SchemaError(f"{where}: sequences need dtype int64, a categorical likelihood and a vocab")
        elif self.likelihood == "categorical":
            raise SchemaError(f"{where}: only sequences take a categorical likelihood")
        if not self.likelihood_weight > 0:
            raise SchemaError(f"{where}: likelihood_weight must be positive")

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
            "likelihood": self.likelihood, "likelihood_weight": float(self.likelihood_weight),
        }
        if self.vocab is not None:
            out["vocab"] = list(self.vocab)
        if self.standardization is not None:
            out["standardization"] = self.standardization
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str) -> "ModalitySpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise SchemaError(f"{where}: unknown key(s) {unknown}")
        for key in ("name", "kind", "shape"):
            if key not in obj:
                raise SchemaError(f"{where}: missing key {key!r}")
        try:
            spec = cls(
                name=str(obj["name"]), kind=str(obj["kind"]),
                shape=tuple(int(s) for s in obj["shape"]),
                dtype=str(obj.get("dtype", "float32")),
                likelihood=str(obj.get("likelihood", "laplace")),
                likelihood_weight=float(obj.get("likelihood_weight", 1.0)),
                vocab=tuple(obj["vocab"]) if obj.get("vocab") is not None else None,
                standardization=obj.get("standardization"),
            )
        except (TypeError, ValueError) as e:
            raise SchemaError(f"{where}: {e}") from None
        spec.validate()
        return spec


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    key: str = "label"
    num_classes: int = 10
    names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    files: tuple[str, ...]  # relative to the manifest's directory (or absolute URLs)
    count: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The parsed DIR/manifest.json. `directory` is where it was read from (not serialised)."""

    name: str
    modalities: tuple[ModalitySpec, ...]
    splits: Mapping[str, SplitInfo]
    label: LabelSpec | None = None
    metadata_keys: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # {metadata key: modality}: the metadata that are ground-truth private factors of a modality
    # (Digits' street colours belong to `street`); `bmvae analyze` checks the latents against them.
    factors: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pipeline_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    directory: str = ""

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise SchemaError(f"dataset {self.name!r} has no modality {name!r} (has {self.modality_names})")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise SchemaError(f"dataset {self.name!r} has no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def split_paths(self, name: str) -> list[str]:
        """Absolute paths of a split's shards."""
        return [f if "://" in f or os.path.isabs(f) else os.path.join(self.directory, f)
                for f in self.split(name).files]

    def validate(self) -> None:
        if len(self.modalities) < 1:
            raise SchemaError("a dataset needs at least one modality")
        names = self.modality_names
        if len(set(names)) != len(names):
            raise SchemaError(f"modality names repeat: {names}")
        for m in self.modalities:
            m.validate()
        reserved = set(names)
        if self.label is not None:
            if self.label.key in reserved:
                raise SchemaError(f"label key {self.label.key!r} clashes with a modality name")
            reserved.add(self.label.key)
        for key in self.metadata_keys:
            if key in reserved:
                raise SchemaError(f"metadata key {key!r} clashes with a modality or the label")
        for key, modality in self.factors.items():
            if key not in self.metadata_keys:
                raise SchemaError(f"factor {key!r} is not a metadata key (they are {list(self.metadata_keys)})")
            if modality not in names:
                raise SchemaError(f"factor {key!r}: no modality {modality!r} (they are {names})")
        if not self.splits:
            raise SchemaError("a dataset needs at least one split")

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "format_version": FORMAT_VERSION,
                               "modalities": [m.to_json() for m in self.modalities]}
        if self.label is not None:
            out["label"] = {"key": self.label.key, "num_classes": self.label.num_classes,
                            "names": list(self.label.names) if self.label.names else None}
        out["metadata_keys"] = list(self.metadata_keys)
        out["metadata_shapes"] = {k: list(v) for k, v in self.metadata_keys.items()}
        out["factors"] = dict(self.factors)
        out["splits"] = {k: {"files": list(v.files), "count": v.count} for k, v in self.splits.items()}
        out["source"] = dict(self.source)
        out["pipeline_options"] = dict(self.pipeline_options)
        out.update(self.extras)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: str = "") -> "Manifest":
        if not isinstance(obj, Mapping):
            raise SchemaError("the manifest must be a JSON object")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise SchemaError(f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        for key in ("name", "modalities", "splits"):
            if key not in obj:
                raise SchemaError(f"missing key {key!r}")
        if not isinstance(obj["modalities"], list):
            raise SchemaError("'modalities' must be a list")
        for i, m in enumerate(obj["modalities"]):
            if not isinstance(m, Mapping):
                raise SchemaError(f"modalities[{i}] must be an object")
        modalities = tuple(ModalitySpec.from_json(m, f"modalities[{i}]")
                           for i, m in enumerate(obj["modalities"]))
        label = None
        if obj.get("label") is not None:
            lab = obj["label"]
            try:
                label = LabelSpec(key=str(lab.get("key", "label")), num_classes=int(lab["num_classes"]),
                                  names=tuple(lab["names"]) if lab.get("names") else None)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise SchemaError(f"label: malformed ({e})") from None
        shapes = obj.get("metadata_shapes") or {}
        metadata = {str(k): tuple(int(s) for s in shapes.get(k, [1])) for k in obj.get("metadata_keys") or []}
        factors = obj.get("factors") or {}  # absent from manifests written before it existed
        if not isinstance(factors, Mapping) or not all(isinstance(v, str) for v in factors.values()):
            raise SchemaError("'factors' must be an object of metadata key -> modality name")
        splits = {}
        if not isinstance(obj["splits"], Mapping):
            raise SchemaError("'splits' must be an object")
        for name, info in obj["splits"].items():
            try:
                files = tuple(str(f) for f in info["files"])
                count = int(info["count"])
            except (KeyError, TypeError, ValueError) as e:
                raise SchemaError(f"splits.{name}: malformed ({e})") from None
            if not files:
                raise SchemaError(f"splits.{name}: no files")
            splits[str(name)] = SplitInfo(files=files, count=count)
        known = {"name", "format_version", "modalities", "label", "metadata_keys", "metadata_shapes",
                 "factors", "splits", "source", "pipeline_options"}
        manifest = cls(name=str(obj["name"]), modalities=modalities, splits=splits, label=label,
                       metadata_keys=metadata, factors={str(k): v for k, v in factors.items()},
                       source=obj.get("source") or {},
                       pipeline_options=obj.get("pipeline_options") or {},
                       extras={k: v for k, v in obj.items() if k not in known}, directory=directory)
        manifest.validate()
        return manifest


# --------------------------------------------------------------------------------------------
# Files


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_FILENAME)


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`<split>-NNNNN-of-MMMMM.tfrecord.gz`, as SPEC section 1 names shards."""
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def read_manifest(directory: str) -> Manifest:
    """Reads and validates DIR/manifest.json; SchemaError names the file and what is wrong."""
    import tensorflow as tf  # gfile reads gs:// and hdfs:// as well as local paths

    path = manifest_path(directory)
    if not tf.io.gfile.exists(path):
        raise SchemaError(f"{path}: no manifest (is {directory!r} a dataset built by `bmvae data build`?)")
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            obj = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{path}: corrupt manifest, not valid JSON ({e})") from None
    try:
        return Manifest.from_json(obj, directory=directory)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None


def write_manifest(directory: str, manifest: Manifest) -> str:
    manifest.validate()
    path = manifest_path(directory)
    atomic.write_text(path, json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# tf.train.Example layout


def feature_spec(manifest: Manifest) -> dict:
    """The tf.io.parse_example spec: one fixed-length feature per modality, label, metadata."""
    import tensorflow as tf

    spec = {}
    for m in manifest.modalities:
        if m.dtype == "uint8":
            spec[m.name] = tf.io.FixedLenFeature([], tf.string)
        else:
            spec[m.name] = tf.io.FixedLenFeature([m.size], tf.as_dtype(m.dtype))
    if manifest.label is not None:
        spec[manifest.label.key] = tf.io.FixedLenFeature([], tf.int64)
    for key, shape in manifest.metadata_keys.items():
        spec[key] = tf.io.FixedLenFeature([int(np.prod(shape))], tf.float32)
    return spec


def decode_parsed(manifest: Manifest, parsed: Mapping[str, Any]) -> dict:
    """Parsed batch -> tensors of the modality shapes ([batch, *shape]); uint8 images to [0, 1]."""
    import tensorflow as tf

    out = {}
    for m in manifest.modalities:
        value = parsed[m.name]
        if m.dtype == "uint8":
            value = tf.io.decode_raw(value, tf.uint8)
            value = tf.cast(value, tf.float32) / 255.0
        out[m.name] = tf.reshape(value, [-1, *m.shape])
    if manifest.label is not None:
        out["label"] = parsed[manifest.label.key]
    for key, shape in manifest.metadata_keys.items():
        out[key] = tf.reshape(parsed[key], [-1, *shape])
    return out


def encode_example(manifest: Manifest, record: Mapping[str, Any]) -> bytes:
    """One record (numpy values keyed by feature name) -> serialised tf.train.Example.

    Checks every value against the manifest so a bad record fails here, named, rather than as a
    shape error deep inside training. Serialisation is deterministic (sorted map keys), so the
    same record always gives the same bytes.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    features = {}
    for m in manifest.modalities:
        if m.name not in record:
            raise SchemaError(f"record has no value for modality {m.name!r}")
        value = np.asarray(record[m.name])
        if value.shape != tuple(m.shape):
            raise SchemaError(f"modality {m.name!r}: shape {value.shape} != manifest {tuple(m.shape)}")
        if m.dtype == "uint8":
            features[m.name] = feature_pb2.Feature(
                bytes_list=feature_pb2.BytesList(value=[value.astype(np.uint8).tobytes()]))
        elif m.dtype == "int64":
            features[m.name] = feature_pb2.Feature(
                int64_list=feature_pb2.Int64List(value=value.astype(np.int64).ravel().tolist()))
        else:
            if not np.all(np.isfinite(value)):
                raise SchemaError(f"modality {m.name!r}: non-finite value")
            features[m.name] = feature_pb2.Feature(
                float_list=feature_pb2.FloatList(value=value.astype(np.float32).ravel().tolist()))
    if manifest.label is not None:
        features[manifest.label.key] = feature_pb2.Feature(
            int64_list=feature_pb2.Int64List(value=[int(record[manifest.label.key])]))
    for key, shape in manifest.metadata_keys.items():
        value = np.asarray(record[key], np.float32).ravel()
        if value.size != int(np.prod(shape)):
            raise SchemaError(f"metadata {key!r}: {value.size} values, manifest says shape {list(shape)}")
        features[key] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=value.tolist()))
    example = example_pb2.Example(features=feature_pb2.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def subset_names(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset in manifest order: sizes ascending, then index order."""
    import itertools

    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def subset_key(subset: Sequence[str]) -> str:
    return "+".join(subset)
