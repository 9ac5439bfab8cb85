"""Users' own paired data from one .npz file (SPEC section 2): reading, checking, statistics.

Every array in the archive is a modality, except `label` (int [N]) and `split`
('train'/'validation'/'test' [N]; without 'validation' rows, a seeded validation_fraction of the
train rows becomes validation; without `split`, seeded test and validation fractions are drawn). The first axis is the example; per example 1-D (or a scalar) is a vector, 2-D or 3-D an
image ([H, W] gets a channel axis), and 1-D integers are a sequence only when named by
`--sequence`.

Missing rows: a boolean array `present_NAME` [N] says in which rows modality NAME is observed
(True) or missing (False); with `--nan-as-missing`, a row of a float modality that is entirely
NaN is missing too (a row that is only partly NaN is refused). A missing row's values are never
read into statistics, value ranges or vocabularies, and are stored as zeros; each record of such a
dataset carries its mask (`schema.PRESENT_KEY`) and the manifest counts the present rows per split
and modality (`schema.Manifest.present_counts`). Every row needs at least one modality present.

The archive is read member by member and chunk by chunk, never whole: `NpzMembers` reads each
member's .npy header, refuses object arrays without unpickling anything (the
`allow_pickle=False` rule), and `read_rows` returns rows [start, stop) of a member, seeking
straight to them when the member is stored (np.savez) and decompressing up to them when it is
deflated (np.savez_compressed).

Transforms the pipeline applies, recorded per modality in the manifest as `standardization`
({"method", "offset", "scale"}: model value = (array value - offset) / scale), so `bmvae export`
can apply them to its inputs and undo them on its outputs:
- vectors: "standardize", per-feature mean and standard deviation of the train split
  (a constant feature keeps scale 1);
- images in [0, 255] (integer images, or float images with values above 1): "rescale" by 255;
  float images already in [0, 1] are stored as they are.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import zipfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline.permutation import permute_index
from bmvae_tf.random_streams import ArraysStream

LABEL_KEY = "label"
SPLIT_KEY = "split"
PRESENT_PREFIX = "present_"  # present_NAME: bool [N], whether modality NAME is observed per row
SPLIT_NAMES = ("train", "test", "validation")  # split ids: positions here
ROWS_PER_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Member:
    """One array of the archive: header facts and where its data start."""

    key: str
    count: int  # N, the first axis
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype string, e.g. '<f4'
    fortran_order: bool
    stored: bool  # uncompressed in the zip: rows can be read by seeking
    data_offset: int  # stored members: byte offset of the array data in the .npz file

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.np_dtype.itemsize


def _open(path: str):
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: file not found")
    return tf.io.gfile.GFile(path, "rb")


def _zip(path: str, raw) -> zipfile.ZipFile:
    import tensorflow as tf

    try:
        return zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError, EOFError, tf.errors.OpError) as e:  # gfile seeks raise OpError
        raise UserError(f"{path}: not a .npz archive ({e})") from None


def _read_header(path: str, key: str, stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise UserError(f"{path}: key {key!r} is a .npy file of version {version}, which is not "
                            "supported")
    except ValueError as e:
        raise UserError(f"{path}: key {key!r} is not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise UserError(f"{path}: key {key!r} is an object array, which would need pickle to load; "
                        "pickled data are refused (allow_pickle=False): save plain numeric arrays")
    return tuple(int(s) for s in shape), bool(fortran), dtype


def inspect_npz(path: str) -> dict[str, Member]:
    """The archive's members in file order (key -> Member), from their headers only."""
    members = {}
    with _open(path) as raw:
        archive = _zip(path, raw)
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise UserError(f"{path}: member {info.filename!r} is not a .npy array")
            key = info.filename[:-len(".npy")]
            try:
                with archive.open(info) as stream:
                    shape, fortran, dtype = _read_header(path, key, stream)
                    header_bytes = stream.tell()
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise UserError(f"{path}: key {key!r} is corrupt ({e})") from None
            if not shape:
                raise UserError(f"{path}: key {key!r} is a scalar; every array needs a first axis of "
                                "examples")
            stored = info.compress_type == zipfile.ZIP_STORED
            offset = _local_data_offset(path, raw, info) + header_bytes if stored else -1
            members[key] = Member(key, shape[0], shape[1:], dtype.str, fortran, stored, offset)
    return members


def _local_data_offset(path: str, raw, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local file header (whose extra field may differ
    from the central directory's)."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip entry for {info.filename!r}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def read_rows(path: str, member: Member, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a member: [stop - start, *row_shape] of its dtype.

    Stored members are read with one seek; deflated ones are decompressed from the beginning of
    the member (one pass per call: read them in one call, or in few large ones); Fortran-ordered
    arrays are loaded whole (allow_pickle=False), as their rows are not contiguous.
    """
    if not 0 <= start <= stop <= member.count:
        raise ValueError(f"rows [{start}, {stop}) outside [0, {member.count}) of {member.key!r}")
    count = stop - start
    with _open(path) as raw:
        if member.fortran_order and len(member.row_shape) > 0:
            with _zip(path, raw).open(member.key + ".npy") as stream:
                return np.lib.format.read_array(stream, allow_pickle=False)[start:stop]
        if member.stored:
            raw.seek(member.data_offset + start * member.row_bytes)
            data = raw.read(count * member.row_bytes)
        else:
            with _zip(path, raw).open(member.key + ".npy") as stream:
                _read_header(path, member.key, stream)
                _skip(stream, start * member.row_bytes)
                data = stream.read(count * member.row_bytes)
    if len(data) != count * member.row_bytes:
        raise UserError(f"{path}: key {member.key!r} is truncated: rows {start}..{stop - 1} need "
                        f"{count * member.row_bytes} bytes, found {len(data)}")
    return np.frombuffer(data, member.np_dtype).reshape(count, *member.row_shape)


def _skip(stream, nbytes: int, block: int = 1 << 24) -> None:
    while nbytes > 0:
        data = stream.read(min(block, nbytes))
        if not data:
            return
        nbytes -= len(data)


def iter_chunks(path: str, member: Member, rows: int | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows [k, *row_shape]) over a whole member, streaming (one pass even when deflated);
    chunks of ROWS_PER_CHUNK rows unless `rows` says otherwise."""
    rows = rows or ROWS_PER_CHUNK
    if member.fortran_order and member.row_shape:
        whole = read_rows(path, member, 0, member.count)
        for start in range(0, member.count, rows):
            yield start, whole[start:start + rows]
        return
    if member.stored:
        for start in range(0, member.count, rows):
            yield start, read_rows(path, member, start, min(start + rows, member.count))
        return
    with _open(path) as raw:
        with _zip(path, raw).open(member.key + ".npy") as stream:
            _read_header(path, member.key, stream)
            for start in range(0, member.count, rows):
                k = min(rows, member.count - start)
                data = stream.read(k * member.row_bytes)
                if len(data) != k * member.row_bytes:
                    raise UserError(f"{path}: key {member.key!r} is truncated at row {start}")
                yield start, np.frombuffer(data, member.np_dtype).reshape(k, *member.row_shape)


# --------------------------------------------------------------------------------------------
# Planning: what each member becomes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the workers need: the modalities in archive order and how to split rows."""

    path: str
    members: Mapping[str, Member]
    modalities: tuple[schema.ModalitySpec, ...]
    count: int
    split_counts: Mapping[str, int]
    has_split: bool
    num_classes: int | None  # None without a `label` array
    seed: int
    test_fraction: float
    validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION
    # Whether the archive's `split` names validation rows itself (else they are carved from train).
    split_has_validation: bool = False
    nan_as_missing: bool = False  # rows of a float modality that are entirely NaN are missing
    masks: Mapping[str, str] = dataclasses.field(default_factory=dict)  # {modality: present_NAME key}
    # {split: schema.PresentCounts} when some row misses a modality, else {} (a complete dataset).
    present_counts: Mapping[str, schema.PresentCounts] = dataclasses.field(default_factory=dict)


def read_ranges(member: Member, rows: int | None = None) -> list[tuple[str, int, int]]:
    """The (key, start, stop) reads of one member for the workers: chunks of `rows`
    (ROWS_PER_CHUNK by default) when it can be read by seeking, else one read of the whole
    member (streamed by `iter_chunks`)."""
    rows = rows or ROWS_PER_CHUNK
    if member.stored and not (member.fortran_order and member.row_shape):
        return [(member.key, start, min(start + rows, member.count))
                for start in range(0, member.count, rows)]
    return [(member.key, 0, member.count)]


def modality_kind(member: Member, sequences: Sequence[str]) -> str:
    if member.key in sequences:
        return "sequence"
    return "vector" if len(member.row_shape) <= 1 else "image"


def modality_shape(member: Member) -> tuple[int, ...]:
    shape = member.row_shape
    if len(shape) == 0:
        return (1,)
    if len(shape) == 2:
        return (*shape, 1)
    return shape


def is_mask(key: str) -> bool:
    return key.startswith(PRESENT_PREFIX)


def check_members(path: str, members: Mapping[str, Member], sequences: Sequence[str]) -> list[str]:
    """Checks names, dtypes, ranks and lengths from the headers; returns the modality keys."""
    modality_keys = [k for k in members if k not in (LABEL_KEY, SPLIT_KEY) and not is_mask(k)]
    if len(modality_keys) < 2:
        raise UserError(f"{path}: needs at least 2 modality arrays besides 'label', 'split' and "
                        f"'present_*', found {modality_keys}")
    for name in sequences:
        if name not in modality_keys:
            raise UserError(f"--sequence {name}: {path} has no modality {name!r} (has {modality_keys})")
    first = members[modality_keys[0]]
    for key, member in members.items():
        if member.count != first.count:
            raise UserError(f"{path}: key {key!r} has {member.count} examples, but {first.key!r} has "
                            f"{first.count}; every array needs the same first axis")
        _check_member(path, member, sequences, modality_keys)
    if first.count < 3:
        raise UserError(f"{path}: {first.count} example(s); train, validation and test splits need at least 3")
    return modality_keys


def _check_member(path: str, member: Member, sequences: Sequence[str], modality_keys: Sequence[str]) -> None:
    """One array's dtype and rank for what its key makes it."""
    key, kind, shape = member.key, member.np_dtype.kind, [member.count, *member.row_shape]
    if key == LABEL_KEY:
        if kind not in "iu" or member.row_shape:
            raise UserError(f"{path}: key 'label' must be integers of shape [N], got {member.dtype} {shape}")
    elif key == SPLIT_KEY:
        if kind not in "US" or member.row_shape:
            raise UserError(f"{path}: key 'split' must be strings 'train'/'validation'/'test' of shape [N], got "
                            f"{member.dtype} {shape}")
    elif is_mask(key):
        name = key[len(PRESENT_PREFIX):]
        if name not in modality_keys:
            raise UserError(f"{path}: key {key!r} is the mask of modality {name!r}, which the archive "
                            f"does not have (modalities: {list(modality_keys)})")
        if kind != "b" or member.row_shape:
            raise UserError(f"{path}: key {key!r} must be booleans of shape [N] (True: {name!r} observed "
                            f"in that row), got {member.dtype} {shape}")
    elif key in sequences:
        if kind not in "iu" or len(member.row_shape) != 1:
            raise UserError(f"{path}: key {key!r} (--sequence) must be integer token ids of shape "
                            f"[N, L], got {member.dtype} {shape}")
    else:
        if kind not in "iufb":
            raise UserError(f"{path}: key {key!r} has dtype {member.dtype}; modalities must be "
                            "numbers (integers, floats or booleans)")
        if len(member.row_shape) > 3:
            raise UserError(f"{path}: key {key!r} has {len(member.row_shape)} axes per example; "
                            "vectors have 1, images 2 or 3")


def test_rows(count: int, test_fraction: float, seed: int, rows: np.ndarray) -> np.ndarray:
    """Whether each of `rows` is held out for test when the archive has no `split`: the rows
    whose keyed permutation falls below round(test_fraction * count). bool, rows' shape."""
    n_test = int(round(test_fraction * count))
    return permute_index(rows, count, (seed, ArraysStream.TEST_SPLIT)) < n_test


def drawn_split_ids(count: int, test_fraction: float, validation_fraction: float, seed: int,
                    rows: np.ndarray) -> np.ndarray:
    """Split ids (0 train, 1 test, 2 validation) of `rows` when the archive has no `split`.

    One keyed permutation orders the rows: the first round(test_fraction * count) are test (the
    same rows as before validation splits existed), the next round(validation_fraction * rest)
    validation, the others train.
    """
    n_test = int(round(test_fraction * count))
    n_validation = int(round(validation_fraction * (count - n_test)))
    position = permute_index(rows, count, (seed, ArraysStream.TEST_SPLIT))
    return np.where(position < n_test, 1, np.where(position < n_test + n_validation, 2, 0)).astype(np.int64)


def carve_validation(ids: np.ndarray, count: int, validation_fraction: float, seed: int,
                     rows: np.ndarray) -> np.ndarray:
    """`ids` (from a `split` key without validation rows) with the train rows whose keyed
    permutation (stream VALIDATION_SPLIT) falls below round(validation_fraction * count) made
    validation: about that fraction of the train rows."""
    held = permute_index(rows, count, (seed, ArraysStream.VALIDATION_SPLIT)) < int(round(validation_fraction * count))
    return np.where((ids == 0) & held, 2, ids).astype(np.int64)


def split_names(split_values: np.ndarray, path: str, start: int = 0) -> np.ndarray:
    """'train'/'test'/'validation' values -> split ids (0 train, 1 test, 2 validation);
    UserError naming a bad value's row."""
    values = np.char.strip(np.asarray(split_values).astype(str))
    ids = np.full(values.shape, -1, np.int64)
    for i, name in enumerate(SPLIT_NAMES):
        ids[values == name] = i
    if np.any(ids < 0):
        row = int(np.flatnonzero(ids < 0)[0])
        raise UserError(f"{path}: key 'split' holds {str(values[row])!r} at example {start + row}; "
                        "expected 'train', 'validation' or 'test'")
    return ids


class _Moments:
    """Per-feature count, mean and M2 merged chunk by chunk (Chan et al.), in float64."""

    def __init__(self, size: int):
        self.count, self.mean, self.m2 = 0, np.zeros(size), np.zeros(size)

    def add(self, rows: np.ndarray) -> None:
        n = len(rows)
        if n == 0:  # a chunk with no train rows (reshape(0, -1) cannot infer the width)
            return
        rows = rows.reshape(n, -1).astype(np.float64)
        mean = rows.mean(axis=0)
        m2 = ((rows - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * n / total
        self.count = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


# The largest sequence vocabulary `bmvae data build arrays` makes unless --max-vocab raises it: a
# stray large token id would otherwise make a vocabulary (and a manifest, and an output layer) of
# that size.
MAX_VOCAB = 65_536


def plan_arrays(path: str, *, sequences: Sequence[str] = (), standardize: bool = True,
                test_fraction: float = 0.2, seed: int = 0, max_vocab: int = MAX_VOCAB,
                validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                nan_as_missing: bool = False) -> Plan:
    """Reads the whole archive once, streaming, and decides what every array becomes.

    Checks (each a UserError naming the file and key): a readable .npz of plain arrays, at least
    2 modalities, equal lengths, numeric dtypes, finite values, images within [0, 1] or [0, 255],
    non-negative token ids within a vocabulary of at most `max_vocab` tokens, integer labels,
    split values, non-empty train, validation and test splits, `present_NAME` masks of booleans
    [N] for a modality NAME, at least one modality present in every row, and with
    `nan_as_missing` no row partly NaN. Computes the train-split statistics that standardise the
    vectors (the validation rows and the missing rows are not in them).
    """
    members = inspect_npz(path)
    keys = check_members(path, members, sequences)
    count = members[keys[0]].count
    has_split = SPLIT_KEY in members
    split_ids, split_has_validation = _split_ids(path, members, count, test_fraction, validation_fraction, seed)
    split_counts = {name: int(np.sum(split_ids == SPLIT_NAMES.index(name))) for name in schema.SPLITS}
    for name, n in split_counts.items():
        if n == 0:
            cause = ("key 'split'" if has_split and name != "validation" or split_has_validation
                     else "--validation-fraction" if name == "validation" else "--test-fraction")
            raise UserError(f"{path}: the {name} split is empty ({cause}); train, validation and test "
                            "all need examples")
    num_classes = None
    if LABEL_KEY in members:
        low, high = _value_range(path, members[LABEL_KEY])
        if low < 0:
            raise UserError(f"{path}: key 'label' holds {low}; labels must be class ids >= 0")
        num_classes = int(high) + 1
    weights = _balanced_weights({key: math.prod(modality_shape(members[key])) for key in keys})
    masks = {key: PRESENT_PREFIX + key for key in keys if PRESENT_PREFIX + key in members}
    present = read_masks(path, members, keys)  # [N, M]; the modalities' passes clear NaN rows
    modalities = tuple(
        _plan_modality(path, key, members[key], modality_kind(members[key], sequences), weights[key],
                       train_rows=split_ids == 0, present=present[:, j], standardize=standardize,
                       max_vocab=max_vocab, nan_as_missing=nan_as_missing)
        for j, key in enumerate(keys))
    return Plan(path=path, members=members, modalities=modalities, count=count,
                split_counts=split_counts, has_split=has_split, num_classes=num_classes, seed=seed,
                test_fraction=test_fraction, validation_fraction=validation_fraction,
                split_has_validation=split_has_validation, nan_as_missing=nan_as_missing, masks=masks,
                present_counts=present_counts(path, present, split_ids, keys))


def read_masks(path: str, members: Mapping[str, Member], keys: Sequence[str]) -> np.ndarray:
    """[N, M] bool: the `present_NAME` arrays of the modality keys, True where a key has none."""
    present = np.ones((members[keys[0]].count, len(keys)), bool)
    for j, key in enumerate(keys):
        mask = members.get(PRESENT_PREFIX + key)
        if mask is not None:
            for start, chunk in iter_chunks(path, mask):
                present[start:start + len(chunk), j] = chunk
    return present


def present_counts(path: str, present: np.ndarray, split_ids: np.ndarray, keys: Sequence[str]
                   ) -> dict[str, schema.PresentCounts]:
    """Per split, the rows that observe each modality and every one; {} when no row misses any.
    UserError naming the first row that observes none."""
    empty = np.flatnonzero(~present.any(axis=1))
    if len(empty):
        raise UserError(f"{path}: example {int(empty[0])} has no modality present (every present_NAME "
                        f"is False or its row is all NaN under --nan-as-missing; {len(empty)} such rows); "
                        "drop such rows")
    if present.all():
        return {}
    out = {}
    for name in schema.SPLITS:
        rows = present[split_ids == SPLIT_NAMES.index(name)]
        out[name] = schema.PresentCounts(
            modalities={key: int(n) for key, n in zip(keys, rows.sum(axis=0))},
            fully_observed=int(rows.all(axis=1).sum()))
    return out


def row_present(plan: Plan, decoded: Mapping[str, np.ndarray]) -> list[bool]:
    """One row's mask in modality order, as `plan_arrays` decided it: its `present_NAME` values
    and, with nan_as_missing, False for a modality whose row is all NaN. decoded: the row's arrays."""
    out = []
    for spec in plan.modalities:
        mask = plan.masks.get(spec.name)
        observed = True if mask is None else bool(decoded[mask])
        value = decoded[spec.name]
        if observed and plan.nan_as_missing and value.dtype.kind == "f" and np.isnan(value).all():
            observed = False
        out.append(observed)
    return out


def _split_ids(path: str, members: Mapping[str, Member], count: int, test_fraction: float,
               validation_fraction: float, seed: int) -> tuple[np.ndarray, bool]:
    """([count] int64 split ids, whether `split` named validation rows): the archive's `split`
    (its train rows carved when it names no validation row), else the seeded draw."""
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    rows = np.arange(count)
    if SPLIT_KEY in members:
        ids = np.concatenate([split_names(chunk, path, start)
                              for start, chunk in iter_chunks(path, members[SPLIT_KEY])])
        if np.any(ids == 2):
            return ids, True
        return carve_validation(ids, count, validation_fraction, seed, rows), False
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return drawn_split_ids(count, test_fraction, validation_fraction, seed, rows), False


def _plan_modality(path: str, key: str, member: Member, kind: str, weight: float, *,
                   train_rows: np.ndarray, present: np.ndarray, standardize: bool,
                   max_vocab: int = MAX_VOCAB, nan_as_missing: bool = False) -> schema.ModalitySpec:
    """One array's modality: sequences get the vocabulary of their ids; images and vectors are
    checked finite in one streaming pass, which also gathers the vectors' train moments and the
    images' value range. Only present rows count. train_rows: [N] bool, the train split's rows.
    present: [N] bool, the rows that observe this modality; with nan_as_missing the pass clears
    (in place) the rows that are all NaN."""
    shape = modality_shape(member)
    if kind == "sequence":
        low, high = _value_range(path, member, present)
        if low < 0:
            raise UserError(f"{path}: key {key!r} holds token id {low}; token ids must be >= 0")
        if int(high) + 1 > max_vocab:
            raise UserError(f"{path}: key {key!r} (--sequence) holds token id {int(high)}, which makes a "
                            f"vocabulary of {int(high) + 1} tokens, more than --max-vocab {max_vocab}; "
                            f"pass --max-vocab {int(high) + 1} if the ids are right")
        vocab = tuple(str(i) for i in range(int(high) + 1))
        return schema.ModalitySpec(key, "sequence", shape, "int64", "categorical", weight, vocab=vocab)
    moments = _Moments(math.prod(shape)) if kind == "vector" else None
    low, high = np.inf, -np.inf
    for start, chunk in iter_chunks(path, member):
        rows = present[start:start + len(chunk)]  # a view: clearing NaN rows updates `present`
        values = _present_values(path, key, start, chunk.astype(np.float64), rows, nan_as_missing)
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
        if moments is not None:
            moments.add(chunk.astype(np.float64)[rows & train_rows[start:start + len(chunk)]])
    standardization = None
    if kind == "image":
        standardization = _image_scaling(path, key, member, low, high)
    elif standardize:
        std = moments.std()
        standardization = {
            "method": "standardize", "offset": moments.mean.tolist(),
            "scale": np.where(std > 0, std, 1.0).tolist(), "split": "train", "count": moments.count,
            "constant_features": int(np.sum(std == 0))}
    return schema.ModalitySpec(key, kind, shape, "float32", "laplace", weight,
                               standardization=standardization)


def _present_values(path: str, key: str, start: int, values: np.ndarray, rows: np.ndarray,
                    nan_as_missing: bool) -> np.ndarray:
    """The present rows of a chunk, checked finite. With nan_as_missing, rows that are all NaN
    are cleared from `rows` (in place) and a row partly NaN is refused."""
    flat = values.reshape(len(values), -1)
    if nan_as_missing and flat.shape[1]:
        nan = np.isnan(flat)
        whole = nan.all(axis=1)
        partial = np.flatnonzero(nan.any(axis=1) & ~whole & rows)
        if len(partial):
            row = int(partial[0])
            raise UserError(f"{path}: key {key!r} is partly NaN at example {start + row} "
                            f"({int(nan[row].sum())} of {flat.shape[1]} values); --nan-as-missing "
                            "takes only rows that are entirely NaN as missing")
        rows &= ~whole
    bad = np.flatnonzero(rows & ~np.isfinite(flat).all(axis=1))
    if len(bad):
        row = int(bad[0])
        value = flat[row][~np.isfinite(flat[row])][0]
        hint = "" if nan_as_missing or not np.isnan(value) else (
            " (a missing row: mark it in present_" + key + ", or make it all NaN and pass --nan-as-missing)")
        raise UserError(f"{path}: key {key!r} holds {value} at example {start + row}; values must be "
                        f"finite{hint}")
    return flat[rows]


def _balanced_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    largest = max(sizes.values())
    return {name: largest / size for name, size in sizes.items()}


def _value_range(path: str, member: Member, rows: np.ndarray | None = None) -> tuple[float, float]:
    """(min, max) of a member's values, over the rows where `rows` (bool [N]) is True if given."""
    low, high = np.inf, -np.inf
    for start, chunk in iter_chunks(path, member):
        if rows is not None:
            chunk = chunk[rows[start:start + len(chunk)]]
        if chunk.size:
            low, high = min(low, chunk.min()), max(high, chunk.max())
    return low, high


def _image_scaling(path: str, key: str, member: Member, low: float, high: float) -> dict | None:
    """None for float (or boolean) images in [0, 1]; a rescale by 255 for integer images and for
    float images in [0, 255]; else an error."""
    if member.np_dtype.kind in "fb" and low >= 0 and high <= 1:
        return None
    if low >= 0 and high <= 255:
        return {"method": "rescale", "offset": 0.0, "scale": 255.0}
    raise UserError(f"{path}: key {key!r} is an image (2 or 3 axes per example) with values in "
                    f"[{low:g}, {high:g}]; images must lie in [0, 1] or [0, 255] (reshape other "
                    "data to [N, D] to make it a vector)")


def to_model_units(spec: schema.ModalitySpec, values: np.ndarray) -> np.ndarray:
    """A row as the model sees it: (value - offset) / scale, in float32 (sequences: int64)."""
    if spec.kind == "sequence":
        return np.asarray(values, np.int64).reshape(spec.shape)
    values = np.asarray(values, np.float64).reshape(spec.shape)
    if spec.standardization:
        offset = np.asarray(spec.standardization["offset"], np.float64)
        scale = np.asarray(spec.standardization["scale"], np.float64)
        values = (values - offset) / scale
    return values.astype(np.float32)


def row_split(plan: Plan, rows: np.ndarray, split_values: np.ndarray | None) -> np.ndarray:
    """Split ids (0 train, 1 test, 2 validation) of `rows`, as `plan_arrays` drew them."""
    if plan.has_split:
        ids = split_names(split_values, plan.path)
        if plan.split_has_validation:
            return ids
        return carve_validation(ids, plan.count, plan.validation_fraction, plan.seed, rows)
    return drawn_split_ids(plan.count, plan.test_fraction, plan.validation_fraction, plan.seed, rows)


def source_record(plan: Plan, sha256: str) -> dict[str, Any]:
    return {"kind": "npz", "file": plan.path, "basename": os.path.basename(plan.path), "sha256": sha256,
            "num_examples": plan.count, "split_from": "key 'split'" if plan.has_split else "seeded draw",
            "seed": plan.seed, "test_fraction": None if plan.has_split else plan.test_fraction,
            "validation_fraction": None if plan.split_has_validation else plan.validation_fraction,
            "nan_as_missing": plan.nan_as_missing,
            "arrays": {k: {"shape": [m.count, *m.row_shape], "dtype": m.dtype, "stored": m.stored}
                       for k, m in plan.members.items()}}
