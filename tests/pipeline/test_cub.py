"""Tests of pipeline.cub (pure CUB logic) and pipeline.build_cub (the Beam job).

The job runs end to end on the tiny CUB-style tree of tests/cub_tree.py (4 classes of the
published split, 12 images incl. grayscale, CMYK, RGBA PNG and a corrupt file), with ResNet-101
weights the test saves from ResNet101(weights=None) and a 32-pixel shorter side.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from bmvae_tf import schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import build_cub, cub, sentence_vectors
from tests import cub_tree
from bmvae_tf.trainers import input_pipeline

# ------------------------------------------------------------------------------------ listing


def test_plan_images_splits_by_class_in_images_txt_order():
    images = [(1, "A/a1.jpg"), (2, "B/b1.jpg"), (3, "A/a2.jpg"), (4, "C/c1.jpg")]
    plan = cub.plan_images(images, {"train": ["A", "C"], "test": ["B"]},
                           {"train": "tr.txt", "test": "te.txt"})
    assert [(e.index, e.image_id, e.class_name) for e in plan["train"]] == \
        [(0, 1, "A"), (1, 3, "A"), (2, 4, "C")]
    assert [(e.index, e.image_id, e.class_index) for e in plan["test"]] == [(0, 2, 1)]


def test_validation_classes_are_a_seeded_share_of_the_train_classes_with_images():
    train = [f"{i:03d}.C" for i in range(1, 31)]
    images = [(i, f"{c}/a.jpg") for i, c in enumerate(train[:20])]  # 10 listed classes lack images
    held = cub.validation_classes(train, images, 0.1, seed=0)
    assert len(held) == 2 and set(held) <= set(train[:20]) and held == sorted(held)
    assert held == cub.validation_classes(train, images, 0.1, seed=0)
    assert held != cub.validation_classes(train, images, 0.1, seed=1)
    assert len(cub.validation_classes(train[:2], images, 0.1, seed=0)) == 1  # one class stays in train
    with pytest.raises(UserError, match="1 train class"):
        cub.validation_classes(train[:1], images, 0.1, seed=0)
    test = [(100, "031.T/t.jpg")]
    plan = cub.plan_images(images + test, {"train": [c for c in train if c not in held], "validation": held,
                                           "test": ["031.T"]},
                           {"train": "tr.txt", "validation": "tr.txt", "test": "te.txt"})
    assert {e.class_name for e in plan["validation"]} == set(held)
    assert [e.index for e in plan["validation"]] == [0, 1] and len(plan["train"]) == 18
    assert [e.image_id for e in plan["test"]] == [100]


@pytest.mark.parametrize("classes, culprit", [
    ({"train": ["A", "B"], "test": ["B"]}, "'B' is in both tr.txt and te.txt"),
    ({"train": ["A"], "test": ["X"]}, "'B' of images.txt is in neither"),
    ({"train": ["A", "B"], "test": ["X"]}, "the test split has no images"),
])
def test_plan_images_rejects_bad_splits(classes, culprit):
    with pytest.raises(UserError, match=culprit):
        cub.plan_images([(1, "A/a.jpg"), (2, "B/b.jpg")], classes, {"train": "tr.txt", "test": "te.txt"})


def test_list_parsers_name_the_culprit():
    with pytest.raises(UserError, match=r"images.txt:2: expected"):
        cub.parse_images_list("1 A/a.jpg\nnot-a-line\n", "images.txt")
    with pytest.raises(UserError, match="id 1 repeats"):
        cub.parse_images_list("1 A/a.jpg\n1 A/b.jpg\n", "images.txt")
    with pytest.raises(UserError, match=r"classes.txt: class 'A' is listed more than once"):
        cub.parse_class_list("A\nB\nA\n", "classes.txt")


def test_default_split_is_the_published_150_50_class_split():
    train = cub.parse_class_list(open(cub.DEFAULT_CLASS_FILES["train"]).read(), "train")
    test = cub.parse_class_list(open(cub.DEFAULT_CLASS_FILES["test"]).read(), "test")
    assert (len(train), len(test)) == (150, 50)
    assert not set(train) & set(test)
    assert sorted(int(name[:3]) for name in train + test) == list(range(1, 201))
    assert "004.Groove_billed_Ani" in test and "001.Black_footed_Albatross" in train


# ------------------------------------------------------------------------------------ captions


def test_tokenize_splits_sentences_and_punctuation_without_lower_casing():
    tokens = cub.tokenize("This bird has a white belly, and grey wings. The beak isn't long.")
    assert tokens == ["This", "bird", "has", "a", "white", "belly", ",", "and", "grey", "wings", ".",
                      "The", "beak", "is", "n't", "long", "."]


def test_parse_captions_needs_exactly_ten():
    assert cub.parse_captions("\n".join(f"c {i}" for i in range(10)) + "\n\n", "f.txt")[9] == "c 9"
    with pytest.raises(UserError, match=r"f.txt: 9 captions, expected 10"):
        cub.parse_captions("\n".join(f"c {i}" for i in range(9)), "f.txt")


def test_vocabulary_keeps_words_seen_more_than_three_times_after_the_special_tokens():
    counts = {"bird": 9, "wing": 4, "rare": 3, "beak": 4, "once": 1}
    assert cub.build_vocabulary(counts) == ("<exc>", "<pad>", "<eos>", "bird", "beak", "wing")


def test_encode_caption_truncates_to_31_tokens_then_eos_and_pads_to_32():
    word_ids = {"a": 3, "b": 4}
    short = cub.encode_caption(["a", "zzz", "b"], word_ids)
    assert short.dtype == np.int64 and short.shape == (32,)
    assert short.tolist() == [3, cub.EXC, 4, cub.EOS] + [cub.PAD] * 28
    long = cub.encode_caption(["a"] * 40, word_ids)
    assert long.tolist() == [3] * 31 + [cub.EOS]
    exact = cub.encode_caption(["b"] * 31, word_ids)
    assert exact.tolist() == [4] * 31 + [cub.EOS]
    assert cub.decode_caption(short, ("<exc>", "<pad>", "<eos>", "a", "b")) == ["a", "<exc>", "b"]


# ------------------------------------------------------------------------------------ images


def test_resized_shape_follows_torchvision_resize():
    assert cub.resized_shape(500, 375) == (224, 298)  # (height, width); int(224 * 500 / 375)
    assert cub.resized_shape(375, 500) == (298, 224)
    assert cub.resized_shape(300, 300) == (224, 224)


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_decode_image_converts_grayscale_cmyk_and_16_bit_to_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    gray, mode = cub.decode_image(_encode(Image.fromarray(rgb[..., 0], "L")), "g.jpg", size=30)
    assert mode == "L" and gray.shape == (30, 40, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    # A smooth picture survives JPEG: the CMYK file decodes to about the same RGB pixels.
    columns, rows = np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 30))
    smooth = np.stack([columns, rows, np.full((30, 40), 128.0)], axis=-1).astype(np.uint8)
    cmyk, mode = cub.decode_image(_encode(Image.fromarray(smooth).convert("CMYK")), "c.jpg", size=30)
    assert mode == "CMYK" and cmyk.shape == (30, 40, 3)
    assert np.mean(np.abs(cmyk.astype(float) - smooth.astype(float))) < 6
    deep = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257), "I;16")
    converted, mode = cub.decode_image(_encode(deep, "PNG"), "d.png", size=30)
    assert mode in ("I;16", "I") and converted.shape == (30, 40, 3)
    assert np.array_equal(converted[..., 0], rgb[..., 0])


def test_decode_image_resizes_the_shorter_side_and_rejects_unreadable_files():
    image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    pixels, mode = cub.decode_image(_encode(image, "PNG"), "x.png", size=60)
    assert mode == "RGB" and pixels.shape == (60, 80, 3)
    with pytest.raises(cub.BadImage, match="broken.jpg: cannot decode"):
        cub.decode_image(b"\xff\xd8\xff\xe0 not an image", "broken.jpg")
    truncated = _encode(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)))[:200]
    with pytest.raises(cub.BadImage, match="cut.jpg"):
        cub.decode_image(truncated, "cut.jpg")


def test_resnet_inputs_are_keras_caffe_preprocessing():
    pixels = np.array([[[[10, 20, 30]]]], np.uint8)
    expected = np.array([[[[30 - 103.939, 20 - 116.779, 10 - 123.68]]]], np.float32)
    np.testing.assert_allclose(cub.resnet_inputs(pixels), expected, rtol=1e-6)


def test_bad_fraction_threshold():
    cub.check_bad_fraction(1, 10, 0.1, "report.json")
    with pytest.raises(UserError, match=r"2 of 10 images are unusable \(20.0%\).*report.json"):
        cub.check_bad_fraction(2, 10, 0.1, "report.json")


# ------------------------------------------------------------------------------------ the job
# These share the session fixture `cub_built` (tests/conftest.py): one build of the tiny tree,
# ~20-40 s on 2 cores, mostly building ResNet-101 and tracing it once. Hence `slow`.


def _records(manifest: schema.Manifest, split: str) -> dict[str, np.ndarray]:
    batches = list(input_pipeline.make_dataset(manifest, split, batch_size=1000))
    assert len(batches) == 1
    return {key: value.numpy() for key, value in batches[0].items()}


def _train_word_counts(tree) -> collections.Counter:
    counts = collections.Counter()
    for path in tree.image_paths["train"]:
        for caption in tree.captions[path]:
            counts.update(caption.split())  # the tree's captions are plain words
    return counts


@pytest.mark.slow
def test_build_writes_ten_pairs_per_usable_image_in_class_disjoint_splits(cub_built):
    tree, _, result = cub_built
    manifest = result.manifest
    assert manifest.name == "cub" and manifest.label is None
    assert manifest.modality("image").shape == (2048,) and manifest.modality("image").kind == "vector"
    assert manifest.modality("caption").shape == (32,)
    assert manifest.modality("caption").likelihood == "categorical"
    # 6 trainval images (one class of 3 held out for validation); 6 test images, one corrupt.
    assert {k: v.count for k, v in manifest.splits.items()} == {"train": 30, "validation": 30, "test": 50}
    assert manifest.source["num_bad_images"] == {"train": 0, "validation": 0, "test": 1}
    held = manifest.source["validation_classes"]
    assert len(held) == 1 and held[0] in cub_tree.TRAIN_CLASSES
    assert held == cub.validation_classes(cub_tree.TRAIN_CLASSES, [(0, f"{c}/x.jpg") for c in cub_tree.CLASSES],
                                          schema.DEFAULT_VALIDATION_FRACTION, 0)
    assert manifest.extras["cca"] == {"image": "image", "caption": "caption",
                                      "sentence_vectors": "sentence_vectors.npz", "components": 40}
    ids_by_path = {line.split()[1]: int(line.split()[0])
                   for line in open(os.path.join(tree.cub_dir, "images.txt")).read().splitlines()}
    seen = {}
    for split in schema.SPLITS:
        records = _records(manifest, split)
        assert records["image"].shape == (manifest.splits[split].count, 2048)
        assert np.all(np.isfinite(records["image"]))
        image_ids = records["image_id"][:, 0].astype(int)
        for image_id, n in collections.Counter(image_ids).items():
            assert n == 10
            rows = records["image"][image_ids == image_id]
            assert np.array_equal(rows, np.repeat(rows[:1], 10, axis=0))
            captions = sorted(records["caption_index"][image_ids == image_id, 0].astype(int))
            assert captions == list(range(10))
        seen[split] = set(image_ids)
        paths = _split_paths(tree, manifest, split)
        expected = {ids_by_path[p] for p in paths if p not in tree.bad_paths}
        assert seen[split] == expected
        classes = {p.split("/")[0] for p in paths}
        assert classes == {"train": set(cub_tree.TRAIN_CLASSES) - set(held), "validation": set(held),
                           "test": set(cub_tree.TEST_CLASSES)}[split]
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not seen[a] & seen[b]


def _split_paths(tree, manifest, split: str) -> list[str]:
    """The tree's image paths in `split`: validation holds the manifest's validation classes."""
    if split == "test":
        return list(tree.image_paths["test"])
    held = set(manifest.source["validation_classes"])
    return [p for p in tree.image_paths["train"] if (p.split("/")[0] in held) == (split == "validation")]


@pytest.mark.slow
def test_vocabulary_comes_from_the_train_captions_only(cub_built):
    tree, _, result = cub_built
    vocab = result.manifest.modality("caption").vocab
    assert vocab == cub.build_vocabulary(_train_word_counts(tree))
    assert "edgeword" in vocab and "rareword" not in vocab  # seen 4 and 3 times in train
    assert "testonly" not in vocab  # frequent, but only in test captions


@pytest.mark.slow
def test_captions_are_encoded_truncated_and_padded(cub_built):
    tree, _, result = cub_built
    manifest = result.manifest
    vocab = manifest.modality("caption").vocab
    word_ids = {w: i for i, w in enumerate(vocab)}
    ids_by_path = {line.split()[1]: int(line.split()[0])
                   for line in open(os.path.join(tree.cub_dir, "images.txt")).read().splitlines()}
    checked_long = 0
    for split in schema.SPLITS:
        records = _records(manifest, split)
        for row in range(len(records["caption"])):
            image_id = int(records["image_id"][row, 0])
            c = int(records["caption_index"][row, 0])
            path = next(p for p, i in ids_by_path.items() if i == image_id)
            words = tree.captions[path][c].split()
            expected = [word_ids.get(w, cub.EXC) for w in words[:31]] + [cub.EOS]
            expected += [cub.PAD] * (32 - len(expected))
            assert records["caption"][row].tolist() == expected
            checked_long += len(words) > 31
        if split == "test":
            assert np.all(records["caption"][:, :32] != word_ids.get("testonly", -1))
    assert checked_long == 1


@pytest.mark.slow
def test_image_report_lists_the_corrupt_image_and_the_conversions(cub_built):
    tree, _, result = cub_built
    report = json.load(open(os.path.join(result.manifest.directory, "image_report.json")))
    assert report["num_images"] == 12 and report["num_bad"] == 1
    assert [b["path"] for b in report["bad"]] == list(tree.bad_paths)
    assert "cannot decode" in report["bad"][0]["reason"]
    assert {c["path"]: c["mode"] for c in report["converted"]} == tree.converted
    assert result.counters["images_bad"] == 1
    assert result.counters["images_converted_from_CMYK"] == 1
    assert result.counters["images_converted_from_L"] == 1


@pytest.mark.slow
def test_features_are_resnet101_with_the_given_weights_on_keras_preprocessed_images(cub_built):
    import keras

    tree, weights, result = cub_built
    path = tree.image_paths["train"][2]  # the grayscale JPEG
    in_validation = path.split("/")[0] in result.manifest.source["validation_classes"]
    records = _records(result.manifest, "validation" if in_validation else "train")
    assert tree.converted[path] == "L"
    image_id = int(open(os.path.join(tree.cub_dir, "images.txt")).read().split(path)[0].split()[-1])
    stored = records["image"][records["image_id"][:, 0] == image_id][0]
    model = keras.applications.ResNet101(include_top=False, weights=weights, pooling="avg",
                                         input_shape=(None, None, 3))
    with open(os.path.join(tree.cub_dir, "images", path), "rb") as f:
        pixels, _ = cub.decode_image(f.read(), path, size=32)
    expected = model(cub.resnet_inputs(pixels[None]), training=False).numpy()[0]
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    # Random weights of a fresh model would give other features: the file's weights were used.
    fresh = keras.applications.ResNet101(include_top=False, weights=None, pooling="avg",
                                         input_shape=(None, None, 3))
    assert not np.allclose(fresh(cub.resnet_inputs(pixels[None])).numpy()[0], stored, atol=1e-3)


@pytest.mark.slow
def test_sentence_vectors_follow_fasttext_and_sif_by_hand(cub_built):
    tree, _, result = cub_built
    manifest = result.manifest
    vocab = manifest.modality("caption").vocab
    embedding = sentence_vectors.read(os.path.join(manifest.directory, "sentence_vectors.npz"), vocab)
    assert embedding.vectors.shape == (len(vocab), 300) and embedding.source == "fasttext-trained"
    # FastText trained again on the same captions, in the same order, with the same seed.
    texts = [c.split() for p in tree.image_paths["train"] for c in tree.captions[p]]
    model = build_cub.train_fasttext(texts, seed=0, bucket=1000)
    assert model.wv.vector_size == 300 and model.window == 3 and model.epochs == 10
    np.testing.assert_array_equal(embedding.vectors[:3], np.stack([np.full(300, v) for v in (-1, 0, 1)]))
    for i, word in enumerate(vocab[3:], 3):
        np.testing.assert_allclose(embedding.vectors[i], model.wv[word], rtol=1e-6)
    # SIF weights by hand: a / (a + count / total); <exc> takes the excluded words' mass.
    counts = _train_word_counts(tree)
    total = sum(counts.values())
    excluded = sum(n for w, n in counts.items() if w not in vocab)
    assert embedding.weights[0] == pytest.approx(1e-3 / (1e-3 + excluded / total))
    assert embedding.weights[1] == embedding.weights[2] == 0.0
    assert embedding.weights[vocab.index("bird")] == pytest.approx(1e-3 / (1e-3 + counts["bird"] / total))
    # One caption's sentence vector by hand, with the stored principal component.
    caption = tree.captions[tree.image_paths["train"][0]][1]  # has the excluded word 'rareword'
    ids = cub.encode_caption(caption.split(), {w: i for i, w in enumerate(vocab)})
    kept = list(ids[:list(ids).index(cub.EOS) + 1])
    v = sum(embedding.weights[t] * embedding.vectors[t].astype(np.float64) for t in kept) / len(kept)
    u = embedding.principal_component
    np.testing.assert_allclose(embedding.embed(ids[None])[0], v - np.dot(v, u) * u, rtol=1e-9, atol=1e-12)
    # u is the first principal component of the train sentence vectors (centred).
    train_ids = np.stack([cub.encode_caption(t, {w: i for i, w in enumerate(vocab)}) for t in texts])
    raw = sentence_vectors.weighted_average(train_ids, embedding.vectors, embedding.weights)
    centred = raw - raw.mean(0)
    assert np.linalg.norm(u) == pytest.approx(1.0)
    assert np.linalg.norm(centred @ u) == pytest.approx(np.linalg.svd(centred, compute_uv=False)[0])


@pytest.mark.slow
def test_job_fails_above_the_bad_image_fraction_and_writes_no_manifest(cub_built, tmp_path):
    tree, weights, _ = cub_built
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"1 of 12 images are unusable.*--max-bad-fraction 0.05"):
        build_cub.run_cub_job(out, cub_dir=tree.cub_dir, captions_dir=tree.captions_dir,
                              train_classes=tree.train_classes, test_classes=tree.test_classes,
                              resnet_weights=weights, image_size=32, batch_size=4,
                              max_bad_fraction=0.05, fasttext_bucket=1000)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert json.load(open(os.path.join(out, "image_report.json")))["num_bad"] == 1


@pytest.mark.parametrize("kwargs, culprit", [
    ({"cub_dir": "/nonexistent/cub"}, "--cub-dir /nonexistent/cub: not a directory"),
    ({"resnet_weights": "/nonexistent/w.h5"}, "--resnet-weights /nonexistent/w.h5: no such file"),
    ({"max_bad_fraction": 1.5}, "--max-bad-fraction"),
    ({"train_classes": "/nonexistent/classes.txt"}, "/nonexistent/classes.txt: no train class list"),
])
def test_build_rejects_bad_arguments_before_touching_the_output(tmp_path, kwargs, culprit):
    tree = cub_tree.write_tree(str(tmp_path / "raw"))
    arguments = dict(cub_dir=tree.cub_dir, captions_dir=tree.captions_dir, resnet_weights=None)
    arguments.update(kwargs)
    with pytest.raises(UserError, match=culprit):
        build_cub.run_cub_job(str(tmp_path / "out"), **arguments)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_missing_caption_file_fails_the_job_naming_it(cub_built, tmp_path):
    import shutil

    tree, weights, _ = cub_built
    captions = str(tmp_path / "text_c10")
    shutil.copytree(tree.captions_dir, captions)
    victim = os.path.join(captions, os.path.splitext(tree.image_paths["test"][1])[0] + ".txt")
    os.remove(victim)
    with pytest.raises(UserError, match=f"{victim}: no caption file"):
        build_cub.run_cub_job(str(tmp_path / "out"), cub_dir=tree.cub_dir, captions_dir=captions,
                              resnet_weights=weights, image_size=32, fasttext_bucket=1000)


# ------------------------------------------------------------------------------------ word vectors


def test_fasttext_uses_the_recipe_and_repeats_for_a_seed():
    texts = [["this", "bird", "has", "red", "wings"]] * 20 + [["a", "small", "bird"]] * 10
    first = build_cub.train_fasttext(texts, seed=3, bucket=100)
    again = build_cub.train_fasttext(texts, seed=3, bucket=100)
    other = build_cub.train_fasttext(texts, seed=4, bucket=100)
    assert (first.wv.vector_size, first.window, first.min_count, first.epochs) == (300, 3, 3, 10)
    np.testing.assert_array_equal(first.wv["bird"], again.wv["bird"])
    assert not np.allclose(first.wv["bird"], other.wv["bird"])


def test_pretrained_word2vec_vectors_replace_fasttext(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("3 2\nbird 1 2\nred 0 4\nhas 5 5\n")
    vocab = ("<exc>", "<pad>", "<eos>", "bird", "red", "small")  # 'small' has no pretrained vector
    entry = cub.ImageEntry("train", 0, 1, "A/a.jpg", 0)
    captions = [["bird", "red", "odd"], ["red", "small"], ["bird", "bird", "small", "red"]]
    counts = cub.count_words(captions)
    name = build_cub.fit_sentence_vectors([(entry.key, (entry, captions))], vocab=vocab, counts=counts,
                                          output_dir=str(tmp_path), fasttext=str(path), seed=0)
    embedding = sentence_vectors.read(str(tmp_path / name), vocab)
    np.testing.assert_array_equal(embedding.vectors, [[-1, -1], [0, 0], [1, 1], [1, 2], [0, 4], [0, 0]])
    assert embedding.source == str(path)
    with pytest.raises(UserError, match="cannot read word vectors"):
        (tmp_path / "broken.txt").write_text("not a header\n1 2 3\n")
        build_cub.load_pretrained_vectors(str(tmp_path / "broken.txt"))


# ------------------------------------------------------------------------------------ CLI


def test_cli_builds_cub_with_its_options_and_reports_bad_input_in_one_line(tmp_path, capsys):
    from bmvae_tf.trainers import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "build", "cub", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--cub-dir", "--captions-dir", "--train-classes", "--test-classes", "--resnet-weights",
                   "--fasttext", "--max-bad-fraction", "--image-size", "--batch-size"):
        assert option in help_text
    code = cli.main(["data", "build", "cub", "--output", str(tmp_path / "out"), "--cub-dir",
                     str(tmp_path / "missing"), "--captions-dir", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"bmvae: error: --cub-dir {tmp_path / 'missing'}: not a directory"]
