"""The Beam jobs behind `bmvae data build mnist-svhn` and `bmvae data build mnist-svhn-text`.

The driver reads only the labels (a few hundred kB) and checks the source files in one
streaming pass; it builds the per-class index lists (`pipeline.mnist_svhn.class_plans`). The
workers draw the pairs of each class, stream the images out of the source files and join them
to the pairs by source index, so no step holds a dataset's images or its pair list:

    PlanTrain -> PairsTrain (mnist idx, pair) --+
    ReadMnistTrain (mnist idx, image) ----------+-> JoinMnistTrain -> (svhn idx, pair + mnist) --+
    ReadSvhnTrain (svhn idx, image) -------------------------------------------------------------+
        -> JoinSvhnTrain -> EncodeTrain --+
    ... the same for Validation and Test .+-> AllSplits -> WriteShards -> WriteManifest

The validation split pairs a held-out fraction of each class's train images
(`mnist_svhn.validation_indices`); ReadMnistTrain and ReadSvhnTrain read the train source files
once and key each image by the split that pairs it (SelectMnistTrain, SelectMnistValidation,
...). The test split is planned, drawn and written exactly as before validation splits existed.

Records are gzip TFRecords of uint8 images (the manifest's dtype says so; the reader gives
[0, 1] floats, exactly x / 255 as torchvision's ToTensor), the label, the source indices as
metadata, and for the text variant the text and its start (`text_pad`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics

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
    images = _read_stages(pipeline, plan, reader)
    encoded = [_split_stages(pipeline, split, plan, images[split], template, dm=dm, seed=seed,
                             with_text=with_text)
               for split in schema.SPLITS]
    _ = (encoded
         | "AllSplits" >> beam.Flatten()
         | "WriteShards" >> beam_io.WriteShards(output_dir, shards, namespace=NAMESPACE)
         | "WriteManifest" >> beam_io.WriteManifest(output_dir, template, plan.counts, shards))

    # Only now that every argument and source file has been checked, so bad input never
    # deletes an old dataset.
    beam_io.prepare_output_dir(output_dir, overwrite=overwrite)
    logger.info("%s: building %s %s pairs in %s shards", output_dir, name, plan.counts, shards)
    return beam_io.run_build(pipeline, output_dir=output_dir, namespace=NAMESPACE)


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """The driver's plan of every split, from the labels alone.

    class_plans: {split: [ClassPlan]}; paired: {split: {dataset: sorted source indices the
    split pairs}}; class_counts: {split: [n_c per class]}; counts: {split: pairs = dm * sum(n_c)}.
    """

    class_plans: dict[str, list[mnist_svhn.ClassPlan]]
    paired: dict[str, dict[str, np.ndarray]]
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
    class_plans, paired, class_counts = {}, {}, {}
    for split in schema.SPLITS:
        split_labels = labels[mnist_svhn.SOURCE_SPLIT[split]]
        class_plans[split] = mnist_svhn.class_plans(split_labels["mnist"], split_labels["svhn"], split=split,
                                                    dm=dm, max_d=max_d, pools=pools[split])
        class_counts[split] = mnist_svhn.class_counts(split_labels["mnist"], split_labels["svhn"], max_d,
                                                      pools[split])
        # Source images past a class's first n are never paired; the readers drop them early.
        paired[split] = {dataset: np.sort(np.concatenate(
            [getattr(p, dataset) for p in class_plans[split]] or [np.zeros([0], np.int64)]))
            for dataset in sources.DATASETS}
    counts = {split: dm * sum(class_counts[split]) for split in schema.SPLITS}
    for split, count in counts.items():
        if count == 0:
            raise UserError(f"the {split} split pairs nothing: no class has images in both "
                            f"MNIST and SVHN ({where})")
    return PairPlan(class_plans, paired, class_counts, counts)


def _read_stages(pipeline: beam.Pipeline, plan: PairPlan, reader) -> dict[str, dict[str, beam.PCollection]]:
    """{split: {dataset: (source index, (label, image bytes))}}: each source split read once,
    its images tagged with the split that pairs them."""
    images: dict[str, dict[str, beam.PCollection]] = {split: {} for split in schema.SPLITS}
    for source_split in sources.SPLITS:
        splits = [s for s in schema.SPLITS if mnist_svhn.SOURCE_SPLIT[s] == source_split]
        title = source_split.capitalize()
        for dataset in sources.DATASETS:
            read = (pipeline
                    | f"{dataset.capitalize()}Split{title}" >> beam.Create([(dataset, source_split)])
                    | f"Read{dataset.capitalize()}{title}" >> beam.ParDo(
                        ReadImagesFn(reader, {s: plan.paired[s][dataset] for s in splits})))
            # Keyed by split rather than tagged outputs: Beam's DaskRunner (2.77) puts every tag
            # of a multi-output ParDo into one bag and hands all of it to each consumer.
            for split in splits:
                images[split][dataset] = (
                    read | f"Select{dataset.capitalize()}{split.capitalize()}" >> beam.FlatMap(_of_split, split))
    return images


def _of_split(element: tuple[str, Any], split: str) -> Iterator[Any]:
    if element[0] == split:
        yield element[1]


def _split_stages(pipeline: beam.Pipeline, split: str, plan: PairPlan, images: dict[str, beam.PCollection],
                  template: schema.Manifest, *, dm: int, seed: int, with_text: bool) -> beam.PCollection:
    """One split's pairs, drawn, joined to their two images and encoded (module docstring)."""
    title = split.capitalize()
    pairs = (pipeline
             | f"Plan{title}" >> beam.Create(plan.class_plans[split])
             | f"Pairs{title}" >> beam.ParDo(ExpandPlanFn(dm, seed, with_text)))
    with_mnist = ({"pairs": pairs, "image": images["mnist"]}
                  | f"JoinMnist{title}" >> beam.CoGroupByKey()
                  | f"AttachMnist{title}" >> beam.ParDo(AttachMnistFn()))
    return ({"pairs": with_mnist, "image": images["svhn"]}
            | f"JoinSvhn{title}" >> beam.CoGroupByKey()
            | f"Encode{title}" >> beam.ParDo(EncodePairFn(template, split)))


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


class ExpandPlanFn(beam.DoFn):
    """ClassPlan -> (mnist index, (pair index, label, svhn index, text start or -1)) per pair."""

    def __init__(self, dm: int, seed: int, with_text: bool):
        self._dm, self._seed, self._with_text = dm, seed, with_text

    def process(self, plan: mnist_svhn.ClassPlan) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
        pairs = mnist_svhn.expand_plan(plan, dm=self._dm, seed=self._seed, with_text=self._with_text)
        starts = pairs.get("text_start", np.full(len(pairs["index"]), -1))
        Metrics.counter(NAMESPACE, f"{plan.split}_pairs_drawn").inc(len(pairs["index"]))
        for index, mnist, svhn, start in zip(pairs["index"].tolist(), pairs["mnist"].tolist(),
                                             pairs["svhn"].tolist(), starts.tolist()):
            yield mnist, (index, plan.label, svhn, start)


class ReadImagesFn(beam.DoFn):
    """(dataset, source split) -> (split, (source index, (label, image bytes))) for every image
    that is paired, keyed by the split that pairs it.

    Streams the source one chunk at a time; images no split pairs (past their class's first n)
    are counted (`<dataset>_<source split>_unpaired`) and dropped here rather than shuffled for
    nothing.

    paired: {split: sorted source indices of this dataset and source split that it pairs}.
    """

    def __init__(self, reader, paired: dict[str, np.ndarray]):
        self._reader = reader
        self._paired = {split: np.asarray(indices, np.int64) for split, indices in paired.items()}

    def process(self, element: tuple[str, str]) -> Iterator[tuple[str, tuple[int, tuple[int, bytes]]]]:
        dataset, source_split = element
        read = Metrics.counter(NAMESPACE, f"{dataset}_{source_split}_images_read")
        unpaired = Metrics.counter(NAMESPACE, f"{dataset}_{source_split}_unpaired")
        for start, images, labels in self._reader.iter_images(dataset, source_split):
            read.inc(len(images))
            indices = start + np.arange(len(images))
            owner = np.full(len(images), -1)
            splits = list(self._paired)
            for i, split in enumerate(splits):
                owner[np.isin(indices, self._paired[split])] = i
            unpaired.inc(int(np.sum(owner < 0)))
            for offset in np.flatnonzero(owner >= 0).tolist():
                yield splits[owner[offset]], (start + offset, (int(labels[offset]), images[offset].tobytes()))


def _single_image(images: Iterable, index: int, dataset: str) -> tuple[int, bytes]:
    images = list(images)
    if len(images) != 1:
        raise RuntimeError(f"{dataset} source index {index}: {len(images)} images read, expected 1 "
                           "(did the source files change while the job ran?)")
    return images[0]


def _check_label(image_label: int, pair_label: int, index: int, dataset: str) -> None:
    if image_label != pair_label:
        raise RuntimeError(f"{dataset} source index {index} has label {image_label} on this worker but "
                           f"{pair_label} in the driver's labels (did the source files change?)")


class AttachMnistFn(beam.DoFn):
    """(mnist index, {pairs, image}) -> (svhn index, (pair index, label, start, mnist index, mnist bytes))."""

    def process(self, element: tuple[int, dict]) -> Iterator[tuple[int, tuple]]:
        mnist_index, grouped = element
        pairs = list(grouped["pairs"])
        if not pairs:
            return
        label, image = _single_image(grouped["image"], mnist_index, "mnist")
        for pair_index, pair_label, svhn_index, start in pairs:
            _check_label(label, pair_label, mnist_index, "mnist")
            yield svhn_index, (pair_index, pair_label, start, mnist_index, image)


class EncodePairFn(beam.DoFn):
    """(svhn index, {pairs, image}) -> (split, pair index, serialized tf.train.Example)."""

    def __init__(self, template: schema.Manifest, split: str):
        self._template, self._split = template, split

    def process(self, element: tuple[int, dict]) -> Iterator[tuple[str, int, bytes]]:
        svhn_index, grouped = element
        pairs = list(grouped["pairs"])
        if not pairs:
            return
        label, svhn_image = _single_image(grouped["image"], svhn_index, "svhn")
        for pair_index, pair_label, start, mnist_index, mnist_image in pairs:
            _check_label(label, pair_label, svhn_index, "svhn")
            record = pair_record(pair_label, mnist_index, mnist_image, svhn_index, svhn_image, start)
            yield self._split, pair_index, schema.encode_example(self._template, record)


def pair_record(label: int, mnist_index: int, mnist_image: bytes, svhn_index: int,
                svhn_image: bytes, text_start: int) -> dict[str, Any]:
    """One pair as a record for `schema.encode_example` (text only when text_start >= 0)."""
    record = {
        "mnist": np.frombuffer(mnist_image, np.uint8).reshape(mnist_svhn.MNIST_SHAPE),
        "svhn": np.frombuffer(svhn_image, np.uint8).reshape(mnist_svhn.SVHN_SHAPE),
        "label": label,
        "mnist_index": np.array([mnist_index], np.float32),
        "svhn_index": np.array([svhn_index], np.float32),
    }
    if text_start >= 0:
        record["text"] = mnist_svhn.text_tokens(label, text_start)
        record["text_pad"] = np.array([text_start], np.float32)
    return record
