"""One writer per run directory: RUN/train.lock, held for the life of a training.

Local run directories (and any that the OS can lock, e.g. NFS) use an OS file lock (`fcntl.flock`)
on RUN/train.lock, which names the holder (host, pid, start time) and is removed when the training
ends. The OS drops the lock when its holder dies, however it dies, so a lock file left by a killed
training is taken over and the takeover logged. A second `bmvae train` on a held run exits 2 naming the holder.

Remote run directories (`gs://`, `hdfs://`) have no locks. There RUN/train.lock is a marker file:
a training refuses to start while a marker names another live training, takes over a marker left
by a dead process on the same host (it can check that pid), and removes its marker when it ends.
A marker left by a training killed on another host cannot be checked from here: the error says
so, and deleting RUN/train.lock after making sure that training is gone releases the run. The
check and the write are not one atomic step on object stores, so two trainings started in the
same second may both start; start remote runs from one place.

Readers (`evaluate`, `analyze`, `export`) take no lock: a checkpoint appears whole (TensorFlow
writes its files, then the `checkpoint` state file names it), and `run_dir.load_trained_model`
retries when training deletes the checkpoint it was reading.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from typing import Iterator

from bmvae_tf.errors import RunInUse

log = logging.getLogger("bmvae.train")

LOCK_NAME = "train.lock"


def _remote(path: str) -> bool:
    return "://" in path


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}")


def _parse(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def run_lock(workdir: str) -> Iterator[None]:
    """Holds RUN/train.lock for the body; raises RunInUse naming the holder if another training
    has it."""
    if _remote(workdir):
        with _marker_lock(workdir):
            yield
    else:
        with _file_lock(workdir):
            yield


@contextlib.contextmanager
def _file_lock(workdir: str) -> Iterator[None]:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = _acquire(workdir, path)
    try:
        previous = _parse(_read_fd(fd))
        if previous:  # a holder that ends cleanly removes the file
            log.warning("took over the lock %s left by %s, which is no longer running", path,
                        _describe(previous))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:  # e.g. a full disk: name the file
            raise OSError(e.errno, e.strerror, path) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding the lock: no one else can have it
        os.close(fd)  # drops the flock


def _acquire(workdir: str, path: str) -> int:
    """An open descriptor of `path` holding its flock; RunInUse if another process holds it."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(_read_fd(fd)) or {}
            os.close(fd)
            raise RunInUse(f"{workdir}: another `bmvae train` is running on this run "
                           f"({_describe(holder)}; lock {path})") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: open it anew


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


@contextlib.contextmanager
def _marker_lock(workdir: str) -> Iterator[None]:
    import tensorflow as tf

    from bmvae_tf import atomic

    path = f"{workdir.rstrip('/')}/{LOCK_NAME}"
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            holder = _parse(f.read()) or {}
        same_host = holder.get("host") == socket.gethostname()
        if same_host and not _alive(holder.get("pid")):
            log.warning("took over the lock %s left by %s, which is no longer running", path,
                        _describe(holder))
        else:
            where = "" if same_host else "; it cannot be checked from this host: delete the " \
                                         "file if that training is no longer running"
            raise RunInUse(f"{workdir}: another `bmvae train` is running on this run "
                           f"({_describe(holder)}; lock {path}{where})")
    tf.io.gfile.makedirs(workdir)
    atomic.write_text(path, json.dumps(_holder()) + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.remove(path)
