"""The Beam job behind `bmvae data build arrays --input FILE.npz`: users' own paired data.

The driver reads the archive once, streaming (`pipeline.arrays.plan_arrays`): it checks every
array and computes the train-split statistics of the vectors. The workers then read the arrays
again in row ranges, join the rows of all arrays by example, standardise and encode them:

    Reads (array, rows) -> ReadRows (example, array value) -> GroupByExample -> Encode
        -> WriteShards -> WriteManifest

Rows that miss a modality (`present_NAME` arrays, or all-NaN rows with `nan_as_missing`) are
written with zeros for it and their mask (`schema.PRESENT_KEY`); the manifest counts the present
rows (`present_counts`). An example keeps its row number as its index, so shard `i` of a split holds that split's rows
with row % num_shards == i, in row order; the same input and seed give byte-identical shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics

from bmvae_tf import schema
from bmvae_tf.pipeline import arrays, beam_io, commands, sources

logger = logging.getLogger(__name__)

NAMESPACE = "arrays"


def build_arrays(output_dir: str, *, input_path: str, name: str | None = None,
                 sequences: tuple[str, ...] = (), standardize: bool = True, test_fraction: float = 0.2,
                 seed: int = 0, num_shards: int | None = None, overwrite: bool = False,
                 beam_args: list[str] | None = None, max_vocab: int = arrays.MAX_VOCAB,
                 validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                 nan_as_missing: bool = False) -> schema.Manifest:
    """Builds a dataset from the arrays of `input_path` (.npz) into `output_dir`.

    Args:
      output_dir: local path or URL; must hold no dataset unless `overwrite`.
      input_path: the .npz archive (local path or URL), see pipeline/arrays.py for its layout.
      name: the dataset name (default: the archive's file name without .npz).
      sequences: the integer [N, L] arrays to treat as token sequences.
      standardize: standardise vector modalities with train-split statistics.
      test_fraction, seed: the held-out fraction when the archive has no `split` array.
      validation_fraction: the share of the train rows held out for validation, unless `split`
        names validation rows itself (seeded too).
      num_shards: shards per split; by default about one per 4096 records.
      overwrite: replace a dataset already in `output_dir`.
      beam_args: passed unchanged to PipelineOptions (beam_io.LOCAL_RUNNER by default).
      max_vocab: the largest sequence vocabulary allowed (largest token id + 1).
      nan_as_missing: a row of a float modality that is entirely NaN is a missing row of that
        modality (a row partly NaN is an error); without it any NaN is an error.

    Raises:
      UserError: a bad argument or array (naming the file and key), or an occupied output.
    """
    return run_arrays_job(output_dir, input_path=input_path, name=name, sequences=sequences,
                          standardize=standardize, test_fraction=test_fraction, seed=seed,
                          num_shards=num_shards, overwrite=overwrite, beam_args=beam_args,
                          max_vocab=max_vocab, validation_fraction=validation_fraction,
                          nan_as_missing=nan_as_missing).manifest


def run_arrays_job(output_dir: str, *, input_path: str, name: str | None = None,
                   sequences: tuple[str, ...] = (), standardize: bool = True,
                   test_fraction: float = 0.2, seed: int = 0, num_shards: int | None = None,
                   overwrite: bool = False, beam_args: list[str] | None = None,
                   max_vocab: int = arrays.MAX_VOCAB,
                   validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION,
                   nan_as_missing: bool = False) -> beam_io.BuildResult:
    """`build_arrays`, also returning the job's counters (`arrays/<split>_records`, ...)."""
    _check_arguments(output_dir, seed=seed, test_fraction=test_fraction, num_shards=num_shards,
                     beam_args=beam_args)
    beam_io.check_int("max_vocab", max_vocab, 1)
    beam_io.check_fraction("validation_fraction", validation_fraction)
    pipeline = beam_io.make_pipeline(beam_args)
    plan = arrays.plan_arrays(input_path, sequences=tuple(sequences), standardize=standardize,
                              test_fraction=float(test_fraction), seed=int(seed), max_vocab=max_vocab,
                              validation_fraction=float(validation_fraction),
                              nan_as_missing=bool(nan_as_missing))
    dataset_name = name or os.path.basename(input_path).removesuffix(".npz") or "arrays"
    shards = {split: int(num_shards or beam_io.default_num_shards(n))
              for split, n in plan.split_counts.items()}
    label = None if plan.num_classes is None else schema.LabelSpec(key=arrays.LABEL_KEY,
                                                                    num_classes=plan.num_classes)
    template = schema.Manifest(
        name=dataset_name, modalities=plan.modalities, splits={}, label=label,
        source=arrays.source_record(plan, sources.file_sha256(input_path)),
        pipeline_options=beam_io.options_to_json(pipeline.options), present_counts=plan.present_counts)
    # Names that cannot be modalities fail here, before anything is written.
    dataclasses.replace(template, splits={"train": schema.SplitInfo(("check",), 0)},
                        present_counts={}).validate()

    reads = [r for member in plan.members.values() for r in arrays.read_ranges(member)]
    _ = (pipeline
         | "Reads" >> beam.Create(reads)
         | "ReadRows" >> beam.ParDo(ReadRowsFn(plan))
         | "GroupByExample" >> beam.GroupByKey()
         | "Encode" >> beam.ParDo(EncodeExampleFn(plan, template))
         | "WriteShards" >> beam_io.WriteShards(output_dir, shards, namespace=NAMESPACE)
         | "WriteManifest" >> beam_io.WriteManifest(output_dir, template, dict(plan.split_counts), shards))

    beam_io.prepare_output_dir(output_dir, overwrite=overwrite)
    logger.info("%s: building %r from %s: %s examples in %s shards", output_dir, dataset_name,
                input_path, dict(plan.split_counts), shards)
    return beam_io.run_build(pipeline, output_dir=output_dir, namespace=NAMESPACE)


def _run_from_args(args: argparse.Namespace, beam_args: list[str]) -> beam_io.BuildResult:
    return run_arrays_job(
        args.output, input_path=args.input, name=args.name, sequences=tuple(args.sequence),
        standardize=not args.no_standardize, test_fraction=args.test_fraction, seed=args.seed,
        num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args,
        max_vocab=args.max_vocab, validation_fraction=args.validation_fraction,
        nan_as_missing=args.nan_as_missing)


COMMANDS = (beam_io.BuildCommand(**commands.ARRAYS.fields(), run=_run_from_args),)


def _check_arguments(output_dir: str, *, seed: int, test_fraction: float, num_shards: int | None,
                     beam_args: list[str] | None) -> None:
    beam_io.check_job_arguments(output_dir, seed=seed, num_shards=num_shards, beam_args=beam_args)
    beam_io.check_fraction("test_fraction", test_fraction)


class ReadRowsFn(beam.DoFn):
    """(array key, start, stop) -> (row, (array key, row bytes)) for each row of the range."""

    def __init__(self, plan: arrays.Plan):
        self._plan = plan

    def process(self, read: tuple[str, int, int]) -> Iterator[tuple[int, tuple[str, bytes]]]:
        key, start, stop = read
        member = self._plan.members[key]
        counter = Metrics.counter(NAMESPACE, "values_read")
        if (start, stop) == (0, member.count) and not member.stored:
            chunks = arrays.iter_chunks(self._plan.path, member)  # one streaming pass
        else:
            chunks = [(start, arrays.read_rows(self._plan.path, member, start, stop))]
        for first, rows in chunks:
            counter.inc(len(rows))
            for offset in range(len(rows)):
                # A slice, not rows[offset]: numpy's string scalars drop their padding in tobytes.
                yield first + offset, (key, rows[offset:offset + 1].tobytes())


class EncodeExampleFn(beam.DoFn):
    """(row, [(array key, bytes), ...]) -> (split, row, serialized tf.train.Example)."""

    def __init__(self, plan: arrays.Plan, template: schema.Manifest):
        self._plan, self._template = plan, template

    def process(self, element: tuple[int, Iterable[tuple[str, bytes]]]) -> Iterator[tuple[str, int, bytes]]:
        row, values = element
        by_key = dict(values)
        if sorted(by_key) != sorted(self._plan.members):
            raise RuntimeError(f"{self._plan.path}: example {row} joined arrays {sorted(by_key)}, "
                               f"expected {sorted(self._plan.members)}")
        decoded = {key: np.frombuffer(data, self._plan.members[key].np_dtype).reshape(
            self._plan.members[key].row_shape) for key, data in by_key.items()}
        split = arrays.row_split(self._plan, np.array([row]),
                                 decoded[arrays.SPLIT_KEY][None] if self._plan.has_split else None)[0]
        present = arrays.row_present(self._plan, decoded)
        # An absent modality's row (zeros, NaN, anything) is not read: encode_example writes zeros.
        record = {spec.name: arrays.to_model_units(spec, decoded[spec.name])
                  for spec, observed in zip(self._template.modalities, present) if observed}
        if self._template.has_missing_rows:
            record[schema.PRESENT_KEY] = present
        if self._template.label is not None:
            record[self._template.label.key] = int(decoded[arrays.LABEL_KEY])
        Metrics.counter(NAMESPACE, "examples_encoded").inc()
        yield arrays.SPLIT_NAMES[split], row, schema.encode_example(self._template, record)
