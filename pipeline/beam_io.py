"""Beam plumbing shared by the dataset jobs (`bmvae data build NAME`).

A dataset job renders its records, then hands `(split, index, serialized tf.train.Example)`
tuples to `WriteShards` and the shards' `(split, file_name, count)` to `WriteManifest`:

    records | "WriteShards" >> WriteShards(out, num_shards, namespace)
            | "WriteManifest" >> WriteManifest(out, template, expected_counts, num_shards)

Guarantees:
- Deterministic output: record `index` goes to shard `index % num_shards[split]` and each shard
  is written in index order, so the same records give byte-identical files whatever the runner,
  bundling or worker count. (Beam's WriteToTFRecord assigns records to shards at random.)
- Complete output: every shard index gets a file, even an empty one, so the manifest's file list
  matches the SPEC's `<split>-NNNNN-of-MMMMM` naming.
- Atomic output: shards and the manifest are written under temporary names and renamed; the
  manifest is written last, by a stage that depends on every shard and checks the counts, so a
  failed run leaves no manifest.
All file access goes through tf.io.gfile, so output directories may be gs:// or hdfs:// URLs.

Runners: the jobs run on LOCAL_RUNNER (in this process), on Beam's DaskRunner (a dask.distributed
cluster, `pip install .[dask]`) and on the portable runners. The DaskRunner translates only Create,
ParDo, GroupByKey and Flatten, computes only the graph behind the last transform, computes each
side input as a separate Dask job from inside a worker task, and reports no metrics;
`check_runner_support` refuses a job it would run wrongly, and `run_build` says in a log line when
the counters are absent (the manifest's counts never come from counters).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import logging
import math
import numbers
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError

logger = logging.getLogger(__name__)

RECORDS_PER_SHARD = 4096
# Matches schema.shard_name for any split, and the temporary files WriteShards renames from.
_SHARD_GLOBS = (f"*-?????-of-?????{schema.SHARD_SUFFIX}", f"*-?????-of-?????{schema.SHARD_SUFFIX}.tmp-*")
_SECRET_OPTION = re.compile(r"secret|token|password|credential|connection_string|access_key", re.I)


def default_num_shards(num_records: int, records_per_shard: int = RECORDS_PER_SHARD) -> int:
    """About one shard per `records_per_shard` records, at least one."""
    return max(1, math.ceil(num_records / records_per_shard))


def balanced_likelihood_weights(sizes: Mapping[str, int]) -> dict[str, float]:
    """Likelihood weight per modality: largest modality size / this modality's size.

    A log-likelihood sums over a modality's scalars, so unweighted the largest modality would
    dominate the objective; the paper (after Shi et al.) scales each one up to the largest, e.g.
    MNIST 3072/784 = 3.92 against SVHN (SPEC sections 4 and 6).

    Args:
      sizes: modality name -> number of scalars per example (ModalitySpec.size).
    """
    largest = max(sizes.values())
    return {name: largest / size for name, size in sizes.items()}


def prepare_output_dir(output_dir: str, *, overwrite: bool) -> None:
    """Makes `output_dir` ready for a new dataset, or refuses (UserError naming it).

    A directory already holding a manifest or shard files is refused unless `overwrite`, whether
    or not it is the same dataset: a silent rebuild could mix shards of two runs. With
    `overwrite` the manifest is deleted first, so a failed rebuild leaves no manifest behind, then
    every file of the shard naming pattern. Other files are left alone.
    """
    if not output_dir:
        raise UserError("the output directory must not be empty")
    if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
        raise UserError(f"{output_dir}: exists and is not a directory")
    manifest = schema.manifest_path(output_dir)
    has_manifest = tf.io.gfile.exists(manifest)
    shards = sorted(f for pattern in _SHARD_GLOBS
                    for f in tf.io.gfile.glob(os.path.join(output_dir, pattern)))
    if (has_manifest or shards) and not overwrite:
        held = f"dataset {_dataset_name(manifest)!r}" if has_manifest else f"{len(shards)} shard file(s)"
        raise UserError(f"{output_dir}: already holds {held}; use an empty directory or pass "
                        "--overwrite to replace it")
    if has_manifest:
        tf.io.gfile.remove(manifest)
    for path in shards:
        tf.io.gfile.remove(path)
    if has_manifest or shards:
        logger.info("%s: removed the old manifest and %d shard file(s)", output_dir, len(shards))
    tf.io.gfile.makedirs(output_dir)


def _dataset_name(manifest_path: str) -> str:
    """The name in an existing manifest, read leniently: it is only quoted in an error message."""
    try:
        with tf.io.gfile.GFile(manifest_path, "r") as f:
            return str(json.loads(f.read()).get("name", "?"))
    except (ValueError, AttributeError, tf.errors.OpError):
        return "?"


# Without --runner, jobs run here, in Python: Beam's own default (DirectRunner) first tries to
# download and start the Prism runner binary from the internet, and a local build must never
# reach for the network. FnApiRunner is the Python direct runner DirectRunner falls back to; it
# takes the same --direct_num_workers / --direct_running_mode options.
LOCAL_RUNNER = "FnApiRunner"
# Beam registers no short name for its DaskRunner; `--runner=DaskRunner` is taken to mean it.
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def make_pipeline(beam_args: Sequence[str] | None) -> beam.Pipeline:
    """A Pipeline from Beam's command-line arguments (LOCAL_RUNNER without --runner).

    Beam reports bad arguments by printing argparse's usage and exiting, or with a ValueError
    for an unknown runner; both become a one-line UserError here, before any file is touched.
    """
    options = PipelineOptions(list(beam_args or []))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            options.get_all_options(retain_unknown_options=True)
        standard = options.view_as(StandardOptions)
        if not standard.runner:
            standard.runner = LOCAL_RUNNER
        if is_dask_runner(standard.runner):
            standard.runner = DASK_RUNNER
            _require_dask()
        logger.info("Beam runner: %s%s", standard.runner,
                    " (Python direct runner, in this process)" if standard.runner == LOCAL_RUNNER else "")
        return beam.Pipeline(options=options)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines() or [str(list(beam_args or []))]
        raise UserError(f"bad Beam pipeline arguments: {lines[-1].split('error: ')[-1]}") from None
    except ValueError as e:
        raise UserError(f"bad Beam pipeline arguments: {e}") from None


def is_dask_runner(runner: Any) -> bool:
    """True for Beam's DaskRunner, named in full, by `DaskRunner`, or given as a runner object."""
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name in ("DaskRunner", DASK_RUNNER)


def _require_dask() -> None:
    try:
        import distributed  # noqa: F401 -- only to check that the [dask] extra is installed
    except ImportError:
        raise UserError("--runner=DaskRunner needs dask.distributed: pip install 'bmvae-tf[dask]' "
                        "(apache-beam[dask])") from None


def options_to_json(options: PipelineOptions) -> dict[str, Any]:
    """The options the user set (plus the runner), as JSON-safe values for the manifest.

    Values of options that may hold credentials (S3 keys, Azure connection strings, ...) are
    replaced by "<redacted>": the manifest travels with the data.
    """
    values = options.get_all_options(drop_default=True, retain_unknown_options=True)
    values.setdefault("runner", options.view_as(StandardOptions).runner or LOCAL_RUNNER)
    return {key: "<redacted>" if _SECRET_OPTION.search(key) else _json_safe(values[key])
            for key in sorted(values)}


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


# --------------------------------------------------------------------------------------------
# Shards


class WriteShards(beam.PTransform):
    """(split, index, serialized example) -> one (split, file_name, count) per shard written.

    Shard files are `schema.shard_name(split, i, n)` in `output_dir`, gzip TFRecords holding the
    records with index % n == i in ascending index order. Counts the records written per split
    in the Beam counter `<namespace>/<split>_records`.
    """

    def __init__(self, output_dir: str, num_shards: Mapping[str, int], namespace: str):
        super().__init__()
        if any(n < 1 for n in num_shards.values()):
            raise UserError(f"every split needs at least one shard, got {dict(num_shards)}")
        self._output_dir = output_dir
        self._num_shards = dict(num_shards)
        self._namespace = namespace

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        num_shards = self._num_shards
        keyed = records | "KeyByShard" >> beam.Map(_key_by_shard, num_shards=num_shards)
        # One marker per shard, so a shard that no record falls into is still written (empty).
        markers = records.pipeline | "ShardMarkers" >> beam.Create(
            [((split, i), None) for split, n in sorted(num_shards.items()) for i in range(n)])
        return ((keyed, markers)
                | "AddMarkers" >> beam.Flatten()
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShardFn(self._output_dir, num_shards, self._namespace)))


def _key_by_shard(record: tuple[str, int, bytes], num_shards: Mapping[str, int]
                  ) -> tuple[tuple[str, int], tuple[int, bytes]]:
    split, index, serialized = record
    return (split, index % num_shards[split]), (index, serialized)


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir: str, num_shards: Mapping[str, int], namespace: str):
        self._output_dir = output_dir
        self._num_shards = dict(num_shards)
        self._namespace = namespace

    def process(self, element: tuple[tuple[str, int], Iterable[tuple[int, bytes] | None]]
                ) -> Iterator[tuple[str, str, int]]:
        (split, shard), values = element
        # Sorting by (index, bytes) fixes the order however the runner delivered the group.
        records = sorted(v for v in values if v is not None)
        yield write_shard(self._output_dir, split, shard, self._num_shards[split], [r for _, r in records],
                          len(records), self._namespace)


def write_shard(output_dir: str, split: str, shard: int, num_shards: int, records: Iterable[bytes],
                count: int, namespace: str) -> tuple[str, str, int]:
    """Writes shard `shard` of `split` (`count` encoded records) and counts it in the job's
    counters; returns (split, file name, count) as WriteManifest takes it."""
    name = schema.shard_name(split, shard, num_shards)
    write_tfrecords(os.path.join(output_dir, name), records)
    Metrics.counter(namespace, f"{split}_records").inc(count)
    Metrics.counter(namespace, "shards_written").inc()
    return split, name, count


def write_tfrecords(path: str, records: Iterable[bytes]) -> None:
    """Writes a gzip TFRecord file under a temporary name, then renames it to `path`.

    A retried or failed writer never leaves a half-written file under the final name.
    """
    with atomic.publishing(path) as tmp:
        with tf.io.TFRecordWriter(tmp, options=schema.COMPRESSION) as writer:
            for record in records:
                writer.write(record)


# --------------------------------------------------------------------------------------------
# Manifest


class WriteManifest(beam.PTransform):
    """(split, file_name, count) of every shard -> writes DIR/manifest.json; outputs its path.

    `template` is the finished manifest except its splits. The manifest is written only if every
    split has all its shards and exactly its expected number of records; otherwise the stage
    raises and the run fails without a manifest.
    """

    def __init__(self, output_dir: str, template: schema.Manifest,
                 expected_counts: Mapping[str, int], num_shards: Mapping[str, int]):
        super().__init__()
        if set(expected_counts) != set(num_shards):
            raise ValueError(f"splits differ: counts for {sorted(expected_counts)}, "
                             f"shards for {sorted(num_shards)}")
        self._output_dir = output_dir
        self._template = template
        self._expected_counts = dict(expected_counts)
        self._num_shards = dict(num_shards)

    def expand(self, shards: beam.PCollection) -> beam.PCollection:
        return (shards
                # Without defaults: no side input (which the DaskRunner computes as a nested job);
                # every split has at least one shard, so the list is never empty.
                | "CollectShards" >> beam.combiners.ToList().without_defaults()
                | "WriteManifestFile" >> beam.Map(
                    finish_manifest, output_dir=self._output_dir, template=self._template,
                    expected_counts=self._expected_counts, num_shards=self._num_shards))


def finish_manifest(shards: Iterable[tuple[str, str, int]], *, output_dir: str,
                    template: schema.Manifest, expected_counts: Mapping[str, int],
                    num_shards: Mapping[str, int]) -> str:
    """Checks the written shards against what the job planned and writes the manifest.

    Raises RuntimeError (a pipeline bug, not bad input) on a missing or extra shard or a count
    that differs from the plan. Returns the manifest's path.
    """
    files: dict[str, list[str]] = collections.defaultdict(list)
    counts: dict[str, int] = collections.Counter()
    shard_counts: dict[str, int] = {}
    for split, name, count in shards:
        files[split].append(name)
        counts[split] += count
        shard_counts[name] = count
    if set(files) != set(num_shards):
        raise RuntimeError(f"{output_dir}: wrote shards for splits {sorted(files)}, "
                           f"planned {sorted(num_shards)}")
    splits = {}
    for split, n in num_shards.items():
        planned = [schema.shard_name(split, i, n) for i in range(n)]
        if sorted(files[split]) != planned:
            raise RuntimeError(f"{output_dir}: split {split!r} wrote shards {sorted(files[split])}, "
                               f"planned {planned}")
        if counts[split] != expected_counts[split]:
            raise RuntimeError(f"{output_dir}: split {split!r} wrote {counts[split]} records, "
                               f"expected {expected_counts[split]}")
        splits[split] = schema.SplitInfo(files=tuple(planned), count=counts[split],
                                         shard_counts=tuple(shard_counts[f] for f in planned))
    return schema.write_manifest(output_dir, dataclasses.replace(template, splits=splits))


# --------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """A finished dataset job: the manifest it wrote and its Beam counters (name -> value).

    `counters` is None when the runner reports no metrics (Beam's DaskRunner); the manifest's
    counts do not depend on it.
    """

    manifest: schema.Manifest
    counters: Mapping[str, int] | None


def run_build(pipeline: beam.Pipeline, *, output_dir: str, namespace: str) -> BuildResult:
    """Runs a dataset job to completion and reads back the manifest it wrote.

    Raises UserError if the runner cannot run this job (`check_runner_support`), RuntimeError
    if the runner reports anything but DONE; exceptions raised inside the pipeline propagate as
    the runner raises them. A runner without metrics gives `counters=None` and a log line.
    """
    check_runner_support(pipeline)
    result = pipeline.run()
    try:
        state = result.wait_until_finish()
    finally:
        _close_dask_client(result)
    if state != PipelineState.DONE:
        raise RuntimeError(f"{output_dir}: the Beam job ended in state {state}, no manifest written")
    counters = query_counters(result, namespace)
    manifest = schema.read_manifest(output_dir)
    counts = {k: v.count for k, v in manifest.splits.items()}
    if counters is None:
        logger.warning("%s: the runner %s reports no Beam metrics, so the job's counters (%s/...) are "
                       "absent; the manifest's counts %s come from the shards written, checked "
                       "against the plan", output_dir, pipeline.options.view_as(StandardOptions).runner,
                       namespace, counts)
    logger.info("%s: wrote dataset %r: %s; counters %s", output_dir, manifest.name, counts, counters)
    return BuildResult(manifest=manifest, counters=counters)


def _close_dask_client(result: PipelineResult) -> None:
    """Closes the Client Beam's DaskRunner opened (it never does): its futures are released, and
    no connection thread lingers in a process that goes on (tests, the Python API)."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


@dataclasses.dataclass(frozen=True)
class BuildCommand:
    """`bmvae data build NAME`, as a dataset job offers itself to the command line.

    Each `pipeline/build_<name>.py` lists its own in `COMMANDS`; trainers/cli.py registers
    them from one list of those modules and adds what every job takes: `--output`,
    `--num-shards`, `--overwrite` and the Beam arguments after `--`.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the job's own options
    run: Callable[[argparse.Namespace, list[str]], BuildResult]  # (parsed args, Beam args)
    description: str | None = None
    # What the printed "wrote DIR/manifest.json (...)" line adds, e.g. CUB's unusable images.
    note: Callable[[schema.Manifest], str] | None = None


def query_counters(result: PipelineResult, namespace: str) -> dict[str, int] | None:
    """The job's counters in `namespace`, summed over steps (committed where the runner has them).

    None if the runner cannot report metrics (Beam's DaskRunner raises NotImplementedError).
    """
    try:
        metrics = result.metrics()
    except NotImplementedError:
        return None
    totals: dict[str, int] = collections.Counter()
    for counter in metrics.query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] += int(value)
    return dict(sorted(totals.items()))


def check_runner_support(pipeline: beam.Pipeline) -> None:
    """Refuses, before anything runs, a job that the chosen runner would run wrongly.

    Only Beam's DaskRunner has limits the jobs can meet (apache_beam/runners/dask in Beam 2.77):
    - it computes only the graph behind the last transform applied, so a second output branch
      would silently never run (a job bug: RuntimeError);
    - a side input becomes `list(bag)` inside the consuming task: a nested Dask job started
      from a worker thread for every partition, recomputing its whole upstream (UserError);
    - `beam.io.Read` sources (and so Beam's file sinks, which use side inputs) are not
      translated (UserError);
    - a ParDo's tagged outputs all land in one bag, which every consumer of any tag reads
      (UserError).
    The jobs' own stages use none of these: records travel as data into WriteShards, which
    writes the files itself, and WriteManifest collects the shards without a side input.
    """
    runner = pipeline.options.view_as(StandardOptions).runner
    if not is_dask_runner(runner):
        return
    graph = _GraphVisitor()
    pipeline.visit(graph)
    if graph.unsupported:
        (label, why), more = graph.unsupported[0], len(graph.unsupported) - 1
        raise UserError(f"the DaskRunner cannot run stage {label!r}{f' (nor {more} more)' if more else ''}: "
                        f"{why}; build this dataset with the default in-process runner "
                        "(--direct_num_workers=N) or on Dataflow")
    dangling = [label for label in graph.leaves() if label != graph.last]
    if dangling:
        raise RuntimeError(f"the DaskRunner runs only the stages behind the last one ({graph.last!r}); "
                           f"these outputs would never be computed: {dangling}")


class _GraphVisitor(beam.pipeline.PipelineVisitor):
    """Primitive transforms of a pipeline: their outputs, what is consumed, what Dask lacks."""

    def __init__(self):
        self.produced: dict[Any, str] = {}
        self.consumed: set[Any] = set()
        self.unsupported: list[tuple[str, str]] = []
        self.last: str | None = None

    def visit_transform(self, node) -> None:
        self.last = node.full_label
        for pcoll in node.outputs.values():
            self.produced[pcoll] = node.full_label
        self.consumed.update(node.inputs)
        for side in node.side_inputs:
            self.consumed.add(side.pvalue)
            self.unsupported.append((node.full_label, "it reads a side input, which the DaskRunner "
                                     "computes as a separate Dask job inside a worker task"))
        if isinstance(node.transform, beam.ParDo) and len(node.outputs) > 1:
            self.unsupported.append((node.full_label, "it has tagged outputs, which the DaskRunner puts "
                                     "into one bag and gives whole to each consumer"))
        if isinstance(node.transform, beam.io.Read):
            self.unsupported.append((node.full_label, "the DaskRunner does not translate beam.io.Read"))

    def leaves(self) -> list[str]:
        return sorted({label for pcoll, label in self.produced.items() if pcoll not in self.consumed})


# ------------------------------------------------------------------ argument checks of the jobs


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, what: str | None = None) -> None:
    """UserError unless value is an integer >= minimum (bools are not integers here)."""
    if not is_int(value) or value < minimum:
        raise UserError(f"{name} must be {what or f'an integer of at least {minimum}'}, got {value!r}")


def check_fraction(name: str, value, *, closed: bool = False) -> None:
    """UserError unless value is a number in (0, 1), or in [0, 1] with closed=True."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)
    if not ok:
        raise UserError(f"{name} must be a number in {'[0, 1]' if closed else '(0, 1)'}, got {value!r}")


def check_job_arguments(output_dir: str, *, seed: int, num_shards: int | None,
                        beam_args: list[str] | None = None) -> None:
    """The arguments every dataset job takes: an output path, a seed, shards, Beam arguments."""
    if not isinstance(output_dir, str) or not output_dir:
        raise UserError(f"output directory must be a non-empty path, got {output_dir!r}")
    check_int("seed", seed, 0, "a non-negative integer")
    if num_shards is not None:
        check_int("num_shards", num_shards, 1)
    if beam_args is not None and not all(isinstance(a, str) for a in beam_args):
        raise UserError(f"Beam arguments must be strings, got {beam_args!r}")
