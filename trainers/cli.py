"""`bmvae`: the command line (SPEC section 1). A thin layer over the tested library modules.

User errors print one line naming the culprit and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

from bmvae_tf.errors import UserError  # noqa: E402  (after the environment is set)


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="build datasets with Apache Beam")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    build = data_commands.add_parser(
        "build", help="build a paired multimodal dataset: TFRecord shards and manifest.json",
        description="Arguments after `--` go to Beam unchanged, e.g. "
                    "`-- --runner=DataflowRunner --project=P --region=R --temp_location=gs://...` "
                    "or `-- --direct_num_workers=2 --direct_running_mode=multi_processing`.")
    datasets = build.add_subparsers(dest="dataset", required=True, metavar="NAME")
    digits = datasets.add_parser(
        "digits", help="the embedded Digits data (scikit-learn load_digits): digit, street, text")
    digits.add_argument("--output", required=True, help="output directory (local, gs://, hdfs://)")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--dm", type=int, default=10, help="random pairings per source image (Shi et al.)")
    digits.add_argument("--test-fraction", type=float, default=0.2)
    digits.add_argument("--num-shards", type=int, default=None, help="shards per split (default: by size)")
    digits.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    digits.set_defaults(func=_cmd_build_digits)
    _add_mnist_svhn_commands(datasets)
    _add_arrays_command(datasets)
    _add_cub_command(datasets)


def _add_mnist_svhn_commands(datasets) -> None:
    for name, dm, what in (
            ("mnist-svhn", 30, "MNIST and SVHN pairs of the same digit (Shi et al.)"),
            ("mnist-svhn-text", 20, "MNIST-SVHN plus the digit's name as text (Sutter et al.)")):
        command = datasets.add_parser(name, help=what)
        command.add_argument("--output", required=True, help="output directory (local, gs://, hdfs://)")
        command.add_argument("--source", choices=("raw", "tfds"), default="raw",
                             help="raw: the published files in --source-dir; tfds: TFDS mnist and svhn_cropped")
        command.add_argument("--source-dir", help="directory of train-images-idx3-ubyte.gz, ..., "
                                                  "train_32x32.mat, test_32x32.mat")
        command.add_argument("--tfds-data-dir", help="TFDS data directory (default: TFDS's own)")
        command.add_argument("--download", action="store_true",
                             help="with --source tfds: download and prepare the datasets first")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--dm", type=int, default=dm, help=f"random pairings per class (default {dm})")
        command.add_argument("--max-d", type=int, default=10000, help="at most this many images per class")
        command.add_argument("--num-shards", type=int, default=None, help="shards per split (default: by size)")
        command.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
        command.set_defaults(func=_cmd_build_mnist_svhn, with_text=name == "mnist-svhn-text")


def _add_arrays_command(datasets) -> None:
    command = datasets.add_parser(
        "arrays", help="your own paired data: one array per modality in a .npz file",
        description="Every array of the .npz is a modality (first axis = examples; 1-D per example: "
                    "vector, 2-D or 3-D: image), except `label` (int) and `split` ('train'/'test').")
    command.add_argument("--input", required=True, help="the .npz file (local, gs://, hdfs://)")
    command.add_argument("--output", required=True, help="output directory (local, gs://, hdfs://)")
    command.add_argument("--name", help="dataset name (default: the file name)")
    command.add_argument("--sequence", action="append", default=[], metavar="NAME",
                         help="treat the integer [N, L] array NAME as token sequences (repeatable)")
    command.add_argument("--no-standardize", action="store_true",
                         help="keep vector modalities as they are (default: standardise with train stats)")
    command.add_argument("--test-fraction", type=float, default=0.2, help="without a `split` array")
    command.add_argument("--seed", type=int, default=0, help="draws the test rows without a `split` array")
    command.add_argument("--num-shards", type=int, default=None, help="shards per split (default: by size)")
    command.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    command.set_defaults(func=_cmd_build_arrays)


def _add_cub_command(datasets) -> None:
    cub = datasets.add_parser(
        "cub", help="CUB-200-2011 photos (ResNet-101 features) paired with Reed et al.'s captions",
        description="Reads CUB_200_2011 (images.txt, images/) and the text_c10 captions; writes "
                    "image features, captions, DIR/sentence_vectors.npz and DIR/image_report.json.")
    cub.add_argument("--output", required=True, help="output directory (local, gs://, hdfs://)")
    cub.add_argument("--cub-dir", required=True, help="CUB_200_2011 directory (images.txt, images/)")
    cub.add_argument("--captions-dir", required=True, help="text_c10 directory (<class>/<image>.txt)")
    cub.add_argument("--train-classes", help="class folder names, one per line "
                                             "(default: the published 150-class split)")
    cub.add_argument("--test-classes", help="class folder names, one per line "
                                            "(default: the published 50-class split)")
    cub.add_argument("--resnet-weights", default="imagenet", metavar="PATH",
                     help="Keras weights file of ResNet101(include_top=False), or 'imagenet' "
                          "(downloaded by Keras; the default)")
    cub.add_argument("--fasttext", metavar="PATH",
                     help="pretrained word vectors (.bin FastText or word2vec text) instead of "
                          "training FastText on the train captions")
    cub.add_argument("--image-size", type=int, default=224, help="shorter image side fed to ResNet")
    cub.add_argument("--batch-size", type=int, default=32, help="images per ResNet call")
    cub.add_argument("--max-bad-fraction", type=float, default=0.01,
                     help="fail if more than this fraction of the images is unusable")
    cub.add_argument("--seed", type=int, default=0, help="FastText's seed")
    cub.add_argument("--num-shards", type=int, default=None, help="shards per split (default: by size)")
    cub.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    cub.set_defaults(func=_cmd_build_cub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmvae", description="Bayesian mixture VAEs for multimodal data (TensorFlow).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(commands)

    from bmvae_tf.models import MODELS
    from bmvae_tf.trainers.config import STRATEGIES

    train = commands.add_parser("train", help="train a model; rerunning the same --workdir resumes")
    train.add_argument("--data", required=True, help="dataset directory (holds manifest.json)")
    train.add_argument("--workdir", required=True, help="run directory")
    train.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    # Validated with the config, so an unknown name gets the same one-line error as --set.
    train.add_argument("--model", metavar="NAME", help=f"sets model.name: {', '.join(sorted(MODELS))}")
    train.add_argument("--epochs", type=int, help="sets train.epochs")
    train.add_argument("--strategy", choices=STRATEGIES, help="sets train.strategy (default auto: "
                       "MirroredStrategy over the local GPUs if there are several)")
    train.add_argument("--simulate-devices", type=int, metavar="N",
                       help="testing aid: split the CPU into N logical devices before TensorFlow "
                            "starts, so --strategy mirrored runs without GPUs")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.K=30 --set train.batch_size=64")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="write RUN/metrics.json and RUN/plots/")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                          help="override an eval setting for this evaluation, e.g. "
                               "--set eval.log_likelihood_samples=1000")
    evaluate.set_defaults(func=_cmd_evaluate)

    analyze = commands.add_parser(
        "analyze", help="mixture-weight analysis of a BMVAE run (paper Sect. 7) -> RUN/analysis/")
    analyze.add_argument("--workdir", required=True)
    analyze.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    analyze.add_argument("--threshold", type=float, default=0.5,
                         help="normalised weight (w - 1/M) / (1 - 1/M) at or above which a dimension "
                              "is private to its top modality (default 0.5)")
    analyze.add_argument("--r2-threshold", type=float, default=0.1,
                         help="R^2 at or above which a dimension carries a ground-truth factor (default 0.1)")
    analyze.add_argument("--factor", action="append", default=None, metavar="KEY=MODALITY",
                         help="a metadata key that is a private factor of MODALITY (repeatable); "
                              "default: the dataset's known ones (digits: street_*, text_pad)")
    analyze.add_argument("--swap-examples", type=int, default=6, help="rows of each swap grid")
    analyze.add_argument("--swap-samples", type=int, default=8, help="resampled columns of each swap grid")
    analyze.set_defaults(func=_cmd_analyze)

    compare = commands.add_parser("compare", help="Markdown and HTML report of several evaluated runs")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.json)")
    compare.add_argument("--output", required=True, help="directory for report.md, report.html, images/")
    compare.set_defaults(func=_cmd_compare)

    export = commands.add_parser("export", help="export a SavedModel with serving signatures")
    export.add_argument("--workdir", required=True)
    export.add_argument("--output", required=True)
    export.set_defaults(func=_cmd_export)

    demo = commands.add_parser("demo", help="digits end to end: build, train bmvae_m, evaluate, export")
    demo.add_argument("--workdir", default="demo")
    demo.add_argument("--epochs", type=int, help="override the demo config's train.epochs")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _written(output: str, manifest, extra: str = "") -> str:
    """The line a dataset build prints: where the manifest is and how many records each split has."""
    counts = ", ".join(f"{k}: {v.count}" for k, v in manifest.splits.items())
    return f"wrote {output}/manifest.json ({counts}{extra})"


def _cmd_build_digits(args, beam_args: list[str]) -> int:
    from bmvae_tf.pipeline.build_digits import build_digits

    manifest = build_digits(args.output, seed=args.seed, dm=args.dm, test_fraction=args.test_fraction,
                            num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    print(_written(args.output, manifest))
    return 0


def _cmd_build_mnist_svhn(args, beam_args: list[str]) -> int:
    from bmvae_tf.pipeline.build_mnist_svhn import build_mnist_svhn

    manifest = build_mnist_svhn(
        args.output, with_text=args.with_text, source=args.source, source_dir=args.source_dir,
        tfds_data_dir=args.tfds_data_dir, download=args.download, seed=args.seed, dm=args.dm,
        max_d=args.max_d, num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    print(_written(args.output, manifest))
    return 0


def _cmd_build_arrays(args, beam_args: list[str]) -> int:
    from bmvae_tf.pipeline.build_arrays import build_arrays

    manifest = build_arrays(
        args.output, input_path=args.input, name=args.name, sequences=tuple(args.sequence),
        standardize=not args.no_standardize, test_fraction=args.test_fraction, seed=args.seed,
        num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    print(_written(args.output, manifest))
    return 0


def _cmd_build_cub(args, beam_args: list[str]) -> int:
    from bmvae_tf.pipeline.build_cub import run_cub_job

    result = run_cub_job(
        args.output, cub_dir=args.cub_dir, captions_dir=args.captions_dir,
        train_classes=args.train_classes, test_classes=args.test_classes,
        resnet_weights=args.resnet_weights, fasttext=args.fasttext, image_size=args.image_size,
        batch_size=args.batch_size, max_bad_fraction=args.max_bad_fraction, seed=args.seed,
        num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    bad = sum(result.manifest.source["num_bad_images"].values())
    print(_written(args.output, result.manifest, f"; {bad} unusable image(s)"))
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
    config = train.resolve_config(args.workdir, args.data, args.config, overrides)
    history = train.train(config, args.workdir, write_report=True)
    if history:
        last = history[-1]
        print(f"trained {args.workdir}: epoch {last['epoch']}, loss {last['loss']:.4f}")
    return 0


def _cmd_evaluate(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import run_dir
    from bmvae_tf.trainers.evaluation import evaluate

    evaluate.evaluate(args.workdir, args.data, overrides=args.set)
    print(f"wrote {run_dir.RunPaths(args.workdir).metrics} and {args.workdir}/report.html")
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
    from bmvae_tf.trainers.reporting import compare as report

    markdown, page = report.compare(args.runs, args.output)
    print(f"wrote {markdown} and {page}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _cmd_export(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import export

    path = export.export_saved_model(args.workdir, args.output)
    print(f"wrote SavedModel {path}")
    return 0


def _cmd_demo(args, beam_args: list[str]) -> int:
    from bmvae_tf.trainers import demo

    demo.run_demo(args.workdir, epochs=args.epochs)
    return 0


def simulate_cpu_devices(n: int) -> None:
    """Splits the CPU into n logical devices; must run before TensorFlow initialises its runtime."""
    import tensorflow as tf

    if n < 1:
        raise UserError(f"--simulate-devices: need N >= 1, got {n}")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # TensorFlow logs through absl at INFO on every distributed dataset; keep progress readable.
    logging.getLogger("absl").setLevel(logging.WARNING)

    import tensorflow as tf

    from bmvae_tf.trainers.train import TrainingDiverged

    try:
        if getattr(args, "simulate_devices", None):
            simulate_cpu_devices(args.simulate_devices)
        return args.func(args, beam_args)
    except UserError as e:
        print(f"bmvae: error: {e}", file=sys.stderr)
        return 2
    except tf.errors.DataLossError as e:
        print(f"bmvae: error: corrupt data ({e.message.splitlines()[0]})", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"bmvae: training diverged: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
