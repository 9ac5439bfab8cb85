"""A tiny CUB_200_2011 + text_c10 tree in the real layout, written by the tests themselves.

4 classes of the published split (2 train, 2 test), 3 images each: small RGB JPEGs of varied
shapes, one grayscale JPEG, one CMYK JPEG, one RGBA PNG and one corrupt file. Captions are
plain lower-case words (no punctuation), so `str.split` counts words exactly as the tokenizer
does: the tests can check the vocabulary without trusting it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

TRAIN_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross")
TEST_CLASSES = ("004.Groove_billed_Ani", "023.Brandt_Cormorant")
CLASSES = TRAIN_CLASSES + TEST_CLASSES
# (width, height, kind) of the three images of each class, in class order.
IMAGES = (
    [(40, 30, "rgb"), (30, 44, "rgb"), (36, 36, "gray")],
    [(40, 30, "rgb"), (48, 32, "rgba_png"), (40, 30, "rgb")],
    [(32, 40, "rgb"), (40, 30, "cmyk"), (40, 30, "rgb")],
    [(40, 30, "corrupt"), (44, 33, "rgb"), (30, 44, "rgb")],
)
COMMON = ("this", "bird", "has", "a", "small", "beak", "and", "red", "wings")
LONG_CAPTION_WORDS = 40


@dataclasses.dataclass(frozen=True)
class Tree:
    cub_dir: str
    captions_dir: str
    train_classes: str  # class list files
    test_classes: str
    image_paths: dict[str, list[str]]  # split -> relative paths, images.txt order
    bad_paths: tuple[str, ...]
    converted: dict[str, str]  # relative path -> original mode
    captions: dict[str, list[str]]  # relative path -> 10 captions


def _captions(class_number: int, image_number: int, split: str) -> list[str]:
    captions = []
    for c in range(10):
        words = list(COMMON[: 4 + (c + image_number) % 6])
        if split == "test":
            words.append("testonly")
        captions.append(" ".join(words))
    if split == "train":
        # 'rareword' 3 times in train (kept out: needs more than 3), 'edgeword' 4 times (kept).
        if (class_number, image_number) == (0, 0):
            captions[1] += " rareword edgeword"
            captions[2] += " rareword edgeword"
        if (class_number, image_number) == (1, 2):
            captions[3] += " rareword edgeword edgeword"
            captions[4] = " ".join(f"word{i % 7}" for i in range(LONG_CAPTION_WORDS))
    return captions


def write_tree(root: str) -> Tree:
    cub_dir = os.path.join(root, "CUB_200_2011")
    captions_dir = os.path.join(root, "text_c10")
    rng = np.random.default_rng(0)
    lines, paths = [], {"train": [], "test": []}
    bad, converted, all_captions = [], {}, {}
    image_id = 0
    for k, class_name in enumerate(CLASSES):
        split = "train" if class_name in TRAIN_CLASSES else "test"
        os.makedirs(os.path.join(cub_dir, "images", class_name))
        os.makedirs(os.path.join(captions_dir, class_name))
        for i, (width, height, kind) in enumerate(IMAGES[k]):
            image_id += 1
            ext = "png" if kind == "rgba_png" else "jpg"
            relative = f"{class_name}/{class_name.split('.')[1]}_{i:04d}_{image_id}.{ext}"
            target = os.path.join(cub_dir, "images", relative)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            if kind == "rgb":
                Image.fromarray(pixels, "RGB").save(target, quality=90)
            elif kind == "gray":
                Image.fromarray(pixels[..., 0], "L").save(target, quality=90)
                converted[relative] = "L"
            elif kind == "cmyk":
                Image.fromarray(pixels, "RGB").convert("CMYK").save(target, quality=90)
                converted[relative] = "CMYK"
            elif kind == "rgba_png":
                alpha = np.full((height, width, 1), 200, np.uint8)
                Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA").save(target)
                converted[relative] = "RGBA"
            else:
                with open(target, "wb") as f:
                    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
                bad.append(relative)
            lines.append(f"{image_id} {relative}")
            paths[split].append(relative)
            captions = _captions(k, i, split)
            all_captions[relative] = captions
            with open(os.path.join(captions_dir, os.path.splitext(relative)[0] + ".txt"), "w") as f:
                f.write("\n".join(captions) + "\n")
    with open(os.path.join(cub_dir, "images.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    train_classes = os.path.join(root, "train_classes.txt")
    test_classes = os.path.join(root, "test_classes.txt")
    with open(train_classes, "w") as f:
        f.write("\n".join(TRAIN_CLASSES) + "\n")
    with open(test_classes, "w") as f:
        f.write("\n".join(TEST_CLASSES) + "\n")
    return Tree(cub_dir, captions_dir, train_classes, test_classes, paths, tuple(bad), converted,
                all_captions)


def save_resnet_weights(path: str) -> str:
    """Saves ResNet101(include_top=False, weights=None)'s random weights, as a user would save
    weights they have, and returns the path."""
    import keras

    model = keras.applications.ResNet101(include_top=False, weights=None, pooling="avg",
                                         input_shape=(None, None, 3))
    model.save_weights(path)
    return path
