"""CUB images and captions: pure functions, no Beam (the job is `pipeline/build_cub.py`).

Inputs, as published:
- CUB_200_2011 (Wah et al.): `images.txt` ("<image id> <class folder>/<file>.jpg" per line) and the
  `images/` tree it indexes.
- The captions of Reed et al. (2016), `text_c10/`: one text file per image,
  `<class folder>/<file>.txt`, ten captions, one per line.

The split is by class, as in Shi et al.: train and test classes never share an image. The
default is the published zero-shot split of Reed et al., 150 train (`trainvalclasses.txt`) and 50
test (`testclasses.txt`) classes, which Shi et al.'s `text_trainvalclasses.txt` /
`text_testclasses.txt` follow; the lists ship in `pipeline/cub_splits/`. The validation split
takes a seeded share of the train (trainval) classes (`validation_classes`), never a test class.
The vocabulary and the word vectors still come from the trainval captions (train and
validation), as before, so the test records do not change with the validation share.

Recipes (SPEC section 6):
- Captions: NLTK's sentence splitting then its word tokenizer, no lower-casing. NLTK's
  `word_tokenize` needs the downloaded Punkt model; without network access we use NLTK's
  Punkt algorithm with default (untrained) parameters for the sentence split, followed by the
  same `NLTKWordTokenizer` that `word_tokenize` applies to each sentence. The untrained splitter
  knows no English abbreviations, so it may split after one the trained model keeps.
- Vocabulary from the trainval captions only (train and validation, never test): words seen more than 3 times; `<exc>` = 0 (rare and
  unknown words), `<pad>` = 1, `<eos>` = 2; then words by descending count, ties by the word
  (Shi et al. order by first occurrence, which a parallel count cannot reproduce).
- Each caption: the first 31 tokens, `<eos>`, then `<pad>` up to 32.
- Images: decoded with PIL; grayscale, palette, CMYK and alpha images are converted to RGB;
  the shorter side is resized to 224 (bilinear, the longer side int(224 * long / short), as
  torchvision's `Resize(224)` in Shi et al.), without cropping. The pixels then go through
  `keras.applications.resnet.preprocess_input` (Keras' recipe for its ImageNet ResNets: RGB to
  BGR and minus the ImageNet channel means, no scaling), where Shi et al. fed torchvision's
  ResNet-101 unnormalised [0, 1] pixels.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from bmvae_tf.errors import UserError
from bmvae_tf.random_streams import CubStream

SPLITS = ("train", "validation", "test")
CAPTIONS_PER_IMAGE = 10
CAPTION_LENGTH = 32  # 31 tokens + <eos>, padded
MIN_WORD_COUNT = 3  # a word enters the vocabulary when seen more than this many times
SPECIAL_TOKENS = ("<exc>", "<pad>", "<eos>")
EXC, PAD, EOS = 0, 1, 2
IMAGE_SIZE = 224  # the shorter side fed to ResNet-101
FEATURE_DIM = 2048  # ResNet-101's global average pool

SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cub_splits")
DEFAULT_CLASS_FILES = {"train": os.path.join(SPLITS_DIR, "trainvalclasses.txt"),
                       "test": os.path.join(SPLITS_DIR, "testclasses.txt")}

# Images PIL decodes but ResNet cannot take as they are; converted to RGB and counted.
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "RGBA", "RGBa",
                     "RGBX", "LAB", "HSV")


class BadImage(Exception):
    """An image that cannot be used; the message says why. Counted and reported, not fatal."""


@dataclasses.dataclass(frozen=True, order=True)
class ImageEntry:
    """One CUB image to process.

    index: position within its split (images.txt order); its pairs are 10 * index + c.
    image_id: the id in images.txt. class_index: position of its class in the sorted class list.
    """

    split: str
    index: int
    image_id: int
    path: str  # relative to images/, e.g. "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    class_index: int

    @property
    def class_name(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> tuple[str, int]:
        return self.split, self.index


# --------------------------------------------------------------------------------------------
# Listing and splitting


def parse_images_list(text: str, source: str) -> list[tuple[int, str]]:
    """images.txt -> [(image_id, relative path)] in file order; SchemaError-style UserError names
    the line that does not read "<id> <class>/<file>"."""
    entries, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or "/" not in parts[1]:
            raise UserError(f"{source}:{number}: expected '<image id> <class folder>/<file>', "
                            f"got {line.strip()!r}")
        image_id, path = int(parts[0]), parts[1]
        if image_id in seen:
            raise UserError(f"{source}:{number}: image id {image_id} repeats")
        seen.add(image_id)
        entries.append((image_id, path))
    if not entries:
        raise UserError(f"{source}: lists no images")
    return entries


def parse_class_list(text: str, source: str) -> list[str]:
    """One class folder name per line (blank lines ignored); UserError on a repeated name."""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    repeated = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if repeated:
        raise UserError(f"{source}: class {repeated[0]!r} is listed more than once")
    if not names:
        raise UserError(f"{source}: lists no classes")
    return names


def validation_classes(train_classes: Sequence[str], images: Sequence[tuple[int, str]],
                       fraction: float, seed: int) -> list[str]:
    """The train (trainval) classes held out for the validation split: round(fraction * n) of the
    n train classes that have images, at least one, drawn from stream (seed, CubStream.VALIDATION).
    Sorted; UserError when fewer than 2 train classes have images."""
    present = {path.split("/", 1)[0] for _, path in images}
    candidates = sorted(c for c in train_classes if c in present)
    if len(candidates) < 2:
        raise UserError(f"{len(candidates)} train class(es) with images; a validation split needs at "
                        "least 2 (one stays in train)")
    k = min(max(1, int(round(fraction * len(candidates)))), len(candidates) - 1)
    order = np.random.default_rng([seed, CubStream.VALIDATION]).permutation(len(candidates))
    return sorted(candidates[i] for i in order[:k])


def plan_images(images: Sequence[tuple[int, str]], split_classes: Mapping[str, Sequence[str]],
                sources: Mapping[str, str]) -> dict[str, list[ImageEntry]]:
    """Assigns every listed image to the split of its class.

    Args:
      images: [(image_id, relative path)] from images.txt.
      split_classes: {"train": [class folder], "validation": [...], "test": [...]}, disjoint
        ("validation" may be left out).
      sources: {split: file name} to name in errors.

    Raises:
      UserError: a class in two splits, a class of images.txt in none, or an empty split.
        Listed classes without images are allowed (a partial copy of CUB), see
        `classes_without_images`.
    """
    splits = [split for split in SPLITS if split in split_classes]
    owner: dict[str, str] = {}
    for split in splits:
        for name in split_classes[split]:
            if name in owner:
                raise UserError(f"class {name!r} is in both {sources[owner[name]]} and {sources[split]}")
            owner[name] = split
    classes = sorted({path.split("/", 1)[0] for _, path in images})
    missing = [c for c in classes if c not in owner]
    if missing:
        raise UserError(f"class {missing[0]!r} of images.txt is in neither {sources['train']} nor "
                        f"{sources['test']} ({len(missing)} such classes)")
    class_index = {name: i for i, name in enumerate(classes)}
    plan: dict[str, list[ImageEntry]] = {split: [] for split in splits}
    for image_id, path in images:
        name = path.split("/", 1)[0]
        split = owner[name]
        plan[split].append(ImageEntry(split, len(plan[split]), image_id, path, class_index[name]))
    for split in splits:
        if not plan[split]:
            raise UserError(f"the {split} split has no images")
    return plan


def classes_without_images(images: Sequence[tuple[int, str]],
                           split_classes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """{split: sorted listed classes that images.txt has no image of}."""
    present = {path.split("/", 1)[0] for _, path in images}
    return {split: sorted(set(names) - present) for split, names in split_classes.items()}


def caption_file(captions_dir: str, image_path: str) -> str:
    """The caption file of an image: <captions_dir>/<class>/<file stem>.txt (Reed et al.)."""
    return os.path.join(captions_dir, os.path.splitext(image_path)[0] + ".txt")


# --------------------------------------------------------------------------------------------
# Captions


def parse_captions(text: str, source: str,
                   captions_per_image: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """A caption file -> its captions, one per non-blank line; UserError unless there are
    exactly `captions_per_image`."""
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if len(captions) != captions_per_image:
        raise UserError(f"{source}: {len(captions)} captions, expected {captions_per_image} "
                        "(one per line)")
    return captions


_sentence_splitter = None
_word_tokenizer = None


def tokenize(caption: str) -> list[str]:
    """NLTK's `word_tokenize` recipe with an untrained Punkt sentence splitter (module doc)."""
    global _sentence_splitter, _word_tokenizer
    if _word_tokenizer is None:
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        _sentence_splitter, _word_tokenizer = PunktSentenceTokenizer(), NLTKWordTokenizer()
    return [token for sentence in _sentence_splitter.tokenize(caption)
            for token in _word_tokenizer.tokenize(sentence)]


def count_words(captions: Iterable[Sequence[str]]) -> collections.Counter:
    """Token counts over tokenised captions (untruncated, as Shi et al. count them)."""
    counts: collections.Counter = collections.Counter()
    for tokens in captions:
        counts.update(tokens)
    return counts


def build_vocabulary(counts: Mapping[str, int], min_count: int = MIN_WORD_COUNT) -> tuple[str, ...]:
    """SPECIAL_TOKENS, then the words seen more than `min_count` times by descending count, ties
    by the word, so the same counts always give the same ids."""
    words = sorted((w for w, n in counts.items() if n > min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return (*SPECIAL_TOKENS, *words)


def encode_caption(tokens: Sequence[str], word_ids: Mapping[str, int],
                   length: int = CAPTION_LENGTH) -> np.ndarray:
    """Tokens -> [length] int64 ids: the first length-1 tokens (<exc> for words outside the
    vocabulary), <eos>, then <pad>."""
    ids = [word_ids.get(token, EXC) for token in tokens[:length - 1]] + [EOS]
    return np.array(ids + [PAD] * (length - len(ids)), np.int64)


def decode_caption(ids: Sequence[int], vocab: Sequence[str]) -> list[str]:
    """Token ids -> words up to and excluding the first <eos>."""
    words = []
    for i in ids:
        if int(i) == EOS:
            break
        words.append(vocab[int(i)])
    return words


# --------------------------------------------------------------------------------------------
# Images


def resized_shape(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size`: torchvision's Resize(size)
    on a PIL image (the longer side int(size * long / short))."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def decode_image(data: bytes, source: str, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """Image file bytes -> (uint8 [H, W, 3] with the shorter side `size`, original PIL mode).

    Non-RGB modes in CONVERTIBLE_MODES are converted to RGB (16-bit and float grayscale are
    first scaled to 8 bits). Raises BadImage when PIL cannot decode the file completely.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now, so a truncated file fails here rather than later
            mode = image.mode
            if mode != "RGB":
                if mode not in CONVERTIBLE_MODES:
                    raise BadImage(f"{source}: unsupported image mode {mode!r}")
                if mode in ("I", "I;16", "F"):
                    array = np.asarray(image, np.float64)
                    top = array.max() if array.max() > 0 else 1.0
                    image = Image.fromarray(np.uint8(np.round(array / top * 255.0)), "L")
                image = image.convert("RGB")
            height, width = resized_shape(image.width, image.height, size)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, np.uint8), mode
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{source}: cannot decode ({type(e).__name__}: {e})") from None


def resnet_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] -> float32 ResNet inputs: keras' `resnet.preprocess_input`
    ('caffe' mode: BGR order, ImageNet channel means subtracted, no scaling)."""
    from keras.applications import resnet

    return np.asarray(resnet.preprocess_input(np.asarray(images, np.float32)), np.float32)


def check_bad_fraction(num_bad: int, num_images: int, max_fraction: float, report: str) -> None:
    """UserError when more than `max_fraction` of the images are bad."""
    if num_images and num_bad / num_images > max_fraction:
        raise UserError(f"{num_bad} of {num_images} images are unusable ({num_bad / num_images:.1%}), "
                        f"more than --max-bad-fraction {max_fraction:g}; see {report}")
