"""Evaluation results that depend on the dataset alone, shared by every run evaluated on it.

The coherence classifiers (and their accuracy on real test data) and the raw-input robustness
baseline never see the model: they are functions of the data, the run's seed and a few `eval`
settings. The literature trains its
coherence classifiers once per dataset (MMVAE's and mmJSD's code load pretrained ones); training
them in every evaluation made them the largest stage of a small run's evaluation, and a
comparison of 11 models x 3 seeds trained the same classifiers 11 times per seed. This cache
keeps them per dataset *content* and per setting, so that the second and later evaluations on a
dataset load what the first computed: the same classifiers and curves, so the same metrics, bit
for bit (tests/trainers/test_dataset_cache.py).

Layout: ROOT/<dataset digest>/<kind>/<entry>, where ROOT is $BMVAE_CACHE_DIR or
~/.cache/bmvae, the digest is a sha256 of the manifest and the size of every shard it names (a
rebuilt dataset with other content gets another digest), and each entry's name is a digest of
its fingerprint (the settings that decide it), stored beside it and compared on every read.
Entries are published whole (`bmvae_tf.atomic`): two evaluations racing on one entry both
compute it, and the reader never sees half of one. `eval.shared_cache: false` turns the cache
off; deleting ROOT is always safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any, Mapping

import tensorflow as tf

from bmvae_tf import atomic, schema

logger = logging.getLogger(__name__)

ENV_VAR = "BMVAE_CACHE_DIR"


def root() -> str:
    """Where the cache lives: $BMVAE_CACHE_DIR, else $XDG_CACHE_HOME/bmvae, else ~/.cache/bmvae."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bmvae")


def dataset_digest(manifest: schema.Manifest) -> str:
    """A digest of what a dataset holds: its manifest (modalities, splits, counts, build options)
    and the byte size of every shard it names, so that shards replaced under an unchanged
    manifest do not match."""
    shards = tuple(path for split in sorted(manifest.splits) for path in manifest.split_paths(split))
    return _dataset_digest(json.dumps(manifest.to_json(), sort_keys=True), shards)


@functools.lru_cache(maxsize=8)  # the shards are stat'ed once per dataset and process
def _dataset_digest(manifest_json: str, shards: tuple[str, ...]) -> str:
    digest = hashlib.sha256(manifest_json.encode())
    for path in shards:
        size = tf.io.gfile.stat(path).length if tf.io.gfile.exists(path) else -1
        digest.update(f"\n{os.path.basename(path)} {size}".encode())
    return digest.hexdigest()[:32]


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """A short, stable name for an entry's fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def entry_directory(manifest: schema.Manifest, kind: str) -> str:
    """ROOT/<dataset digest>/<kind>: where entries of `kind` for this dataset live."""
    return os.path.join(root(), dataset_digest(manifest), kind)


def lookup(manifest: schema.Manifest, kind: str, fingerprint: Mapping[str, Any]) -> Any:
    """The value cached for `fingerprint` (JSON), or None: absent, stale or unreadable (a bad
    entry only costs a recomputation). An entry's files (`store`'s `files`) are complete
    whenever its value is found."""
    path = entry_path(manifest, kind, fingerprint, ".json")
    try:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            entry = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, tf.errors.OpError) as e:
        logger.warning("ignoring the unreadable cache entry %s (%s)", path, e)
        return None
    if not isinstance(entry, dict) or entry.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    logger.info("reusing %s from the dataset cache: %s", kind, path)
    return entry.get("value")


def store(manifest: schema.Manifest, kind: str, fingerprint: Mapping[str, Any], value: Any,
          files: Mapping[str, str] | None = None) -> None:
    """Publishes `value` (JSON) for `fingerprint`, with copies of `files` {suffix: path} beside it
    (`entry_path(..., suffix)`); the files go first, so a found value means complete files. A
    cache that cannot be written is logged, not fatal: the evaluation has its result either way."""
    path = entry_path(manifest, kind, fingerprint, ".json")
    try:
        tf.io.gfile.makedirs(os.path.dirname(path))
        for suffix, source in (files or {}).items():
            target = entry_path(manifest, kind, fingerprint, suffix)
            with atomic.publishing(target, keep_suffix=suffix) as tmp:
                tf.io.gfile.copy(source, tmp, overwrite=True)
        atomic.write_text(path, json.dumps({"fingerprint": fingerprint, "value": value}, indent=1) + "\n")
    except Exception as e:  # noqa: BLE001 -- a read-only or full cache must not fail an evaluation
        logger.warning("could not write the cache entry %s: %s", path, e)


def entry_path(manifest: schema.Manifest, kind: str, fingerprint: Mapping[str, Any], suffix: str) -> str:
    """ROOT/<dataset digest>/<kind>/<fingerprint digest><suffix>."""
    return os.path.join(entry_directory(manifest, kind), fingerprint_digest(fingerprint) + suffix)
