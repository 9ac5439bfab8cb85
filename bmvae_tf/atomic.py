"""Publishing files whole: write under a temporary name beside the target, then rename.

Every file and directory the product publishes (manifests, shards, histories, plots, reports,
classifiers, sentence vectors, SavedModels) goes through `publishing`, so a reader never sees half
a file, and a failed or killed writer leaves at most a `*.tmp-<hex>` sibling, never a truncated
file under the final name; a full disk is reported as `errors.NoSpaceLeft` naming the target.
Paths may be local or remote (`gs://`, `hdfs://`): all I/O is through
`tf.io.gfile`. On object stores a rename is a copy, which is still whole when it appears.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

# Temporary siblings are named <target>.tmp-<32 hex digits>[suffix]; `TEMP_MARKER` finds them.
TEMP_MARKER = ".tmp-"


def temporary_sibling(path: str, keep_suffix: str = "") -> str:
    """A fresh temporary name beside `path`. With `keep_suffix` (e.g. ".keras", which Keras insists
    on), the suffix stays last: model.keras -> model.tmp-<hex>.keras."""
    token = f"{TEMP_MARKER}{uuid.uuid4().hex}"
    if keep_suffix and path.endswith(keep_suffix):
        return f"{path[:-len(keep_suffix)]}{token}{keep_suffix}"
    return f"{path}{token}"


@contextlib.contextmanager
def publishing(path: str, *, keep_suffix: str = "", directory: bool = False) -> Iterator[str]:
    """Yields a temporary path to write; on success renames it to `path`, on any error removes it.

    A file replaces an existing `path`. A directory (`directory=True`) may replace only an empty
    directory: publishing over a non-empty one raises FileExistsError and keeps both.
    """
    import tensorflow as tf

    tmp = temporary_sibling(path, keep_suffix)
    try:
        yield tmp
        if directory:
            if tf.io.gfile.exists(path):
                if tf.io.gfile.listdir(path):
                    raise FileExistsError(f"{path}: exists and is not empty")
                tf.io.gfile.rmtree(path)  # renaming onto a directory fails on some file systems
            tf.io.gfile.rename(tmp, path)
        else:
            tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException as e:
        _remove(tmp)
        if is_no_space(e):  # one clear line, naming what could not be written
            from bmvae_tf.errors import NoSpaceLeft

            raise NoSpaceLeft(path) from None
        denied = _write_refused(e)
        if denied:  # name the target, not the temporary name
            from bmvae_tf.errors import UserError

            raise UserError(f"{path}: cannot write it: {denied}") from None
        raise


def _write_refused(error: BaseException) -> str | None:
    """"read-only file system" or "permission denied" when `error` says so, else None."""
    import errno

    if isinstance(error, OSError):
        return {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}.get(error.errno)
    message = str(getattr(error, "message", "") or "")
    if "Read-only file system" in message:
        return "read-only file system"
    if "Permission denied" in message:
        return "permission denied"
    return None


def is_no_space(error: BaseException) -> bool:
    """Whether `error` says the disk is full (an OSError, or a TensorFlow error from gfile)."""
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(getattr(error, "message", "") or "")


def write_bytes(path: str, data: bytes) -> None:
    """Publishes `data` as the file `path`."""
    import tensorflow as tf

    with publishing(path) as tmp:
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    """Publishes `text` (UTF-8) as the file `path`."""
    write_bytes(path, text.encode("utf-8"))


def _remove(tmp: str) -> None:
    import tensorflow as tf

    try:
        if tf.io.gfile.isdir(tmp):
            tf.io.gfile.rmtree(tmp)
        elif tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
    except tf.errors.OpError:
        pass  # the original error matters more than a leftover temporary file
