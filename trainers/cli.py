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
    _add_cub_command(datasets)


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

    train = commands.add_parser("train", help="train a model; rerunning the same --workdir resumes")
    train.add_argument("--data", required=True, help="dataset directory (holds manifest.json)")
    train.add_argument("--workdir", required=True, help="run directory")
    train.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    # Validated with the config, so an unknown name gets the same one-line error as --set.
    train.add_argument("--model", metavar="NAME", help=f"sets model.name: {', '.join(sorted(MODELS))}")
    train.add_argument("--epochs", type=int, help="sets train.epochs")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.K=30 --set train.batch_size=64")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="write RUN/metrics.json and RUN/plots/")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    evaluate.set_defaults(func=_cmd_evaluate)

    export = commands.add_parser("export", help="export a SavedModel with serving signatures")
    export.add_argument("--workdir", required=True)
    export.add_argument("--output", required=True)
    export.set_defaults(func=_cmd_export)

    demo = commands.add_parser("demo", help="digits end to end: build, train bmvae_m, evaluate, export")
    demo.add_argument("--workdir", default="demo")
    demo.add_argument("--epochs", type=int, help="override the demo config's train.epochs")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _cmd_build_digits(args, beam_args: list[str]) -> int:
    from pipeline.build_digits import build_digits

    manifest = build_digits(args.output, seed=args.seed, dm=args.dm, test_fraction=args.test_fraction,
                            num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    counts = ", ".join(f"{k}: {v.count}" for k, v in manifest.splits.items())
    print(f"wrote {args.output}/manifest.json ({counts})")
    return 0


def _cmd_build_cub(args, beam_args: list[str]) -> int:
    from pipeline.build_cub import run_cub_job

    result = run_cub_job(
        args.output, cub_dir=args.cub_dir, captions_dir=args.captions_dir,
        train_classes=args.train_classes, test_classes=args.test_classes,
        resnet_weights=args.resnet_weights, fasttext=args.fasttext, image_size=args.image_size,
        batch_size=args.batch_size, max_bad_fraction=args.max_bad_fraction, seed=args.seed,
        num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args)
    counts = ", ".join(f"{k}: {v.count}" for k, v in result.manifest.splits.items())
    bad = sum(result.manifest.source["num_bad_images"].values())
    print(f"wrote {args.output}/manifest.json ({counts}; {bad} unusable image(s))")
    return 0


def _cmd_train(args, beam_args: list[str]) -> int:
    from trainers import train

    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    config = train.resolve_config(args.workdir, args.data, args.config, overrides)
    history = train.train(config, args.workdir)
    if history:
        last = history[-1]
        print(f"trained {args.workdir}: epoch {last['epoch']}, loss {last['loss']:.4f}")
    return 0


def _cmd_evaluate(args, beam_args: list[str]) -> int:
    from trainers import evaluate, run_dir

    evaluate.evaluate(args.workdir, args.data)
    print(f"wrote {run_dir.RunPaths(args.workdir).metrics}")
    return 0


def _cmd_export(args, beam_args: list[str]) -> int:
    from trainers import export

    path = export.export_saved_model(args.workdir, args.output)
    print(f"wrote SavedModel {path}")
    return 0


def _cmd_demo(args, beam_args: list[str]) -> int:
    from trainers import demo

    demo.run_demo(args.workdir, epochs=args.epochs)
    return 0


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

    from trainers.train import TrainingDiverged

    try:
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
