"""The Beam job behind `bmvae data build digits`: paired digit / street / text examples.

The driver splits the 1797 sklearn digits into train, validation and test and pairs them (`pipeline.digits`,
a few milliseconds); the workers render and encode every pair; `pipeline.beam_io` writes the
deterministic shards and, last, the manifest:

    ReadTrain      -> RenderTrain      --+
    ReadValidation -> RenderValidation --+-> AllSplits -> WriteShards -> WriteManifest
    ReadTest       -> RenderTest       --+

The validation split is carved out of the train images (`digits.split_sources`); the test split
is drawn first and stays what it was before validation splits existed, record for record.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from typing import Iterator

import apache_beam as beam
import numpy as np
import sklearn
from sklearn.datasets import load_digits

from bmvae_tf import schema
from bmvae_tf.pipeline import beam_io, commands, digits

logger = logging.getLogger(__name__)

DATASET_NAME = "digits"
SOURCE_NAME = "sklearn.datasets.load_digits"


def build_digits(output_dir: str, *, seed: int = 0, dm: int = 10, test_fraction: float = 0.2,
                 validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                 num_shards: int | None = None, overwrite: bool = False,
                 beam_args: list[str] | None = None) -> schema.Manifest:
    """Builds the Digits dataset into `output_dir` and returns its manifest.

    Args:
      output_dir: local path or URL; must hold no dataset unless `overwrite`.
      seed: keys every random draw; the same seed gives byte-identical shards.
      dm: how often each source image appears on each side of the pairs (train: 1293 * dm pairs
        with the default fractions, validation: 144 * dm, test: 360 * dm).
      test_fraction: fraction of the source images held out for the test split.
      validation_fraction: fraction of the remaining (train) source images held out for the
        validation split.
      num_shards: shards per split; by default about one per 4096 records.
      overwrite: replace a dataset already in `output_dir`.
      beam_args: passed unchanged to PipelineOptions (DirectRunner by default).

    Raises:
      UserError: on a bad argument or an occupied output directory.
    """
    return run_digits_job(output_dir, seed=seed, dm=dm, test_fraction=test_fraction,
                          validation_fraction=validation_fraction, num_shards=num_shards,
                          overwrite=overwrite, beam_args=beam_args).manifest


def run_digits_job(output_dir: str, *, seed: int = 0, dm: int = 10, test_fraction: float = 0.2,
                   validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                   num_shards: int | None = None, overwrite: bool = False,
                   beam_args: list[str] | None = None) -> beam_io.BuildResult:
    """`build_digits`, also returning the job's counters (`digits/<split>_records`, ...)."""
    _check_arguments(output_dir, seed=seed, dm=dm, test_fraction=test_fraction,
                     validation_fraction=validation_fraction, num_shards=num_shards, beam_args=beam_args)
    seed, dm, test_fraction = int(seed), int(dm), float(test_fraction)
    validation_fraction = float(validation_fraction)
    images, labels = load_source()
    sources = digits.split_sources(len(images), test_fraction, seed, validation_fraction)
    pairs = {split: digits.make_pairs(labels, sources[split], dm=dm, seed=seed, split=split)
             for split in schema.SPLITS}
    expected_counts = {split: len(p) for split, p in pairs.items()}
    shards = {split: int(num_shards or beam_io.default_num_shards(n))
              for split, n in expected_counts.items()}
    pipeline = beam_io.make_pipeline(beam_args)
    image_sha256 = array_sha256(images)
    template = manifest_template(
        source={"dataset": SOURCE_NAME, "sklearn_version": sklearn.__version__,
                "num_images": int(len(images)), "sha256": image_sha256,
                "labels_sha256": array_sha256(labels),
                "num_source_images": {split: int(len(s)) for split, s in sources.items()},
                "seed": seed, "dm": dm, "test_fraction": test_fraction,
                "validation_fraction": validation_fraction},
        pipeline_options=beam_io.options_to_json(pipeline.options))

    rendered = []
    for split in schema.SPLITS:
        title = split.capitalize()
        rendered.append(pipeline
                        | f"Read{title}" >> beam.Create(pairs[split])
                        | f"Render{title}" >> beam.ParDo(RenderPairFn(template, seed, image_sha256)))
    _ = (rendered
         | "AllSplits" >> beam.Flatten()
         | "WriteShards" >> beam_io.WriteShards(output_dir, shards, namespace=DATASET_NAME)
         | "WriteManifest" >> beam_io.WriteManifest(output_dir, template, expected_counts, shards))

    # Only now that every argument has been checked, so bad input never deletes an old dataset.
    beam_io.prepare_output_dir(output_dir, overwrite=overwrite)
    logger.info("%s: building %s pairs in %s shards", output_dir, expected_counts, shards)
    return beam_io.run_build(pipeline, output_dir=output_dir, namespace=DATASET_NAME)


def _run_from_args(args: argparse.Namespace, beam_args: list[str]) -> beam_io.BuildResult:
    return run_digits_job(args.output, seed=args.seed, dm=args.dm, test_fraction=args.test_fraction,
                          validation_fraction=args.validation_fraction, num_shards=args.num_shards,
                          overwrite=args.overwrite, beam_args=beam_args)


COMMANDS = (beam_io.BuildCommand(**commands.DIGITS.fields(), run=_run_from_args),)


def _check_arguments(output_dir: str, *, seed: int, dm: int, test_fraction: float,
                     validation_fraction: float, num_shards: int | None,
                     beam_args: list[str] | None) -> None:
    beam_io.check_job_arguments(output_dir, seed=seed, num_shards=num_shards, beam_args=beam_args)
    beam_io.check_int("dm", dm, 1)
    beam_io.check_fraction("test_fraction", test_fraction)
    beam_io.check_fraction("validation_fraction", validation_fraction)


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits: images [1797, 8, 8] float64 in 0..16 and labels [1797] int64."""
    data = load_digits()
    return np.asarray(data.images, np.float64), np.asarray(data.target, np.int64)


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the array's C-order bytes, recorded so a reader can tell what was read."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def manifest_template(*, source: dict, pipeline_options: dict) -> schema.Manifest:
    """The digits manifest without its splits (WriteManifest fills them in)."""
    shapes = {"digit": digits.DIGIT_SHAPE, "street": digits.STREET_SHAPE,
              "text": (digits.TEXT_LENGTH,)}
    weights = beam_io.balanced_likelihood_weights(
        {name: int(np.prod(shape)) for name, shape in shapes.items()})
    modalities = (
        schema.ModalitySpec("digit", "image", shapes["digit"], "float32", "laplace", weights["digit"]),
        schema.ModalitySpec("street", "image", shapes["street"], "float32", "laplace", weights["street"]),
        schema.ModalitySpec("text", "sequence", shapes["text"], "int64", "categorical", weights["text"],
                            vocab=digits.VOCAB),
    )
    return schema.Manifest(
        name=DATASET_NAME, modalities=modalities, splits={},
        label=schema.LabelSpec(key="label", num_classes=digits.NUM_CLASSES, names=digits.CLASS_NAMES),
        metadata_keys=dict(digits.METADATA_SHAPES), factors=dict(digits.PRIVATE_FACTORS),
        source=source, pipeline_options=pipeline_options)


class RenderPairFn(beam.DoFn):
    """digits.Pair -> (split, index, serialized tf.train.Example); the work is `render_pair`."""

    def __init__(self, template: schema.Manifest, seed: int, image_sha256: str):
        self._template = template
        self._seed = seed
        self._image_sha256 = image_sha256

    def setup(self) -> None:
        self._images, _ = load_source()
        # A worker with another sklearn could hold other images; fail rather than mix them.
        if array_sha256(self._images) != self._image_sha256:
            raise RuntimeError(f"{SOURCE_NAME} on this worker differs from the driver's "
                               f"(sha256 {array_sha256(self._images)} != {self._image_sha256})")

    def process(self, pair: digits.Pair) -> Iterator[tuple[str, int, bytes]]:
        # Looked up through the module on every call so tests can substitute a failing renderer.
        record = digits.render_pair(pair, self._images, self._seed)
        yield pair.split, pair.index, schema.encode_example(self._template, record)
