"""MNIST and SVHN read in their published formats, streaming; shared by the MNIST-SVHN jobs.

Two sources give the same view of the four source splits (dataset "mnist" or "svhn", split
"train" or "test"):

- `RawSource(directory)`: MNIST's IDX files (`train-images-idx3-ubyte.gz`, ...) and SVHN's MATLAB
  files (`train_32x32.mat`, `test_32x32.mat`), read with a streaming reader of the MAT 5 format,
  so SVHN's 73,257 x 3,072 pixels never sit in memory at once. SVHN's label 10 means digit 0.
- `TfdsSource(data_dir)`: TFDS `mnist` and `svhn_cropped` (which already maps 10 to 0), read in
  TFDS' canonical record order.

Each source offers `labels(dataset, split)` ([N] int64, small: the driver builds the per-class
index lists from it), `iter_images(dataset, split, chunk)` (consecutive chunks of uint8 images
with their labels, one chunk in memory at a time: the Beam workers call it) and
`validate()` (a full streaming pass in the driver that checks every file's structure and
lengths, so bad input fails with a message naming the file before anything is written).
All file access goes through tf.io.gfile, so directories may be gs:// or hdfs:// URLs.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import struct
import zlib
from typing import Any, BinaryIO, Iterator

import numpy as np

from bmvae_tf.errors import UserError

DATASETS = ("mnist", "svhn")
SPLITS = ("train", "test")
IMAGE_SHAPES = {"mnist": (28, 28, 1), "svhn": (32, 32, 3)}
NUM_CLASSES = 10
CHUNK = 1024  # images per chunk when streaming

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
TFDS_NAMES = {"mnist": "mnist", "svhn": "svhn_cropped"}


def _check_dataset_split(dataset: str, split: str) -> None:
    if dataset not in DATASETS or split not in SPLITS:
        raise ValueError(f"unknown source split {dataset}/{split}")


def _gfile(path: str) -> BinaryIO:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: file not found")
    return tf.io.gfile.GFile(path, "rb")


def file_sha256(path: str, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks (recorded in the manifest's source)."""
    digest = hashlib.sha256()
    with _gfile(path) as f:
        while True:
            data = f.read(block)
            if not data:
                return digest.hexdigest()
            digest.update(data)


def _read_exact(stream, n: int, path: str, what: str) -> bytes:
    """Exactly n bytes, or a UserError naming the file: a short read means a truncated file."""
    parts, remaining = [], n
    try:
        while remaining:
            data = stream.read(remaining)
            if not data:
                break
            parts.append(data)
            remaining -= len(data)
    except (EOFError, OSError, zlib.error) as e:  # gzip raises EOFError on a cut-off stream
        raise UserError(f"{path}: truncated or corrupt while reading {what} ({e})") from None
    if remaining:
        raise UserError(f"{path}: truncated: {what} needs {n} bytes, the file has only {n - remaining}")
    return b"".join(parts)


def _at_end(stream, path: str) -> bool:
    try:
        return not stream.read(1)
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path}: truncated or corrupt ({e})") from None


# --------------------------------------------------------------------------------------------
# IDX (MNIST)


_IDX_TYPES = {0x08: np.uint8}


@dataclasses.dataclass
class _IdxFile:
    """An open IDX file positioned at its data; `dims` from its header."""

    path: str
    stream: Any
    raw: Any
    dims: tuple[int, ...]

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def _open_idx(path: str, ndim: int) -> _IdxFile:
    raw = _gfile(path)
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
    try:
        magic = _read_exact(stream, 4, path, "the IDX header")
        if magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES:
            raise UserError(f"{path}: not an IDX file of unsigned bytes (magic {magic.hex()})")
        if magic[3] != ndim:
            raise UserError(f"{path}: an IDX file of {magic[3]} dimensions, expected {ndim}")
        dims = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, path, "the IDX dimensions"))
    except BaseException:
        stream.close()
        raw.close()
        raise
    return _IdxFile(path, stream, raw, tuple(int(d) for d in dims))


def read_idx_labels(path: str) -> np.ndarray:
    """An IDX label file -> [N] int64, checked to be digits 0..9."""
    idx = _open_idx(path, 1)
    try:
        (n,) = idx.dims
        labels = np.frombuffer(_read_exact(idx.stream, n, path, f"{n} labels"), np.uint8)
        if not _at_end(idx.stream, path):
            raise UserError(f"{path}: has bytes after its {n} labels")
    finally:
        idx.close()
    if labels.size and labels.max() >= NUM_CLASSES:
        raise UserError(f"{path}: label {int(labels.max())} is not a digit 0..9")
    return labels.astype(np.int64)


def iter_idx_images(path: str, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """An IDX image file -> (start, uint8 [k, rows, cols, 1]) in order, k <= chunk."""
    idx = _open_idx(path, 3)
    try:
        n, rows, cols = idx.dims
        if (rows, cols) != IMAGE_SHAPES["mnist"][:2]:
            raise UserError(f"{path}: images of {rows}x{cols}, MNIST's are 28x28")
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            data = _read_exact(idx.stream, k * rows * cols, path, f"images {start}..{start + k - 1} of {n}")
            yield start, np.frombuffer(data, np.uint8).reshape(k, rows, cols, 1)
        if not _at_end(idx.stream, path):
            raise UserError(f"{path}: has bytes after its {n} images")
    finally:
        idx.close()


def idx_count(path: str) -> int:
    """The number of items an IDX file's header declares."""
    idx = _open_idx(path, 3)
    idx.close()
    return idx.dims[0]


# --------------------------------------------------------------------------------------------
# MAT 5 (SVHN)
#
# A MAT 5 file is a 128-byte header and then data elements, each an 8-byte tag (type, byte
# count) and its data, padded to 8 bytes. A variable is a miMATRIX element, or a miCOMPRESSED
# element holding a zlib stream of one; inside: array flags (class), dimensions, name, real
# part. Data are column-major, so SVHN's X [32, 32, 3, N] stores image n as one contiguous run
# of 3,072 bytes, which lets the reader stream image by image through the decompressor.

_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_NUMERIC = {6, 7, 8, 9, 10, 11, 12, 13, 14, 15}  # double, single, (u)int8..64


class _Inflater:
    """A read(n) stream over the zlib data of one miCOMPRESSED element of `compressed` bytes."""

    def __init__(self, raw, compressed: int):
        self._raw, self._left = raw, compressed
        self._inflate = zlib.decompressobj()
        self._buffer = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and (self._left or self._inflate.unconsumed_tail):
            if self._inflate.unconsumed_tail:
                data = self._inflate.unconsumed_tail
            else:
                data = self._raw.read(min(self._left, 1 << 20))
                if not data:
                    raise EOFError(f"compressed data ends {self._left} bytes early")
                self._left -= len(data)
            self._buffer += self._inflate.decompress(data, max(n - len(self._buffer), 1 << 16))
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


@dataclasses.dataclass
class MatVariable:
    """A variable's header: `dims` as MATLAB gives them (column-major), `dtype` of its stored data."""

    name: str
    mclass: int
    dims: tuple[int, ...]
    dtype: np.dtype | None  # None for non-numeric classes
    nbytes: int


class _MatReader:
    """Walks the variables of a MAT 5 file; `open_data(name)` streams one numeric variable."""

    def __init__(self, path: str):
        self.path = path
        self._raw = _gfile(path)
        try:
            header = _read_exact(self._raw, 128, path, "the MAT-file header")
        except BaseException:
            self._raw.close()
            raise
        text = header[:116].decode("latin-1")
        if header[126:128] == b"IM":
            self._order = "<"
        elif header[126:128] == b"MI":
            self._order = ">"
        else:
            self._raw.close()
            if text.startswith("MATLAB 7.3"):
                raise UserError(f"{path}: a MATLAB 7.3 (HDF5) file; SVHN's .mat files are MAT 5 "
                                "(save with -v7)")
            raise UserError(f"{path}: not a MATLAB 5 MAT-file (header {header[:20]!r})")
        self._offset = 128

    def close(self) -> None:
        self._raw.close()

    def _tag(self, stream, what: str) -> tuple[int, int, bytes | None]:
        """(type, byte count, inline data of a small element or None)."""
        tag = _read_exact(stream, 8, self.path, what)
        (word,) = struct.unpack(self._order + "I", tag[:4])
        if word >> 16:  # small data element: type and size in the first word, data in the second
            return word & 0xFFFF, word >> 16, tag[4:4 + (word >> 16)]
        (nbytes,) = struct.unpack(self._order + "I", tag[4:])
        return word, nbytes, None

    def _element(self, stream, what: str, expected_type: int | None = None) -> tuple[int, bytes]:
        mtype, nbytes, inline = self._tag(stream, what)
        if inline is not None:
            data = inline
        else:
            data = _read_exact(stream, nbytes, self.path, what)
            _read_exact(stream, -nbytes % 8, self.path, what)
        if expected_type is not None and mtype != expected_type:
            raise UserError(f"{self.path}: malformed {what} (type {mtype})")
        return mtype, data

    def _matrix_header(self, stream) -> tuple[MatVariable, bytes | None]:
        """Reads a miMATRIX element's header up to its real data.

        Returns the variable and, when its data fit in a small element, those bytes (else the
        stream is left at the first byte of the data).
        """
        mtype, nbytes, _ = self._tag(stream, "a variable's tag")
        if mtype != _MI_MATRIX:
            raise UserError(f"{self.path}: malformed variable (element type {mtype})")
        if nbytes == 0:
            return MatVariable("", 0, (), None, 0), None
        _, flags = self._element(stream, "array flags", 6)
        (flag_word,) = struct.unpack(self._order + "I", flags[:4])
        mclass = flag_word & 0xFF
        _, dims_data = self._element(stream, "dimensions", 5)
        dims = tuple(int(d) for d in struct.unpack(f"{self._order}{len(dims_data) // 4}i", dims_data))
        _, name = self._element(stream, "a variable name")
        name = name.decode("latin-1")
        if mclass not in _MX_NUMERIC or flag_word & 0x800:  # complex, cells, structs, ...
            return MatVariable(name, mclass, dims, None, 0), None
        dtype_code, data_bytes, inline = self._tag(stream, f"the data of {name!r}")
        if dtype_code not in _MI_DTYPES:
            raise UserError(f"{self.path}: variable {name!r} has data of unknown type {dtype_code}")
        dtype = np.dtype(self._order + _MI_DTYPES[dtype_code])
        return MatVariable(name, mclass, dims, dtype, data_bytes), inline

    def variables(self) -> Iterator[tuple[MatVariable, Any]]:
        """(variable, its data) for each variable in file order: the data as bytes when they fit
        in a small element, else as a stream positioned at them (valid until the next step)."""
        size = self._raw.size()
        offset = 128
        while offset < size:
            self._raw.seek(offset)
            mtype, nbytes, _ = self._tag(self._raw, "a data element's tag")
            if offset + 8 + nbytes > size:
                raise UserError(f"{self.path}: truncated: a data element at byte {offset} needs "
                                f"{nbytes} bytes, the file ends after {size - offset - 8}")
            if mtype == _MI_COMPRESSED:
                stream = _Inflater(self._raw, nbytes)
                next_offset = offset + 8 + nbytes
            elif mtype == _MI_MATRIX:
                self._raw.seek(offset)
                stream = self._raw
                next_offset = offset + 8 + nbytes + (-nbytes % 8)
            else:
                raise UserError(f"{self.path}: unexpected data element of type {mtype} at byte {offset}")
            variable, inline = self._matrix_header(stream)
            yield variable, (inline if inline is not None else stream)
            offset = next_offset


def mat_variables(path: str) -> dict[str, MatVariable]:
    """The variables of a MAT 5 file (name -> header), without reading their data."""
    reader = _MatReader(path)
    try:
        return {v.name: v for v, _ in reader.variables()}
    except (EOFError, zlib.error) as e:
        raise UserError(f"{path}: truncated or corrupt ({e})") from None
    finally:
        reader.close()


def _mat_data(path: str, name: str, shape_check) -> Iterator[tuple[MatVariable, Any]]:
    reader = _MatReader(path)
    try:
        found = []
        for variable, stream in reader.variables():
            found.append(variable.name)
            if variable.name == name:
                if variable.dtype is None:
                    raise UserError(f"{path}: variable {name!r} is not a real numeric array")
                expected = math.prod(variable.dims) * variable.dtype.itemsize
                if variable.nbytes != expected:
                    raise UserError(f"{path}: variable {name!r} of shape {list(variable.dims)} holds "
                                    f"{variable.nbytes} bytes, expected {expected}")
                shape_check(variable)
                yield variable, stream
                return
        raise UserError(f"{path}: no variable {name!r} (has {found})")
    except (EOFError, zlib.error) as e:
        raise UserError(f"{path}: truncated or corrupt ({e})") from None
    finally:
        reader.close()


def read_mat_labels(path: str) -> np.ndarray:
    """SVHN's `y` -> [N] int64 digits, with label 10 mapped to 0 (SVHN's code for digit 0)."""
    def check(variable: MatVariable) -> None:
        if len(variable.dims) != 2 or min(variable.dims) != 1:
            raise UserError(f"{path}: 'y' has shape {list(variable.dims)}, expected [N, 1]")

    for variable, stream in _mat_data(path, "y", check):
        n = math.prod(variable.dims)
        data = stream if isinstance(stream, bytes) else _read_exact(stream, variable.nbytes, path, "'y'")
        values = np.frombuffer(data, variable.dtype)[:n]
    if not np.all((values >= 0) & (values <= 10) & (values == np.round(values))):
        bad = values[~((values >= 0) & (values <= 10) & (values == np.round(values)))][0]
        raise UserError(f"{path}: label {bad} in 'y' is not a digit 1..10")
    return (values.astype(np.int64) % 10).astype(np.int64)


def mat_image_count(path: str) -> int:
    """N of SVHN's X [32, 32, 3, N], from its header."""
    variables = mat_variables(path)
    if "X" not in variables:
        raise UserError(f"{path}: no variable 'X' (has {sorted(variables)})")
    _check_svhn_dims(path, variables["X"])
    return variables["X"].dims[3]


def _check_svhn_dims(path: str, variable: MatVariable) -> None:
    if len(variable.dims) != 4 or tuple(variable.dims[:3]) != IMAGE_SHAPES["svhn"]:
        raise UserError(f"{path}: 'X' has shape {list(variable.dims)}, expected [32, 32, 3, N]")


def iter_mat_images(path: str, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """SVHN's X -> (start, uint8 [k, 32, 32, 3]) in order, k <= chunk."""
    for variable, stream in _mat_data(path, "X", lambda v: _check_svhn_dims(path, v)):
        h, w, c, n = variable.dims
        per_image = h * w * c * variable.dtype.itemsize
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            data = _read_exact(stream, k * per_image, path, f"images {start}..{start + k - 1} of 'X'")
            # Column-major [h, w, c, n]: image n is a C-order [c, w, h] block.
            values = np.frombuffer(data, variable.dtype).reshape(k, c, w, h).transpose(0, 3, 2, 1)
            if variable.dtype != np.uint8:
                if not np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
                    raise UserError(f"{path}: 'X' holds values outside the integers 0..255")
            yield start, np.ascontiguousarray(values, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class RawSource:
    """The published files in one directory (local, gs://, hdfs://).

    MNIST: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
    t10k-labels-idx1-ubyte.gz (gzipped as published, or unpacked without the .gz). SVHN (format 2,
    cropped digits): train_32x32.mat and test_32x32.mat.
    """

    directory: str

    def _path(self, name: str) -> str:
        import tensorflow as tf

        path = os.path.join(self.directory, name)
        if name.endswith(".gz") and not tf.io.gfile.exists(path) and tf.io.gfile.exists(path[:-3]):
            return path[:-3]
        return path

    def files(self, dataset: str, split: str) -> dict[str, str]:
        """{"images": path, "labels": path} of one source split."""
        _check_dataset_split(dataset, split)
        if dataset == "mnist":
            images, labels = MNIST_FILES[split]
            return {"images": self._path(images), "labels": self._path(labels)}
        path = self._path(SVHN_FILES[split])
        return {"images": path, "labels": path}

    def labels(self, dataset: str, split: str) -> np.ndarray:
        files = self.files(dataset, split)
        if dataset == "mnist":
            return read_idx_labels(files["labels"])
        return read_mat_labels(files["labels"])

    def iter_images(self, dataset: str, split: str, chunk: int = CHUNK
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start, uint8 images [k, H, W, C], int64 labels [k]) in index order."""
        files = self.files(dataset, split)
        labels = self.labels(dataset, split)
        reader = iter_idx_images if dataset == "mnist" else iter_mat_images
        count = 0
        for start, images in reader(files["images"], chunk):
            if start + len(images) > len(labels):
                raise UserError(f"{files['images']}: more images than the {len(labels)} labels "
                                f"of {files['labels']}")
            count = start + len(images)
            yield start, images, labels[start:count]
        if count != len(labels):
            raise UserError(f"{files['images']}: {count} images, but {files['labels']} has "
                            f"{len(labels)} labels")

    def validate(self) -> dict[str, Any]:
        """Reads every file once, streaming, checking it whole; returns the manifest's source record.

        Raises UserError naming the file on a missing, truncated or malformed file, or labels that
        disagree in count with the images.
        """
        record: dict[str, Any] = {"kind": "raw", "directory": self.directory, "files": {}}
        for dataset in DATASETS:
            for split in SPLITS:
                files = self.files(dataset, split)
                labels = self.labels(dataset, split)
                if dataset == "mnist":
                    declared = idx_count(files["images"])
                else:
                    declared = mat_image_count(files["images"])
                if declared != len(labels):
                    raise UserError(f"{files['images']}: {declared} images, but {files['labels']} has "
                                    f"{len(labels)} labels")
                for _ in self.iter_images(dataset, split, chunk=8192):
                    pass
                for path in sorted(set(files.values())):
                    record["files"][os.path.basename(path)] = {
                        "sha256": file_sha256(path), "dataset": dataset, "split": split}
                record.setdefault("counts", {})[f"{dataset}/{split}"] = int(len(labels))
        return record


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """TFDS `mnist` and `svhn_cropped` under `data_dir`, read in TFDS' canonical record order.

    `download` runs TFDS' download_and_prepare first (needs the internet); without it a dataset
    that is not prepared under data_dir is a UserError saying how to prepare it.
    """

    data_dir: str | None = None
    download: bool = False

    def _builder(self, dataset: str):
        import tensorflow_datasets as tfds

        name = TFDS_NAMES[dataset]
        try:
            builder = tfds.builder(name, data_dir=self.data_dir)
            if self.download:
                builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001  (TFDS raises many kinds; the user needs one line)
            raise UserError(f"TFDS {name!r} in {self.data_dir or 'the default data dir'}: {e}") from None
        return builder

    def _dataset(self, dataset: str, split: str, decode_images: bool):
        import tensorflow_datasets as tfds

        _check_dataset_split(dataset, split)
        builder = self._builder(dataset)
        decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
        try:
            # One file at a time, in order: a record's position is its index, on every worker.
            return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                      read_config=tfds.ReadConfig(interleave_cycle_length=1))
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"TFDS {TFDS_NAMES[dataset]!r} {split} in {self.data_dir or 'the default data dir'}: "
                f"{str(e).splitlines()[0]} (prepare it with `tfds build {TFDS_NAMES[dataset]} "
                f"--data_dir DIR` where the internet is available, or pass --download)") from None

    def labels(self, dataset: str, split: str) -> np.ndarray:
        ds = self._dataset(dataset, split, decode_images=False).map(lambda e: e["label"])
        values = [batch for batch in ds.batch(65536).as_numpy_iterator()]
        labels = np.concatenate(values).astype(np.int64) if values else np.zeros([0], np.int64)
        return labels % 10

    def iter_images(self, dataset: str, split: str, chunk: int = CHUNK
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        ds = self._dataset(dataset, split, decode_images=True)
        start = 0
        for batch in ds.batch(chunk).as_numpy_iterator():
            images = np.asarray(batch["image"], np.uint8)
            if images.shape[1:] != IMAGE_SHAPES[dataset]:
                raise UserError(f"TFDS {TFDS_NAMES[dataset]!r}: images of shape {images.shape[1:]}, "
                                f"expected {IMAGE_SHAPES[dataset]}")
            yield start, images, np.asarray(batch["label"], np.int64) % 10
            start += len(images)

    def validate(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "tfds", "data_dir": self.data_dir, "datasets": {}}
        for dataset in DATASETS:
            builder = self._builder(dataset)
            entry = {"name": TFDS_NAMES[dataset], "version": str(builder.version), "counts": {},
                     "labels_sha256": {}}
            for split in SPLITS:
                labels = self.labels(dataset, split)
                entry["counts"][split] = int(len(labels))
                entry["labels_sha256"][split] = hashlib.sha256(labels.tobytes()).hexdigest()
            record["datasets"][dataset] = entry
        return record


def make_source(kind: str, *, source_dir: str | None = None, tfds_data_dir: str | None = None,
                download: bool = False) -> RawSource | TfdsSource:
    """`--source raw --source-dir DIR` or `--source tfds [--tfds-data-dir DIR]`."""
    if kind == "raw":
        if not source_dir:
            raise UserError("--source raw needs --source-dir DIR (MNIST .gz and SVHN .mat files)")
        import tensorflow as tf

        if not tf.io.gfile.isdir(source_dir):
            raise UserError(f"{source_dir}: --source-dir is not a directory")
        return RawSource(source_dir)
    if kind == "tfds":
        return TfdsSource(tfds_data_dir, download)
    raise UserError(f"--source must be raw or tfds, got {kind!r}")
