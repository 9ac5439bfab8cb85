"""The Beam jobs behind `bmvae data build mnist-svhn` and `bmvae data build mnist-svhn-text`.

The driver reads only the labels (a few hundred kB) and checks the source files in one
streaming pass; it builds the per-class index lists (`pipeline.mnist_svhn.class_plans`) and
the list of shards. Each worker writes whole shards, so no record and no image is ever
shuffled between processes:

    Shards (split, shard) -> WriteShard -> (split, file name, count) -> WriteManifest

WriteShard (`WritePairShardFn`) draws the split's pairs from the class plans (each pair's
number is computed alone, `mnist_svhn.expand_plan`), takes the pairs whose number % shards ==
shard in number order, looks their two images up in the source split's images (read once per
worker process and kept: MNIST train 47 MB, SVHN train 225 MB, whatever dm is), encodes them
and writes the shard. A process's memory is therefore bounded by the source images plus one
split's pair numbers (20 bytes a pair), not by the records: the earlier design joined images
to pairs with two CoGroupByKeys and grouped the encoded records by shard, which the in-process
runner holds in memory whole (3.5 GB at a twentieth of the full size;
bench/full_size_build.py).

The validation split pairs a held-out fraction of each class's train images
(`mnist_svhn.validation_indices`); its pairs look their images up in the train images. The
test split is planned, drawn and written exactly as before validation splits existed.

Records are gzip TFRecords of uint8 images (the manifest's dtype says so; the reader gives
[0, 1] floats, exactly x / 255 as torchvision's ToTensor), the label, the source indices as
metadata, and for the text variant the text and its start (`text_pad`). Shard `i` of a split
holds the pairs numbered `i mod shards` in ascending order, as `beam_io.WriteShards` would
write them, so the files are byte-identical on every runner and worker count.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import threading
from typing import Any, Iterator

import apache_beam as beam
import numpy as np

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import beam_io, commands, mnist_svhn, sources

logger = logging.getLogger(__name__)

NAMES = ("mnist-svhn", "mnist-svhn-text")
NAMESPACE = "mnist_svhn"


def build_mnist_svhn(output_dir: str, *, with_text: bool = False, source: str = "raw",
                     source_dir: str | None = None, tfds_data_dir: str | None = None,
                     download: bool = False, seed: int = 0, dm: int | None = None,
                     max_d: int = mnist_svhn.DEFAULT_MAX_D,
                     validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                     num_shards: int | None = None, overwrite: bool = False,
                     beam_args: list[str] | None = None) -> schema.Manifest:
    """Builds MNIST-SVHN (or MNIST-SVHN-Text with `with_text`) into `output_dir`.

    Args:
      output_dir: local path or URL; must hold no dataset unless `overwrite`.
      with_text: add Sutter et al.'s text modality (dataset name mnist-svhn-text).
      source: "raw" (the published files in `source_dir`) or "tfds" (TFDS under `tfds_data_dir`).
      download: for tfds, download and prepare the datasets first (needs the internet).
      seed: keys every random draw; the same seed gives byte-identical shards.
      dm: random permutations per class (Shi et al.); default 30, or 20 with text.
      max_d: at most this many source images per class and dataset.
      validation_fraction: of each class's train images of each dataset, the share held out
        (and paired among themselves) for the validation split.
      num_shards: shards per split; by default about one per 4096 records.
      overwrite: replace a dataset already in `output_dir`.
      beam_args: passed unchanged to PipelineOptions (DirectRunner by default).

    Raises:
      UserError: a bad argument, a missing or malformed source file (named), an occupied output.
    """
    return run_mnist_svhn_job(output_dir, with_text=with_text, source=source, source_dir=source_dir,
                              tfds_data_dir=tfds_data_dir, download=download, seed=seed, dm=dm,
                              max_d=max_d, validation_fraction=validation_fraction,
                              num_shards=num_shards, overwrite=overwrite, beam_args=beam_args).manifest


def run_mnist_svhn_job(output_dir: str, *, with_text: bool = False, source: str = "raw",
                       source_dir: str | None = None, tfds_data_dir: str | None = None,
                       download: bool = False, seed: int = 0, dm: int | None = None,
                       max_d: int = mnist_svhn.DEFAULT_MAX_D,
                       validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                       num_shards: int | None = None, overwrite: bool = False,
                       beam_args: list[str] | None = None) -> beam_io.BuildResult:
    """`build_mnist_svhn`, also returning the job's counters (`mnist_svhn/<split>_records`, ...)."""
    name = NAMES[1] if with_text else NAMES[0]
    dm = mnist_svhn.DEFAULT_DM[name] if dm is None else dm
    _check_arguments(output_dir, seed=seed, dm=dm, max_d=max_d, validation_fraction=validation_fraction,
                     num_shards=num_shards, beam_args=beam_args)
    pipeline = beam_io.make_pipeline(beam_args)  # bad Beam arguments fail before the slow checks
    reader = sources.make_source(source, source_dir=source_dir, tfds_data_dir=tfds_data_dir,
                                 download=download)
    logger.info("checking the %s source files", source)
    source_record = reader.validate()
    plan = plan_pairs(reader, dm=dm, max_d=max_d, where=source_record.get("directory") or source,
                      validation_fraction=float(validation_fraction), seed=seed)
    shards = {split: int(num_shards or beam_io.default_num_shards(n)) for split, n in plan.counts.items()}
    source_record.update({"seed": seed, "dm": dm, "max_d": max_d,
                          "validation_fraction": float(validation_fraction),
                          "class_counts": plan.class_counts})
    template = manifest_template(name, source=source_record,
                                 pipeline_options=beam_io.options_to_json(pipeline.options))
    shard_list = [(split, i) for split in schema.SPLITS for i in range(shards[split])]
    _ = (pipeline
         | "Shards" >> beam.Create(shard_list)
         | "WriteShard" >> beam.ParDo(WritePairShardFn(
             reader, plan.class_plans, shards, template, output_dir, dm=dm, seed=seed, with_text=with_text))
         | "WriteManifest" >> beam_io.WriteManifest(output_dir, template, plan.counts, shards))

    # Only now that every argument and source file has been checked, so bad input never
    # deletes an old dataset.
    beam_io.prepare_output_dir(output_dir, overwrite=overwrite)
    logger.info("%s: building %s %s pairs in %s shards", output_dir, name, plan.counts, shards)
    return beam_io.run_build(pipeline, output_dir=output_dir, namespace=NAMESPACE)


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """The driver's plan of every split, from the labels alone.

    class_plans: {split: [ClassPlan]}; class_counts: {split: [n_c per class]}; counts: {split:
    pairs = dm * sum(n_c)}.
    """

    class_plans: dict[str, list[mnist_svhn.ClassPlan]]
    class_counts: dict[str, list[int]]
    counts: dict[str, int]


def plan_pairs(reader, *, dm: int, max_d: int, where: str,
               validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION, seed: int = 0) -> PairPlan:
    """Reads every source split's labels, holds out the validation images of the train ones and
    plans every split's pairs; UserError if a split would pair nothing."""
    labels = {}
    for source_split in sources.SPLITS:
        labels[source_split] = {dataset: reader.labels(dataset, source_split) for dataset in sources.DATASETS}
        mnist_svhn.check_labels({f"{d} {source_split} labels": v for d, v in labels[source_split].items()})
    held = {dataset: mnist_svhn.validation_indices(labels["train"][dataset], validation_fraction,
                                                   seed=seed, dataset=dataset)
            for dataset in sources.DATASETS}
    pools = {"train": {d: np.setdiff1d(np.arange(len(labels["train"][d])), held[d]) for d in held},
             "validation": held, "test": None}
    class_plans, class_counts = {}, {}
    for split in schema.SPLITS:
        split_labels = labels[mnist_svhn.SOURCE_SPLIT[split]]
        class_plans[split] = mnist_svhn.class_plans(split_labels["mnist"], split_labels["svhn"], split=split,
                                                    dm=dm, max_d=max_d, pools=pools[split])
        class_counts[split] = mnist_svhn.class_counts(split_labels["mnist"], split_labels["svhn"], max_d,
                                                      pools[split])
    counts = {split: dm * sum(class_counts[split]) for split in schema.SPLITS}
    for split, count in counts.items():
        if count == 0:
            raise UserError(f"the {split} split pairs nothing: no class has images in both "
                            f"MNIST and SVHN ({where})")
    return PairPlan(class_plans, class_counts, counts)


def _run_from_args(args: argparse.Namespace, beam_args: list[str], *, with_text: bool) -> beam_io.BuildResult:
    return run_mnist_svhn_job(
        args.output, with_text=with_text, source=args.source, source_dir=args.source_dir,
        tfds_data_dir=args.tfds_data_dir, download=args.download, seed=args.seed, dm=args.dm,
        max_d=args.max_d, validation_fraction=args.validation_fraction, num_shards=args.num_shards,
        overwrite=args.overwrite, beam_args=beam_args)


COMMANDS = tuple(
    beam_io.BuildCommand(**declared.fields(), run=functools.partial(_run_from_args, with_text=with_text))
    for declared, with_text in ((commands.MNIST_SVHN, False), (commands.MNIST_SVHN_TEXT, True)))


def _check_arguments(output_dir: str, *, seed: int, dm: int, max_d: int, validation_fraction: float,
                     num_shards: int | None, beam_args: list[str] | None) -> None:
    beam_io.check_job_arguments(output_dir, seed=seed, num_shards=num_shards, beam_args=beam_args)
    beam_io.check_int("dm", dm, 1)
    beam_io.check_int("max_d", max_d, 1)
    beam_io.check_fraction("validation_fraction", validation_fraction)


def manifest_template(name: str, *, source: dict, pipeline_options: dict) -> schema.Manifest:
    """The manifest without its splits (WriteManifest fills them in).

    Likelihood weights balance the modality sizes as the paper and SPEC section 6 say: MNIST
    3072/784 = 3.92, SVHN 1, text 3072/8 = 384.
    """
    with_text = name == NAMES[1]
    shapes = {"mnist": mnist_svhn.MNIST_SHAPE, "svhn": mnist_svhn.SVHN_SHAPE}
    if with_text:
        shapes["text"] = (mnist_svhn.TEXT_LENGTH,)
    weights = beam_io.balanced_likelihood_weights({k: int(np.prod(v)) for k, v in shapes.items()})
    modalities = [
        schema.ModalitySpec("mnist", "image", shapes["mnist"], "uint8", "laplace", weights["mnist"]),
        schema.ModalitySpec("svhn", "image", shapes["svhn"], "uint8", "laplace", weights["svhn"]),
    ]
    # The source indices are identities, not factors; the text's random start is text-private.
    metadata = {"mnist_index": (1,), "svhn_index": (1,)}
    factors = {}
    extras: dict[str, Any] = {}
    if with_text:
        modalities.append(schema.ModalitySpec("text", "sequence", shapes["text"], "int64", "categorical",
                                              weights["text"], vocab=mnist_svhn.VOCAB))
        metadata["text_pad"] = (1,)
        factors["text_pad"] = "text"
        extras["text_padding"] = mnist_svhn.text_padding_spec("text", "text_pad")
    return schema.Manifest(
        name=name, modalities=tuple(modalities), splits={},
        label=schema.LabelSpec(key="label", num_classes=mnist_svhn.NUM_CLASSES,
                               names=mnist_svhn.CLASS_NAMES),
        metadata_keys=metadata, factors=factors, source=source, pipeline_options=pipeline_options,
        extras=extras)


# --------------------------------------------------------------------------------------------
# DoFns: each a thin shell over a pure function


class WritePairShardFn(beam.DoFn):
    """(split, shard) -> (split, file name, count): draws, encodes and writes one whole shard.

    The split's pairs and the source images are kept per worker process (`_LruCache`), so a
    worker draws each split once and reads each source split once, however many shards it writes.
    """

    def __init__(self, reader, class_plans: dict[str, list[mnist_svhn.ClassPlan]], num_shards: dict[str, int],
                 template: schema.Manifest, output_dir: str, *, dm: int, seed: int, with_text: bool):
        self._reader, self._class_plans, self._num_shards = reader, class_plans, dict(num_shards)
        self._template, self._output_dir = template, output_dir
        self._dm, self._seed, self._with_text = dm, seed, with_text
        # The source files (or the whole source record) name the images the workers cache.
        source_key = json.dumps(template.source.get("files") or template.source, sort_keys=True, default=str)
        digest = hashlib.sha256(source_key.encode())
        for split in sorted(class_plans):
            for plan in class_plans[split]:
                digest.update(f"{split}/{plan.label}/{plan.offset}/{plan.total}".encode())
                digest.update(plan.mnist.tobytes() + plan.svhn.tobytes())
        self._source_key, self._plan_key = source_key, digest.hexdigest()

    def process(self, element: tuple[str, int]) -> Iterator[tuple[str, str, int]]:
        split, shard = element
        n = self._num_shards[split]
        pairs = _PAIRS.get((self._plan_key, self._dm, self._seed, self._with_text, split), lambda: split_pairs(
            self._class_plans[split], dm=self._dm, seed=self._seed, with_text=self._with_text))
        source_split = mnist_svhn.SOURCE_SPLIT[split]
        images = {dataset: _IMAGES.get((self._source_key, dataset, source_split),
                                       lambda d=dataset: read_source_split(self._reader, d, source_split))
                  for dataset in sources.DATASETS}
        mine = {key: values[shard::n] for key, values in pairs.items()}
        for dataset in sources.DATASETS:
            _check_labels(images[dataset][1], mine[dataset], mine["label"], dataset)
        yield beam_io.write_shard(self._output_dir, split, shard, n, (
            schema.encode_example(self._template, pair_record(
                label, m, images["mnist"][0][m], s, images["svhn"][0][s], start))
            for label, m, s, start in zip(mine["label"].tolist(), mine["mnist"].tolist(),
                                          mine["svhn"].tolist(), mine["text_start"].tolist())),
            len(mine["label"]), NAMESPACE)


def split_pairs(class_plans: list[mnist_svhn.ClassPlan], *, dm: int, seed: int, with_text: bool
                ) -> dict[str, np.ndarray]:
    """Every pair of a split in pair-number order: {"label", "mnist", "svhn", "text_start" (-1
    without text)}, int32 [P] each (row k is pair k)."""
    parts = []
    for plan in class_plans:
        drawn = mnist_svhn.expand_plan(plan, dm=dm, seed=seed, with_text=with_text)
        parts.append(np.stack([drawn["index"], np.full(len(drawn["index"]), plan.label), drawn["mnist"],
                               drawn["svhn"], drawn.get("text_start", np.full(len(drawn["index"]), -1))], 1))
    table = np.concatenate(parts).astype(np.int64) if parts else np.zeros([0, 5], np.int64)
    table = table[np.argsort(table[:, 0], kind="stable")]
    if not np.array_equal(table[:, 0], np.arange(len(table))):
        raise RuntimeError("the pair numbers of a split are not 0..P-1 (a pairing bug)")
    return {key: table[:, i + 1].astype(np.int32) for i, key in enumerate(("label", "mnist", "svhn", "text_start"))}


def read_source_split(reader, dataset: str, source_split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], int64 labels [N]) of one source split, streamed into one array."""
    labels = reader.labels(dataset, source_split)
    images = np.zeros((len(labels), *sources.IMAGE_SHAPES[dataset]), np.uint8)
    count = 0
    for start, chunk, _ in reader.iter_images(dataset, source_split):
        if start + len(chunk) > len(labels):
            raise RuntimeError(f"{dataset} {source_split}: more images than labels (did the source files change?)")
        images[start:start + len(chunk)] = chunk
        count = start + len(chunk)
    if count != len(labels):
        raise RuntimeError(f"{dataset} {source_split}: {count} images, {len(labels)} labels "
                           "(did the source files change while the job ran?)")
    return images, labels


def _check_labels(source_labels: np.ndarray, indices: np.ndarray, pair_labels: np.ndarray, dataset: str) -> None:
    bad = np.flatnonzero(source_labels[indices] != pair_labels)
    if bad.size:
        i = bad[0]
        raise RuntimeError(f"{dataset} source index {indices[i]} has label {source_labels[indices[i]]} on this "
                           f"worker but {pair_labels[i]} in the driver's labels (did the source files change?)")


class _LruCache:
    """The last `size` values by key, kept for the life of a worker process (a Dask worker runs
    many builds: old entries are dropped, not kept forever)."""

    def __init__(self, size: int):
        self._size, self._values = size, collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            value = make()
            self._values[key] = value
            while len(self._values) > self._size:
                self._values.popitem(last=False)
            return value

    def __reduce__(self):
        # Pickled (with this module's globals, when a subclass of a DoFn here is sent by value):
        # an empty cache of the same size on the other side, not the lock and the arrays.
        return _LruCache, (self._size,)


_PAIRS = _LruCache(3)  # the three splits of one build
_IMAGES = _LruCache(4)  # MNIST and SVHN, train and test: about 360 MB at full size


def pair_record(label: int, mnist_index: int, mnist_image: np.ndarray, svhn_index: int,
                svhn_image: np.ndarray, text_start: int) -> dict[str, Any]:
    """One pair as a record for `schema.encode_example` (text only when text_start >= 0); the
    images are uint8 rows of the source arrays."""
    record = {
        "mnist": np.asarray(mnist_image, np.uint8),
        "svhn": np.asarray(svhn_image, np.uint8),
        "label": label,
        "mnist_index": np.array([mnist_index], np.float32),
        "svhn_index": np.array([svhn_index], np.float32),
    }
    if text_start >= 0:
        record["text"] = mnist_svhn.text_tokens(label, text_start)
        record["text_pad"] = np.array([text_start], np.float32)
    return record
