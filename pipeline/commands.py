"""What `bmvae data build NAME` declares of each dataset job: its name, help and options.

Only argparse and constants: building the command line (and answering `--help`) must not import
Beam or TensorFlow. The job itself stays in `pipeline/build_<module>.py`, whose `COMMANDS` pair
these declarations with the code that runs them; the CLI imports that module only to run it.
Adding a dataset adds its declaration here and its job module.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Callable

from bmvae_tf import schema
from bmvae_tf.pipeline import arrays, mnist_svhn


@dataclasses.dataclass(frozen=True)
class DatasetCommand:
    """One `bmvae data build NAME`. module: `bmvae_tf.pipeline.<module>` holds its job."""

    name: str
    module: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the job's own options
    description: str | None = None

    def fields(self) -> dict:
        """The keyword arguments of `beam_io.BuildCommand` this declaration gives."""
        return {"name": self.name, "help": self.help, "add_arguments": self.add_arguments,
                "description": self.description}


def _validation_argument(parser: argparse.ArgumentParser, of: str) -> None:
    parser.add_argument("--validation-fraction", type=float, default=schema.DEFAULT_VALIDATION_FRACTION,
                        metavar="F", help=f"fraction of {of} held out for the validation split "
                                          "(carved out of train, never out of test)")


def _digits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="draws the pairings and the rendering")
    parser.add_argument("--dm", type=int, default=10, help="random pairings per source image (Shi et al.)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of the source images whose pairs are test examples")
    _validation_argument(parser, "the train source images")


def _mnist_svhn_arguments(parser: argparse.ArgumentParser, dm: int) -> None:
    parser.add_argument("--source", choices=("raw", "tfds"), default="raw",
                        help="raw: the published files in --source-dir; tfds: TFDS mnist and svhn_cropped")
    parser.add_argument("--source-dir", help="directory of train-images-idx3-ubyte.gz, ..., "
                                             "train_32x32.mat, test_32x32.mat")
    parser.add_argument("--tfds-data-dir", help="TFDS data directory (default: TFDS's own)")
    parser.add_argument("--download", action="store_true",
                        help="with --source tfds: download and prepare the datasets first")
    parser.add_argument("--seed", type=int, default=0, help="draws the pairings and the text")
    parser.add_argument("--dm", type=int, default=dm, help="random pairings per class")
    parser.add_argument("--max-d", type=int, default=mnist_svhn.DEFAULT_MAX_D,
                        help="at most this many images per class")
    _validation_argument(parser, "each class's MNIST and SVHN train images")


def _arrays_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the .npz file (local, gs://, hdfs://)")
    parser.add_argument("--name", help="dataset name (default: the file name)")
    parser.add_argument("--sequence", action="append", default=[], metavar="NAME",
                        help="treat the integer [N, L] array NAME as token sequences (repeatable)")
    parser.add_argument("--no-standardize", action="store_true",
                        help="keep vector modalities as they are (default: standardise with train stats)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of test rows, without a `split` array")
    _validation_argument(parser, "the train rows, unless `split` has 'validation' rows,")
    parser.add_argument("--seed", type=int, default=0, help="draws the test and validation rows")
    parser.add_argument("--max-vocab", type=int, default=arrays.MAX_VOCAB, metavar="N",
                        help="largest vocabulary of a --sequence array (largest token id + 1) accepted")
    parser.add_argument("--nan-as-missing", action="store_true",
                        help="a row of a modality that is entirely NaN is missing (as a False in "
                             "a boolean `present_NAME` array would say); a row partly NaN is an error")


def _cub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cub-dir", required=True, help="CUB_200_2011 directory (images.txt, images/)")
    parser.add_argument("--captions-dir", required=True, help="text_c10 directory (<class>/<image>.txt)")
    parser.add_argument("--train-classes", help="class folder names, one per line "
                                                "(default: the published 150-class split)")
    parser.add_argument("--test-classes", help="class folder names, one per line "
                                               "(default: the published 50-class split)")
    parser.add_argument("--resnet-weights", default="imagenet", metavar="PATH",
                        help="Keras weights file of ResNet101(include_top=False), or 'imagenet' "
                             "(downloaded by Keras)")
    parser.add_argument("--fasttext", metavar="PATH",
                        help="pretrained word vectors (.bin FastText or word2vec text) instead of "
                             "training FastText on the train captions")
    parser.add_argument("--image-size", type=int, default=224, help="shorter image side fed to ResNet")
    parser.add_argument("--batch-size", type=int, default=32, help="images per ResNet call")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail if more than this fraction of the images is unusable")
    _validation_argument(parser, "the train (trainval) classes")
    parser.add_argument("--seed", type=int, default=0, help="FastText's seed and the validation classes")


def _mnist_svhn(name: str, what: str) -> DatasetCommand:
    dm = mnist_svhn.DEFAULT_DM[name]
    return DatasetCommand(name, "build_mnist_svhn", what, functools.partial(_mnist_svhn_arguments, dm=dm))


DIGITS = DatasetCommand("digits", "build_digits",
                        "the embedded Digits data (scikit-learn load_digits): digit, street, text",
                        _digits_arguments)
MNIST_SVHN = _mnist_svhn("mnist-svhn", "MNIST and SVHN pairs of the same digit (Shi et al.)")
MNIST_SVHN_TEXT = _mnist_svhn("mnist-svhn-text", "MNIST-SVHN plus the digit's name as text (Sutter et al.)")
ARRAYS = DatasetCommand(
    "arrays", "build_arrays", "your own paired data: one array per modality in a .npz file",
    _arrays_arguments,
    description="Every array of the .npz is a modality (first axis = examples; 1-D per example: "
                "vector, 2-D or 3-D: image), except `label` (int), `split` ('train'/'validation'/'test') "
                "and `present_NAME` (bool [N]: whether modality NAME is observed in each row).")
CUB = DatasetCommand(
    "cub", "build_cub", "CUB-200-2011 photos (ResNet-101 features) paired with Reed et al.'s captions",
    _cub_arguments,
    description="Reads CUB_200_2011 (images.txt, images/) and the text_c10 captions; writes "
                "image features, captions, DIR/sentence_vectors.npz and DIR/image_report.json.")

# In the order `bmvae data build --help` lists them.
DATASET_COMMANDS = (DIGITS, MNIST_SVHN, MNIST_SVHN_TEXT, ARRAYS, CUB)
