"""`bmvae`: the command line (SPEC section 1). A thin layer over the tested library modules.

User errors (bad input, I/O, a full disk, corrupt or incompatible files, bad config values) print
one line naming the culprit and exit with code 2, without a traceback; a diverged training exits
1; a bug prints its traceback, asks to be reported and exits 3 (`handle_error`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from bmvae_tf.errors import UserError
from bmvae_tf.pipeline.commands import DATASET_COMMANDS
from bmvae_tf.trainers.choices import MODEL_NAMES, STRATEGIES

# Nothing above imports TensorFlow, Beam or matplotlib: parsing (and `--help`) answers at once.
# Each command imports what it needs when it runs.


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already says it or there is
    none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or default == [] or not action.option_strings):
            return text
        return f"{text} (default: {default})"


def _parser(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
    # Also after the command (`bmvae train ... -v`); SUPPRESS keeps `bmvae -v train` working.
    _add_verbose(parser, default=argparse.SUPPRESS)
    return parser


def _add_data_commands(commands) -> None:
    data = _parser(commands, "data", help="build datasets with Apache Beam")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    build = _parser(
        data_commands, "build", help="build a paired multimodal dataset: TFRecord shards and manifest.json",
        description="Arguments after `--` go to Beam unchanged, e.g. "
                    "`-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://...` "
                    "or `-- --direct_num_workers=2 --direct_running_mode=multi_processing`.")
    datasets = build.add_subparsers(dest="dataset", required=True, metavar="NAME")
    for declared in DATASET_COMMANDS:
        command = _parser(datasets, declared.name, help=declared.help, description=declared.description)
        command.add_argument("--output", required=True, help="output directory (local, gs://, hdfs://)")
        declared.add_arguments(command)
        command.add_argument("--num-shards", type=int, default=None,
                             help="shards per split (default: by size)")
        command.add_argument("--overwrite", action="store_true",
                             help="replace a dataset already in --output")
        command.set_defaults(func=_cmd_build, declared=declared)


def _add_verbose(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show TensorFlow's, absl's and Beam's start-up messages and logs")


def _add_analyze_command(commands) -> None:
    analyze = _parser(
        commands, "analyze", help="mixture-weight analysis of a BMVAE run (paper Sect. 7) -> RUN/analysis/")
    analyze.add_argument("--workdir", required=True, help="run directory (made by `bmvae train`)")
    analyze.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    analyze.add_argument("--threshold", type=float, default=0.5,
                         help="normalised weight (w - 1/M) / (1 - 1/M) at or above which a dimension "
                              "is private to its top modality")
    analyze.add_argument("--r2-threshold", type=float, default=0.1,
                         help="R^2 at or above which a dimension carries a ground-truth factor")
    analyze.add_argument("--factor", action="append", default=None, metavar="KEY=MODALITY",
                         help="a metadata key that is a private factor of MODALITY (repeatable); "
                              "default: the ones the dataset's manifest declares (digits: street_*, text_pad)")
    analyze.add_argument("--swap-examples", type=int, default=6, help="rows of each swap grid")
    analyze.add_argument("--swap-samples", type=int, default=8, help="resampled columns of each swap grid")
    analyze.set_defaults(func=_each_seed(_cmd_analyze))


def _add_train_command(commands) -> None:
    train = _parser(commands, "train", help="train a model; rerunning the same --workdir resumes")
    train.add_argument("--data", required=True, help="dataset directory (holds manifest.json)")
    train.add_argument("--workdir", required=True,
                       help="run directory: config.yaml, checkpoints/, history.jsonl, logs/ (TensorBoard)")
    train.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    # Validated with the config, so an unknown name gets the same one-line error as --set.
    train.add_argument("--model", metavar="NAME",
                       help=f"sets model.name (default: bmvae_m): {', '.join(sorted(MODEL_NAMES))}")
    train.add_argument("--epochs", type=int, help="sets train.epochs (default: the config's)")
    train.add_argument("--strategy", choices=STRATEGIES, help="sets train.strategy (default auto: "
                       "MirroredStrategy over the local GPUs if there are several)")
    train.add_argument("--simulate-devices", type=int, metavar="N",
                       help="testing aid: split the CPU into N logical devices before TensorFlow "
                            "starts, so --strategy mirrored runs without GPUs")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.K=30 --set train.batch_size=64")
    _add_seeds_arguments(train)
    train.set_defaults(func=_cmd_train)


def _add_seeds_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--seeds", metavar="LIST",
                       help="one run per seed under WORKDIR/seed-N, each with train.seed=N, trained one "
                            "after another; rerunning continues the unfinished ones. e.g. 0,1,2 or 0-4")


def _add_evaluate_split_argument(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--split", choices=("test", "validation"), default="test",
                          help="the split scored: test (RUN/metrics.json, plots, report.html), or "
                               "validation (RUN/metrics-validation.json only) to compare settings "
                               "without touching test")


def _add_run_commands(commands) -> None:
    """evaluate, analyze, compare, export and demo."""
    evaluate = _parser(commands, "evaluate", help="write RUN/metrics.json and RUN/plots/")
    evaluate.add_argument("--workdir", required=True, help="run directory (made by `bmvae train`)")
    evaluate.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                          help="override an eval setting for this evaluation, e.g. "
                               "--set eval.log_likelihood_samples=1000")
    _add_evaluate_split_argument(evaluate)
    evaluate.set_defaults(func=_each_seed(_cmd_evaluate))
    _add_analyze_command(commands)

    compare = _parser(commands, "compare", help="Markdown and HTML report of several evaluated runs")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.json)")
    compare.add_argument("--output", required=True, help="directory for report.md, report.html, images/")
    compare.set_defaults(func=_cmd_compare)

    export = _parser(commands, "export", help="export a SavedModel with serving signatures")
    export.add_argument("--workdir", required=True, help="run directory (made by `bmvae train`)")
    export.add_argument("--output", required=True, help="directory the SavedModel is written to")
    export.set_defaults(func=_cmd_export)

    demo = _parser(commands, "demo", help="digits end to end: build, train bmvae_m, evaluate, export")
    demo.add_argument("--workdir", default="demo", help="directory of the demo's data, run and export")
    demo.add_argument("--epochs", type=int, help="override the demo config's train.epochs")
    demo.set_defaults(func=_cmd_demo)


def _add_tune_arguments(commands) -> None:
    from bmvae_tf.trainers.tuning import DEFAULT_STUDY, DEFAULT_TRIALS, OBJECTIVES, PRUNERS

    tune = _parser(
        commands, "tune", help="search config values on validation data (Optuna); rerunning continues",
        description="Each trial is a run directory TUNE_DIR/trials/NNNN; the results are "
                    "TUNE_DIR/best.yaml (the best trial's complete config) and TUNE_DIR/report.html. "
                    "Many hosts share one study with the same --storage postgresql://... and --study.")
    tune.add_argument("--data", required=True, help="dataset directory (holds manifest.json)")
    tune.add_argument("--workdir", required=True, metavar="TUNE_DIR",
                      help="the search's directory: trials/, study.db, best.yaml, report.html")
    tune.add_argument("--space", required=True, metavar="SPACE.yaml",
                      help="search space over dotted config keys (see configs/search/)")
    tune.add_argument("--config", help="YAML config every trial starts from (see configs/)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key of every trial, e.g. --set train.epochs=10")
    tune.add_argument("--epochs", type=int, help="sets train.epochs of every trial")
    tune.add_argument("--trials", type=int, metavar="N",
                      help=f"complete or pruned trials the study runs (default: the grid's size for "
                           f"an all-categorical space, else {DEFAULT_TRIALS})")
    tune.add_argument("--workers", type=int, default=1, metavar="W",
                      help="trial processes on this host sharing the study")
    tune.add_argument("--storage", metavar="URL",
                      help="Optuna RDB storage (default: sqlite:///TUNE_DIR/study.db); "
                           "postgresql://USER:PASSWORD@HOST/DB to share the study between hosts")
    tune.add_argument("--study", default=DEFAULT_STUDY, metavar="NAME", help="the study's name in the storage")
    tune.add_argument("--objective", default="val_loss", metavar="NAME",
                      help=f"validation value to optimise: {', '.join(OBJECTIVES)}, or val/METRIC, a "
                           f"loss term of the model in history.jsonl (e.g. val/reconstruction), "
                           f"which unlike val_loss leaves out the weighted penalties being searched")
    tune.add_argument("--direction", metavar="minimize|maximize",
                      help="default: minimize val_loss, maximize the others")
    tune.add_argument("--pruner", default="median", metavar="NAME",
                      help=f"Optuna pruner on the per-epoch val_loss: {', '.join(PRUNERS)}")
    tune.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)
    tune.set_defaults(func=_cmd_tune)


def _cmd_tune(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers.tuning import tune

    overrides = list(args.set) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    options = tune.TuneArgs(
        data=args.data, workdir=args.workdir, space=args.space, config=args.config, overrides=overrides,
        trials=args.trials, workers=args.workers, storage=args.storage, study=args.study,
        objective=args.objective, pruner=args.pruner, direction=args.direction,
        results=not args.worker_only)
    worker = ["tune", "--data", args.data, "--workdir", args.workdir, "--space", args.space,
              "--study", args.study, "--objective", args.objective, "--pruner", args.pruner,
              "--worker-only", *(f"--set={item}" for item in overrides)]
    worker += [f"--{name}={value}" for name, value in (("config", args.config), ("trials", args.trials),
                                                       ("storage", args.storage), ("direction", args.direction))
               if value is not None]
    return tune.tune(options, worker_argv=worker)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; builds without importing TensorFlow or Beam."""
    parser = argparse.ArgumentParser(
        prog="bmvae", description="Bayesian mixture VAEs for multimodal data (TensorFlow).",
        formatter_class=_HelpFormatter)
    _add_verbose(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(commands)
    _add_train_command(commands)
    _add_run_commands(commands)
    _add_tune_arguments(commands)
    return parser


def _written(output: str, manifest, extra: str = "") -> str:
    """The line a dataset build prints: where the manifest is and how many records each split has."""
    counts = ", ".join(f"{k}: {v.count}" for k, v in manifest.splits.items())
    return f"wrote {output}/manifest.json ({counts}{extra})"


def _job(declared):
    """The `beam_io.BuildCommand` of a declared dataset command (imports its job module)."""
    module = importlib.import_module(f"bmvae_tf.pipeline.{declared.module}")
    return next(job for job in module.COMMANDS if job.name == declared.name)


def _cmd_build(args, beam_args: list[str]) -> int:
    job = _job(args.declared)
    result = job.run(args, beam_args)
    print(_written(args.output, result.manifest, job.note(result.manifest) if job.note else ""))
    return 0


def _cmd_train(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import train

    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.strategy:
        overrides.append(f"train.strategy={args.strategy}")
    if args.seeds is not None:
        return _cmd_train_seeds(args, overrides)
    _refuse_seed_root(args.workdir, train=True)
    config = train.resolve_config(args.workdir, args.data, args.config, overrides)
    history = train.train(config, args.workdir, write_report=True)
    if history:
        last = history[-1]
        print(f"trained {args.workdir}: epoch {last['epoch']}, loss {last['loss']:.4f}")
    return 0


def _cmd_train_seeds(args, overrides: list[str]) -> int:
    from bmvae_tf.trainers.training import seeds

    histories = seeds.train_seeds(args.workdir, args.data, args.config, overrides,
                                  seeds.parse_seeds(args.seeds))
    for seed, history in histories.items():
        if history:
            print(f"trained {seeds.seed_dir(args.workdir, seed)}: epoch {history[-1]['epoch']}, "
                  f"loss {history[-1]['loss']:.4f}")
    return 0


def _refuse_seed_root(workdir: str, train: bool = False) -> None:
    """One run's command given the WORKDIR of `train --seeds`: an error saying what to pass."""
    from bmvae_tf.trainers.training import seeds

    seeds.refuse_seed_root(workdir, train=train)


def _each_seed(command):
    """`command` run once per seed-N run when --workdir is the WORKDIR of `train --seeds`."""
    def each(args, beam_args: list[str]) -> int:
        from bmvae_tf.trainers.training import seeds

        for run in seeds.expand(args.workdir):
            code = command(argparse.Namespace(**{**vars(args), "workdir": run}), beam_args)
            if code:
                return code
        return 0

    return each


def _cmd_evaluate(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import run_dir
    from bmvae_tf.trainers.evaluation import evaluate

    evaluate.evaluate(args.workdir, args.data, overrides=args.set, split=args.split)
    written = run_dir.RunPaths(args.workdir).metrics_for(args.split)
    print(f"wrote {written} and {args.workdir}/report.html" if args.split == "test" else f"wrote {written}")
    return 0


def _cmd_analyze(args, beam_args: list[str]) -> int:
    from bmvae_tf import schema
    from bmvae_tf.trainers import analysis, run_dir

    factors = None
    if args.factor is not None:
        config = run_dir.read_config(run_dir.RunPaths(args.workdir))
        manifest = schema.read_manifest(args.data or config.data.dir)
        factors = analysis.parse_factors(args.factor, manifest)
    result = analysis.analyze(args.workdir, args.data, threshold=args.threshold,
                              r2_threshold=args.r2_threshold, factors=factors,
                              swap_examples=args.swap_examples, swap_samples=args.swap_samples)
    for modality, dims in result["dimensions"]["private"].items():
        line = f"private to {modality}: {dims or 'none'}"
        match = (result.get("private_vs_factors") or {}).get(modality)
        if match:
            line += f"; precision {_fmt(match['precision'])}, recall {_fmt(match['recall'])} " \
                    f"against the dimensions carrying its factors {match['carrying']}"
        print(line)
    print(f"shared: {result['dimensions']['shared'] or 'none'}")
    print(f"wrote {args.workdir}/analysis/ and {args.workdir}/report.html")
    return 0


def _cmd_compare(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers.reporting import compare

    markdown, page = compare.compare(args.runs, args.output)
    print(f"wrote {markdown} and {page}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cmd_export(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import export

    _refuse_seed_root(args.workdir)
    path = export.export_saved_model(args.workdir, args.output)
    print(f"wrote SavedModel {path}")
    return 0


def _cmd_demo(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import demo

    demo.run_demo(args.workdir, epochs=args.epochs)
    return 0


# Lines that say nothing to a user of a CPU or GPU machine, hidden unless --verbose.
_NOISE = ("apitools not found", "Missing pipeline option (runner)",
          "The new default partition size is")  # Beam's DaskRunner, once per Create


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.getMessage().startswith(text) for text in _NOISE)


def _configure_logging(verbose: bool) -> None:
    """Before TensorFlow is imported: its C++ log level (TF_CPP_MIN_LOG_LEVEL: 3 hides even
    `failed call to cuInit`; a value the user set is kept), our INFO log lines on stderr, absl's,
    TensorFlow's and Beam's Python logs at WARNING. --verbose: everything at INFO."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(_NoiseFilter())
    # force: importing Beam (the dataset commands) logs a warning through the root logger, which
    # installs a WARNING-level handler; without force our INFO progress lines would be dropped.
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # TensorFlow logs through absl at INFO on every distributed dataset, Beam at every stage;
    # keep progress readable.
    for name in ("absl", "tensorflow", "apache_beam"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _import_tensorflow(verbose: bool):
    """`import tensorflow`, with the lines its C++ libraries print while loading (`All log
    messages before absl::InitializeLog()`, oneDNN, CUDA drivers: printed before any log level
    applies) kept off stderr unless `verbose`; shown if the import fails."""
    if verbose or "tensorflow" in sys.modules:
        import tensorflow

        return tensorflow
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow


def simulate_cpu_devices(n: int) -> None:
    """Splits the CPU into n logical devices; must run before TensorFlow initialises its runtime."""
    if n < 1:
        raise UserError(f"--simulate-devices: need N >= 1, got {n}")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:  # the runtime is already up
        raise UserError(f"--simulate-devices: too late, TensorFlow is already initialised ({e})") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, beam_args = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if beam_args and args.command != "data":
        parser.error("arguments after `--` are for Beam and only `bmvae data build` takes them")
    _configure_logging(args.verbose)
    _import_tensorflow(args.verbose)
    try:
        if getattr(args, "simulate_devices", None) is not None:
            simulate_cpu_devices(args.simulate_devices)
        return args.func(args, beam_args)
    except Exception as e:  # noqa: BLE001 -- the one place errors become exit codes
        return handle_error(e)


def handle_error(error: BaseException) -> int:
    """The exit code for an error that reached the top, after printing what the user needs.

    Expected errors (bad input, I/O, permissions, a full disk, corrupt files, incompatible
    checkpoints) print one line and give 2; divergence gives 1; anything else is a bug: its
    traceback is printed with a request to report it, and the code is 3.
    """
    line = expected_error_line(error)
    if line is not None:
        print(f"bmvae: error: {line}", file=sys.stderr)
        return 2
    nonfinite = sys.modules.get("bmvae_tf.trainers.training.nonfinite")  # loaded if training ran
    if nonfinite is not None and isinstance(error, nonfinite.TrainingDiverged):
        print(f"bmvae: training diverged: {error}", file=sys.stderr)
        return 1
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print("bmvae: internal error: this is a bug in bmvae; please report it with the traceback "
          "above and the command that gave it", file=sys.stderr)
    return 3


def expected_error_line(error: BaseException) -> str | None:
    """One line describing an expected error, or None for a bug (or divergence)."""
    from bmvae_tf.errors import os_error_line

    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError):
        return os_error_line(error)
    tf_errors = sys.modules.get("tensorflow.python.framework.errors_impl")
    if tf_errors is None or not isinstance(error, tf_errors.OpError):
        return None
    first = (error.message or str(error)).strip().splitlines()
    message = first[0] if first else type(error).__name__
    if "No space left on device" in message:
        return f"no space left on {_path_in(message) or 'the device'}"
    if isinstance(error, tf_errors.DataLossError):
        return f"corrupt data ({message})"
    if isinstance(error, (tf_errors.NotFoundError, tf_errors.PermissionDeniedError,
                          tf_errors.FailedPreconditionError, tf_errors.AlreadyExistsError,
                          tf_errors.ResourceExhaustedError)):
        return message
    return None


def _path_in(message: str) -> str | None:
    """The first absolute path or URL in a TensorFlow error message."""
    import re

    match = re.search(r"((?:[a-z][a-z0-9+]*://|/)[^\s;:,'\"]+)", message)
    return match.group(1) if match else None


if __name__ == "__main__":
    sys.exit(main())
