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
# Written by datasets with missing rows (`Manifest.present_counts`): their records carry the
# `present` feature, which a reader of version 1 would not parse (it would train on the zeros
# that stand in for absent values), so such readers refuse the manifest instead. Complete
# datasets keep writing version 1, byte for byte as before.
MISSING_ROWS_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION, MISSING_ROWS_FORMAT_VERSION)
# The feature (int64 [M], 1 = observed, in manifest modality order) of records of a dataset with
# missing rows, and the batch key (bool [B, M]) the reader yields for every dataset.
PRESENT_KEY = "present"
MANIFEST_FILENAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"
COMPRESSION = "GZIP"

MODALITY_KINDS = ("image", "sequence", "vector")
LIKELIHOODS = ("laplace", "gaussian", "categorical")
DTYPES = ("float32", "int64", "uint8")

# The splits every `bmvae data build` job writes, in manifest order. Training reads `train` (and
# `validation` for its val_loss and early stopping), never `test`; `bmvae evaluate --split`
# scores `test` (default) or `validation`. The builders carve `validation` out of the train data
# (DEFAULT_VALIDATION_FRACTION of it unless told otherwise), never out of test.
TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
EVALUATION_SPLITS = (TEST, VALIDATION)
DEFAULT_VALIDATION_FRACTION = 0.1


class SchemaError(UserError):
    """A manifest or record does not follow the data contract. The message names the culprit."""


class DataError(SchemaError):
    """A shard does not hold what its manifest says: a count that differs, a record that does
    not parse, a truncated or corrupt file. The message names the shard (and record)."""


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
        for key in ("name", "kind", "dtype", "likelihood"):
            if key in obj and not isinstance(obj[key], str):
                raise SchemaError(f"{where}.{key} must be a string, got {obj[key]!r}")
        weight = obj.get("likelihood_weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise SchemaError(f"{where}.likelihood_weight must be a number, got {weight!r}")
        vocab = obj.get("vocab")
        if vocab is not None and (not isinstance(vocab, list)
                                  or not all(isinstance(t, str) for t in vocab)):
            raise SchemaError(f"{where}.vocab must be a list of strings")
        standardization = obj.get("standardization")
        if standardization is not None and not isinstance(standardization, Mapping):
            raise SchemaError(f"{where}.standardization must be an object, got {standardization!r}")
        spec = cls(
            name=obj["name"], kind=obj["kind"], shape=_int_list(obj["shape"], f"{where}.shape"),
            dtype=obj.get("dtype", "float32"), likelihood=obj.get("likelihood", "laplace"),
            likelihood_weight=float(weight), vocab=tuple(vocab) if vocab is not None else None,
            standardization=standardization)
        spec.validate()
        return spec


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    key: str = "label"
    num_classes: int = 10
    names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A split's shards and record counts.

    files: plain file names inside the manifest's directory (`check_shard_name`).
    count: records in the split.
    shard_counts: records per file, in `files` order; None in manifests written before the
        writers recorded them (the reader then checks the split's total only).
    """

    files: tuple[str, ...]
    count: int
    shard_counts: tuple[int, ...] | None = None

    def validate(self, split: str) -> None:
        where = f"splits.{split}"
        if not self.files:
            raise SchemaError(f"{where}: no files")
        for entry in self.files:
            check_shard_name(entry, where)
        if not _is_int(self.count) or self.count < 0:
            raise SchemaError(f"{where}: count must be a non-negative integer, got {self.count!r}")
        if self.shard_counts is None:
            return
        if len(self.shard_counts) != len(self.files) or not all(
                _is_int(n) and n >= 0 for n in self.shard_counts):
            raise SchemaError(f"{where}: shard_counts must be one non-negative integer per file "
                              f"({len(self.files)}), got {list(self.shard_counts)}")
        if sum(self.shard_counts) != self.count:
            raise SchemaError(f"{where}: shard_counts sum to {sum(self.shard_counts)}, count says "
                              f"{self.count}")


@dataclasses.dataclass(frozen=True)
class PresentCounts:
    """A split's rows by what they observe, for a dataset with missing rows.

    modalities: {modality: rows in which it is present}, every modality in manifest order.
    fully_observed: rows in which every modality is present.
    """

    modalities: Mapping[str, int]
    fully_observed: int

    def to_json(self) -> dict:
        return {"modalities": dict(self.modalities), "fully_observed": self.fully_observed}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "PresentCounts":
        if not isinstance(obj, Mapping) or set(obj) != {"modalities", "fully_observed"}:
            raise SchemaError(f"{where} must be an object with 'modalities' and 'fully_observed'")
        counts = obj["modalities"]
        if not isinstance(counts, Mapping) or not all(_is_int(n) for n in counts.values()):
            raise SchemaError(f"{where}.modalities must be an object of modality -> row count")
        if not _is_int(obj["fully_observed"]):
            raise SchemaError(f"{where}.fully_observed must be an integer, got {obj['fully_observed']!r}")
        return cls(modalities={str(k): int(v) for k, v in counts.items()},
                   fully_observed=int(obj["fully_observed"]))

    def validate(self, where: str, names: Sequence[str], count: int) -> None:
        if list(self.modalities) != list(names):
            raise SchemaError(f"{where}.modalities must count every modality in manifest order "
                              f"{list(names)}, got {list(self.modalities)}")
        for name, n in self.modalities.items():
            if not 0 <= n <= count:
                raise SchemaError(f"{where}.modalities.{name}: {n} rows, the split has {count}")
        if not 0 <= self.fully_observed <= min(self.modalities.values()):
            raise SchemaError(f"{where}.fully_observed: {self.fully_observed} rows, more than a "
                              f"modality's present rows {dict(self.modalities)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_shard_name(entry: Any, where: str = "splits") -> None:
    """SchemaError unless `entry` is a plain file name, read inside the dataset's directory.

    Refused: anything with a directory part or a scheme (`..`, `a/b`, `/etc/passwd`, `gs://...`,
    `C:\\x`), `.`/`..`, empty names and control characters. The directory itself may be remote;
    only the names are checked here (`trainers.input_pipeline.check_shards` also refuses local
    symlinks that lead out of the directory).
    """
    ok = (isinstance(entry, str) and entry not in ("", ".", "..") and not any(
        c in entry for c in "/\\:") and entry.isprintable())
    if not ok:
        raise SchemaError(f"{where}: shard entry {entry!r} is not a plain file name inside the "
                          f"dataset directory")


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
    # {split: PresentCounts} of a dataset with missing rows (`bmvae data build arrays` with
    # `present_NAME` arrays or --nan-as-missing); empty: every row has every modality (datasets
    # built before missing rows existed read so). Its records then carry the PRESENT_KEY feature.
    present_counts: Mapping[str, PresentCounts] = dataclasses.field(default_factory=dict)
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

    @property
    def has_missing_rows(self) -> bool:
        """Whether rows may lack modalities: the records carry the PRESENT_KEY feature."""
        return bool(self.present_counts)

    def fully_observed_count(self, split: str) -> int:
        """Rows of `split` in which every modality is present (all of them without missing rows)."""
        counts = self.present_counts.get(split)
        return self.split(split).count if counts is None else counts.fully_observed

    def split_paths(self, name: str) -> list[str]:
        """Paths of a split's shards: its plain file names inside the manifest's directory."""
        info = self.split(name)
        info.validate(name)  # refuses entries that would lead out of the directory
        return [os.path.join(self.directory, f) for f in info.files]

    def validate(self) -> None:
        if len(self.modalities) < 1:
            raise SchemaError("a dataset needs at least one modality")
        names = self.modality_names
        if len(set(names)) != len(names):
            raise SchemaError(f"modality names repeat: {names}")
        for m in self.modalities:
            m.validate()
        if PRESENT_KEY in names:
            raise SchemaError(f"modality name {PRESENT_KEY!r} is reserved for the mask of present modalities")
        reserved = set(names) | {PRESENT_KEY}
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
        for name, info in self.splits.items():
            info.validate(name)
        if self.present_counts:
            if sorted(self.present_counts) != sorted(self.splits):
                raise SchemaError(f"present_counts must count every split {sorted(self.splits)}, "
                                  f"got {sorted(self.present_counts)}")
            for split, counts in self.present_counts.items():
                counts.validate(f"present_counts.{split}", names, self.splits[split].count)

    def to_json(self) -> dict:
        version = MISSING_ROWS_FORMAT_VERSION if self.present_counts else FORMAT_VERSION
        out: dict[str, Any] = {"name": self.name, "format_version": version,
                               "modalities": [m.to_json() for m in self.modalities]}
        if self.label is not None:
            out["label"] = {"key": self.label.key, "num_classes": self.label.num_classes,
                            "names": list(self.label.names) if self.label.names else None}
        out["metadata_keys"] = list(self.metadata_keys)
        out["metadata_shapes"] = {k: list(v) for k, v in self.metadata_keys.items()}
        out["factors"] = dict(self.factors)
        out["splits"] = {k: _split_json(v) for k, v in self.splits.items()}
        if self.present_counts:
            out["present_counts"] = {k: v.to_json() for k, v in self.present_counts.items()}
        out["source"] = dict(self.source)
        out["pipeline_options"] = dict(self.pipeline_options)
        out.update(self.extras)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], directory: str = "") -> "Manifest":
        if not isinstance(obj, Mapping):
            raise SchemaError("the manifest must be a JSON object")
        version = obj.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
            raise SchemaError(f"format_version {version!r} is not supported (expected one of "
                              f"{list(SUPPORTED_FORMAT_VERSIONS)})")
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
        metadata = _metadata_keys(obj)
        factors = obj.get("factors") or {}  # absent from manifests written before it existed
        if not isinstance(factors, Mapping) or not all(isinstance(v, str) for v in factors.values()):
            raise SchemaError("'factors' must be an object of metadata key -> modality name")
        if not isinstance(obj["splits"], Mapping):
            raise SchemaError("'splits' must be an object")
        splits = {str(name): _split_from_json(info, f"splits.{name}")
                  for name, info in obj["splits"].items()}
        for key in ("source", "pipeline_options"):
            if not isinstance(obj.get(key) or {}, Mapping):
                raise SchemaError(f"{key!r} must be an object, got {type(obj[key]).__name__}")
        if not isinstance(obj["name"], str):
            raise SchemaError(f"'name' must be a string, got {obj['name']!r}")
        present_counts = _present_counts_from_json(obj, version)
        known = {"name", "format_version", "modalities", "label", "metadata_keys", "metadata_shapes",
                 "factors", "splits", "source", "pipeline_options", "present_counts"}
        manifest = cls(name=obj["name"], modalities=modalities, splits=splits,
                       label=_label_from_json(obj.get("label")),
                       metadata_keys=metadata, factors={str(k): v for k, v in factors.items()},
                       source=obj.get("source") or {},
                       pipeline_options=obj.get("pipeline_options") or {},
                       extras={k: v for k, v in obj.items() if k not in known},
                       present_counts=present_counts, directory=directory)
        manifest.validate()
        return manifest


def _present_counts_from_json(obj: Mapping[str, Any], version: Any) -> dict[str, PresentCounts]:
    """The manifest's `present_counts` ({} when absent: every row complete); a version-2
    manifest must have them, a version-1 manifest must not."""
    counts = obj.get("present_counts")
    if (counts is not None) != (version == MISSING_ROWS_FORMAT_VERSION):
        raise SchemaError(f"format_version {version} goes with "
                          f"{'present_counts' if version == MISSING_ROWS_FORMAT_VERSION else 'no present_counts'}"
                          f" (datasets with missing rows write version {MISSING_ROWS_FORMAT_VERSION})")
    if counts is None:
        return {}
    if not isinstance(counts, Mapping) or not counts:
        raise SchemaError("'present_counts' must be an object of split -> counts")
    return {str(split): PresentCounts.from_json(value, f"present_counts.{split}")
            for split, value in counts.items()}


def _split_json(info: SplitInfo) -> dict:
    out: dict[str, Any] = {"files": list(info.files), "count": info.count}
    if info.shard_counts is not None:
        out["shard_counts"] = list(info.shard_counts)
    return out


def _int_list(value: Any, where: str, minimum: int = 1) -> tuple[int, ...]:
    """A JSON list of integers >= minimum, else SchemaError naming `where`."""
    if not isinstance(value, list) or not all(_is_int(v) and v >= minimum for v in value):
        raise SchemaError(f"{where} must be a list of integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def _metadata_keys(obj: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{metadata key: shape} from `metadata_keys` (a list of names) and `metadata_shapes` (an
    object of name -> list of positive integers; a key without a shape has shape [1])."""
    keys = obj.get("metadata_keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise SchemaError(f"'metadata_keys' must be a list of non-empty strings, got {keys!r}")
    shapes = obj.get("metadata_shapes") or {}
    if not isinstance(shapes, Mapping):
        raise SchemaError(f"'metadata_shapes' must be an object of key -> shape, got {shapes!r}")
    for key in shapes:
        if key not in keys:
            raise SchemaError(f"metadata_shapes.{key}: not one of the metadata_keys {keys}")
    return {k: _int_list(shapes.get(k, [1]), f"metadata_shapes.{k}") for k in keys}


def _split_from_json(info: Any, where: str) -> SplitInfo:
    if not isinstance(info, Mapping):
        raise SchemaError(f"{where} must be an object with 'files' and 'count'")
    for key in ("files", "count"):
        if key not in info:
            raise SchemaError(f"{where}: missing key {key!r}")
    files = info["files"]
    if not isinstance(files, list):
        raise SchemaError(f"{where}.files must be a list of file names, got {files!r}")
    count = info["count"]
    if not _is_int(count) or count < 0:
        raise SchemaError(f"{where}.count must be a non-negative integer, got {count!r}")
    shard_counts = info.get("shard_counts")
    if shard_counts is not None:
        shard_counts = _int_list(shard_counts, f"{where}.shard_counts", minimum=0)
    split = SplitInfo(files=tuple(files), count=int(count), shard_counts=shard_counts)
    split.validate(where.removeprefix("splits."))
    return split


def _label_from_json(lab: Any) -> LabelSpec | None:
    if lab is None:
        return None
    if not isinstance(lab, Mapping):
        raise SchemaError(f"label: must be an object, got {lab!r}")
    key, num_classes, names = lab.get("key", "label"), lab.get("num_classes"), lab.get("names")
    if not isinstance(key, str) or not key:
        raise SchemaError(f"label.key must be a non-empty string, got {key!r}")
    if not _is_int(num_classes) or num_classes < 1:
        raise SchemaError(f"label.num_classes must be a positive integer, got {num_classes!r}")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise SchemaError(f"label.names must be a list of strings, got {names!r}")
    return LabelSpec(key=key, num_classes=int(num_classes), names=tuple(names) if names else None)


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
    if manifest.has_missing_rows:
        spec[PRESENT_KEY] = tf.io.FixedLenFeature([len(manifest.modalities)], tf.int64)
    return spec


def decode_parsed(manifest: Manifest, parsed: Mapping[str, Any]) -> dict:
    """Parsed batch -> tensors of the modality shapes ([batch, *shape]); uint8 images to [0, 1];
    PRESENT_KEY: bool [batch, M], from the records of a dataset with missing rows, else all True.
    An absent modality's values are zeros (finite), as the writers store them."""
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
    if PRESENT_KEY in parsed:
        out[PRESENT_KEY] = tf.not_equal(parsed[PRESENT_KEY], 0)
    else:
        first = out[manifest.modalities[0].name]
        out[PRESENT_KEY] = tf.ones([tf.shape(first)[0], len(manifest.modalities)], tf.bool)
    return out


def encode_example(manifest: Manifest, record: Mapping[str, Any]) -> bytes:
    """One record (numpy values keyed by feature name) -> serialised tf.train.Example.

    Checks every value against the manifest so a bad record fails here, named, rather than as a
    shape error deep inside training. Serialisation is deterministic (sorted map keys), so the
    same record always gives the same bytes.

    A dataset with missing rows (`Manifest.has_missing_rows`) takes record[PRESENT_KEY], M
    booleans in manifest order (default: all present), at least one True; an absent modality is
    written as zeros of its dtype, whatever the record holds for it (it may hold nothing).
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    features = {}
    present = _record_present(manifest, record)
    if manifest.has_missing_rows:
        features[PRESENT_KEY] = feature_pb2.Feature(
            int64_list=feature_pb2.Int64List(value=[int(p) for p in present]))
    for m, observed in zip(manifest.modalities, present):
        if not observed:
            record = {**record, m.name: np.zeros(m.shape, np.uint8 if m.dtype == "uint8" else m.dtype)}
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


def _record_present(manifest: Manifest, record: Mapping[str, Any]) -> list[bool]:
    """The record's mask of present modalities (all True without one); SchemaError if malformed."""
    names = manifest.modality_names
    if PRESENT_KEY not in record:
        return [True] * len(names)
    if not manifest.has_missing_rows:
        raise SchemaError(f"record has a {PRESENT_KEY!r} mask, but dataset {manifest.name!r} declares "
                          "no missing rows (present_counts)")
    present = np.asarray(record[PRESENT_KEY])
    if present.shape != (len(names),) or present.dtype.kind not in "biu" or not np.all((present == 0) | (present == 1)):
        raise SchemaError(f"record's {PRESENT_KEY!r} must be {len(names)} booleans (one per modality "
                          f"{names}), got {present.tolist()!r}")
    if not present.any():
        raise SchemaError(f"record has no modality present ({PRESENT_KEY!r} is all False)")
    return [bool(p) for p in present]


def subset_names(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset in manifest order: sizes ascending, then index order."""
    import itertools

    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def subset_key(subset: Sequence[str]) -> str:
    return "+".join(subset)
