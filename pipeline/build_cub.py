"""The Beam job behind `bmvae data build cub`: CUB ResNet-101 image features paired with captions.

The driver reads only `images.txt` and the two class lists, holds out a seeded share of the train
(trainval) classes as the validation split, and plans which split each image belongs to
(`pipeline.cub`). The workers do the rest:

    ListImages -+-> ReadCaptions -+-> TrainCaptions -+-> CountWords -> BuildVocabulary (vocab)
                |                 |                  +-> CollectTrainCaptions -> FitSentenceVectors
                |                 |                      (one worker: FastText + SIF, writes
                |                 |                       DIR/sentence_vectors.npz)
                |                 +-------------------------------------------------+
                +-> DecodeImages -> GroupBySize -> BatchBySize -> LoadBatch         |
                      |                -> ResNet101 (RunInference) -> SplitBatch -> JoinByImage
                      +-> (bad, converted) -> ReportBadImages                      (CoGroupByKey)
                          (DIR/image_report.json; fails above --max-bad-fraction)   |
    MakePairs (10 per image) <------------------------------------------------------+
      -> WriteShards -> WriteManifest (last: needs the vocabulary, the report and the sentence
                                       vectors as side inputs)

Images are batched by their resized shape (grouped by (height, width), then cut into batches),
since the shorter side is resized to 224 without cropping and the longer side varies; each
batch goes through ResNet-101 in one call. (Beam's GroupIntoBatches would cut the batches too,
but its processing-time timer sends the DirectRunner back to its slower legacy executor.)
Pair index = 10 * image index + caption number, within a split. The captions of an unusable
image still count towards the vocabulary and FastText (they are fine text); its pairs are left
out and listed in the report.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import ModelType, TFModelHandlerNumpy

from bmvae_tf import atomic, schema
from bmvae_tf.errors import UserError
from bmvae_tf.pipeline import beam_io, commands, cub, sentence_vectors

logger = logging.getLogger(__name__)

DATASET_NAME = "cub"
NAMESPACE = "cub"
REPORT_FILENAME = "image_report.json"
FASTTEXT_PARAMS = {"vector_size": 300, "window": 3, "min_count": 3, "epochs": 10}
FASTTEXT_BUCKETS = 2_000_000  # gensim's default
CCA_COMPONENTS = 40
IMAGE, CAPTION = "image", "caption"
METADATA_SHAPES = {"image_id": (1,), "caption_index": (1,), "class_index": (1,)}
_BAD = "bad"
_CONVERTED = "converted"


def build_cub(output_dir: str, *, cub_dir: str, captions_dir: str,
              train_classes: str | None = None, test_classes: str | None = None,
              resnet_weights: str | None = "imagenet", fasttext: str | None = None,
              image_size: int = cub.IMAGE_SIZE, batch_size: int = 32,
              max_bad_fraction: float = 0.01, seed: int = 0, num_shards: int | None = None,
              overwrite: bool = False, beam_args: list[str] | None = None,
              fasttext_bucket: int = FASTTEXT_BUCKETS,
              validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION) -> schema.Manifest:
    """Builds the CUB dataset into `output_dir` and returns its manifest.

    Args:
      output_dir: local path or URL; must hold no dataset unless `overwrite`.
      cub_dir: CUB_200_2011 (holds images.txt and images/).
      captions_dir: Reed et al.'s text_c10 (<class>/<image>.txt, ten captions each).
      train_classes, test_classes: files of class folder names, one per line; by default the
        published split (pipeline/cub_splits).
      resnet_weights: a Keras weights file of `ResNet101(include_top=False)`, "imagenet" (Keras
        downloads them), or None for random weights (tests only: the features mean nothing).
      fasttext: pretrained word vectors (.bin: Facebook's format with subwords; else word2vec
        text); None trains gensim FastText on the train captions.
      image_size: the shorter side fed to ResNet-101 (224; smaller only to make tests fast).
      batch_size: images per ResNet call (all of one resized shape).
      max_bad_fraction: the job fails if more than this fraction of the images is unusable.
      seed: FastText's seed; also draws the validation classes.
      num_shards: shards per split; by default about one per 4096 pairs.
      overwrite: replace a dataset already in `output_dir`.
      beam_args: passed unchanged to PipelineOptions (DirectRunner by default).
      fasttext_bucket: FastText's number of subword hash buckets (gensim's default; its
        [buckets, 300] table takes 2.4 GB, so tests pass a small number).
      validation_fraction: the share of the train classes (with images) held out as the
        validation split's classes.

    Raises:
      UserError: bad arguments or input files (named); raised inside the job for an unreadable
        caption file or too many bad images.
    """
    return run_cub_job(output_dir, cub_dir=cub_dir, captions_dir=captions_dir, train_classes=train_classes,
                       test_classes=test_classes, resnet_weights=resnet_weights, fasttext=fasttext,
                       image_size=image_size, batch_size=batch_size, max_bad_fraction=max_bad_fraction,
                       seed=seed, num_shards=num_shards, overwrite=overwrite, beam_args=beam_args,
                       fasttext_bucket=fasttext_bucket, validation_fraction=validation_fraction).manifest


def run_cub_job(output_dir: str, *, cub_dir: str, captions_dir: str,
                train_classes: str | None = None, test_classes: str | None = None,
                resnet_weights: str | None = "imagenet", fasttext: str | None = None,
                image_size: int = cub.IMAGE_SIZE, batch_size: int = 32,
                max_bad_fraction: float = 0.01, seed: int = 0, num_shards: int | None = None,
                overwrite: bool = False, beam_args: list[str] | None = None,
                fasttext_bucket: int = FASTTEXT_BUCKETS,
                validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION) -> beam_io.BuildResult:
    """`build_cub`, also returning the job's counters (`cub/train_records`, `cub/images_bad`, ...)."""
    _check_arguments(output_dir, cub_dir=cub_dir, captions_dir=captions_dir, image_size=image_size,
                     batch_size=batch_size, max_bad_fraction=max_bad_fraction, seed=seed,
                     num_shards=num_shards, resnet_weights=resnet_weights, fasttext=fasttext,
                     fasttext_bucket=fasttext_bucket)
    beam_io.check_fraction("--validation-fraction", validation_fraction)
    plan, listing = plan_splits(cub_dir, train_classes, test_classes, validation_fraction=float(validation_fraction),
                                seed=int(seed))
    planned_images = listing["num_images"]
    shards = {split: int(num_shards or beam_io.default_num_shards(n * cub.CAPTIONS_PER_IMAGE))
              for split, n in planned_images.items()}
    pipeline = beam_io.make_pipeline(beam_args)
    source = {"dataset": "CUB_200_2011 images with the captions of Reed et al. (2016)", "cub_dir": cub_dir,
              "captions_dir": captions_dir, **listing,
              **_processing_record(image_size, resnet_weights, fasttext, fasttext_bucket, seed),
              "max_bad_fraction": float(max_bad_fraction)}
    template = manifest_template(source=source, pipeline_options=beam_io.options_to_json(pipeline.options))

    listed = pipeline | "ListImages" >> beam.Create(sorted(e for split in cub.SPLITS for e in plan[split]))
    captions, vocab, sentence_file = _caption_stages(listed, captions_dir, output_dir, fasttext=fasttext,
                                                     seed=int(seed), bucket=int(fasttext_bucket))
    features, report = _image_stages(listed, cub_dir, output_dir, image_size=image_size,
                                     batch_size=batch_size, resnet_weights=resnet_weights,
                                     planned_images=planned_images, max_bad_fraction=max_bad_fraction)
    _ = ({"features": features, "captions": captions}
         | "JoinByImage" >> beam.CoGroupByKey()
         | "MakePairs" >> beam.ParDo(MakePairsFn(template), vocab=beam.pvalue.AsSingleton(vocab))
         | "WriteShards" >> beam_io.WriteShards(output_dir, shards, namespace=NAMESPACE)
         | "CollectShards" >> beam.combiners.ToList()
         | "WriteManifest" >> beam.Map(
             finish_cub_manifest, vocab=beam.pvalue.AsSingleton(vocab), report=beam.pvalue.AsSingleton(report),
             sentence_file=beam.pvalue.AsSingleton(sentence_file), output_dir=output_dir,
             template=template, num_shards=shards))

    # Only now that every argument has been checked, so bad input never deletes an old dataset.
    beam_io.check_runner_support(pipeline)  # the DaskRunner: refused here (side inputs)
    beam_io.prepare_output_dir(output_dir, overwrite=overwrite)
    logger.info("%s: building CUB from %s images %s in %s shards", output_dir, sum(planned_images.values()),
                planned_images, shards)
    return beam_io.run_build(pipeline, output_dir=output_dir, namespace=NAMESPACE)


def _caption_stages(listed: beam.PCollection, captions_dir: str, output_dir: str, *,
                    fasttext: str | None, seed: int, bucket: int):
    """ReadCaptions, the vocabulary of the train captions and DIR/sentence_vectors.npz.

    Returns (captions: (key, (entry, token lists)) per image, vocab: one list of words,
    sentence_file: one file name), the last two for side inputs.
    """
    captions = listed | "ReadCaptions" >> beam.Map(read_captions, captions_dir=captions_dir)
    # The trainval captions (train and validation), as before validation splits existed: the test
    # records' token ids then do not depend on the validation share.
    train_captions = captions | "TrainCaptions" >> beam.Filter(lambda item: item[0][0] != "test")
    counts = train_captions | "CountWords" >> beam.CombineGlobally(CountWordsFn())
    vocab = counts | "BuildVocabulary" >> beam.Map(cub.build_vocabulary)
    sentence_file = (train_captions
                     | "CollectTrainCaptions" >> beam.combiners.ToList()
                     | "FitSentenceVectors" >> beam.Map(
                         fit_sentence_vectors, vocab=beam.pvalue.AsSingleton(vocab),
                         counts=beam.pvalue.AsSingleton(counts), output_dir=output_dir,
                         fasttext=fasttext, seed=seed, bucket=bucket))
    return captions, vocab, sentence_file


def _image_stages(listed: beam.PCollection, cub_dir: str, output_dir: str, *, image_size: int,
                  batch_size: int, resnet_weights: str | None, planned_images: Mapping[str, int],
                  max_bad_fraction: float):
    """DecodeImages, ResNet-101 in same-shape batches, and DIR/image_report.json.

    Returns (features: (key, [2048]) per usable image, report: one {split: bad images}).
    """
    checked = listed | "DecodeImages" >> beam.ParDo(
        DecodeImageFn(cub_dir, image_size)).with_outputs(_BAD, _CONVERTED, main="ok")
    features = (checked.ok
                | "GroupBySize" >> beam.GroupByKey()
                | "BatchBySize" >> beam.FlatMap(same_size_batches, batch_size=batch_size)
                | "LoadBatch" >> beam.ParDo(LoadBatchFn(cub_dir, image_size))
                | "ResNet101" >> RunInference(KeyedModelHandler(ResNetFeatureHandler(resnet_weights)))
                | "SplitBatch" >> beam.FlatMap(split_batch))
    report = ((checked[_BAD] | "TagBad" >> beam.Map(lambda item: (_BAD, item)),
               checked[_CONVERTED] | "TagConverted" >> beam.Map(lambda item: (_CONVERTED, item)))
              | "ImageFindings" >> beam.Flatten()
              | "CollectImageFindings" >> beam.combiners.ToList()
              | "ReportBadImages" >> beam.Map(write_image_report, planned=planned_images,
                                              output_dir=output_dir, max_bad_fraction=max_bad_fraction))
    return features, report


# --------------------------------------------------------------------------------------------
# The command line


def _run_from_args(args: argparse.Namespace, beam_args: list[str]) -> beam_io.BuildResult:
    return run_cub_job(
        args.output, cub_dir=args.cub_dir, captions_dir=args.captions_dir,
        train_classes=args.train_classes, test_classes=args.test_classes,
        resnet_weights=args.resnet_weights, fasttext=args.fasttext, image_size=args.image_size,
        batch_size=args.batch_size, max_bad_fraction=args.max_bad_fraction, seed=args.seed,
        num_shards=args.num_shards, overwrite=args.overwrite, beam_args=beam_args,
        validation_fraction=args.validation_fraction)


COMMANDS = (beam_io.BuildCommand(
    **commands.CUB.fields(), run=_run_from_args,
    note=lambda manifest: f"; {sum(manifest.source['num_bad_images'].values())} unusable image(s)"),)


# --------------------------------------------------------------------------------------------
# Driver helpers


def _check_arguments(output_dir: str, *, cub_dir: str, captions_dir: str, image_size: int,
                     batch_size: int, max_bad_fraction: float, seed: int, num_shards: int | None,
                     resnet_weights: str | None, fasttext: str | None, fasttext_bucket: int) -> None:
    beam_io.check_job_arguments(output_dir, seed=seed, num_shards=num_shards)
    for name, path in (("--cub-dir", cub_dir), ("--captions-dir", captions_dir)):
        if not isinstance(path, str) or not path:
            raise UserError(f"{name} must be a non-empty path, got {path!r}")
        if not tf.io.gfile.isdir(path):
            raise UserError(f"{name} {path}: not a directory")
    beam_io.check_int("image size", image_size, 32)
    beam_io.check_int("batch size", batch_size, 1)
    beam_io.check_fraction("--max-bad-fraction", max_bad_fraction, closed=True)
    beam_io.check_int("fasttext_bucket", fasttext_bucket, 1, "a positive integer")
    if resnet_weights not in (None, "imagenet") and not tf.io.gfile.exists(resnet_weights):
        raise UserError(f"--resnet-weights {resnet_weights}: no such file (or pass 'imagenet')")
    if fasttext is not None and not tf.io.gfile.exists(fasttext):
        raise UserError(f"--fasttext {fasttext}: no such file")


def plan_splits(cub_dir: str, train_classes: str | None, test_classes: str | None, *,
                validation_fraction: float = schema.DEFAULT_VALIDATION_FRACTION, seed: int = 0
                ) -> tuple[dict[str, list[cub.ImageEntry]], dict]:
    """Reads images.txt and the class lists, holds out the validation classes of the train list:
    {split: image entries} and what the manifest's `source` records of them (checksums, the
    validation classes, images per split, classes with images per split)."""
    images_txt = os.path.join(cub_dir, "images.txt")
    images_text = _read_text(images_txt, "CUB images list")
    class_files = {"train": train_classes or cub.DEFAULT_CLASS_FILES["train"],
                   "test": test_classes or cub.DEFAULT_CLASS_FILES["test"]}
    class_texts = {split: _read_text(path, f"{split} class list") for split, path in class_files.items()}
    images = cub.parse_images_list(images_text, images_txt)
    listed = {split: cub.parse_class_list(text, class_files[split]) for split, text in class_texts.items()}
    held = cub.validation_classes(listed["train"], images, validation_fraction, seed)
    split_classes = {"train": [c for c in listed["train"] if c not in held], "validation": held,
                     "test": listed["test"]}
    plan = cub.plan_images(images, split_classes, {**class_files, "validation": class_files["train"]})
    unused_classes = cub.classes_without_images(images, split_classes)
    for split, names in unused_classes.items():
        if names:
            logger.warning("%d %s class(es) of %s have no image in %s, e.g. %s", len(names), split,
                           class_files["test" if split == "test" else "train"], images_txt, names[0])
    listing = {
        "images_txt_sha256": _sha256(images_text),
        "class_files": {split: {"path": path, "sha256": _sha256(class_texts[split])}
                        for split, path in class_files.items()},
        "validation_fraction": float(validation_fraction), "validation_classes": held,
        "num_images": {split: len(entries) for split, entries in plan.items()},
        "num_classes": {split: len(names) - len(unused_classes[split])
                        for split, names in split_classes.items()}}
    return plan, listing


def _processing_record(image_size: int, resnet_weights: str | None, fasttext: str | None,
                       fasttext_bucket: int, seed: int) -> dict:
    """How the features and the word vectors were made, for the manifest's `source`."""
    return {
        "image_size": int(image_size), "resnet_weights": resnet_weights or "random (none)",
        "preprocessing": "shorter side to image_size (bilinear, no crop), "
                         "keras.applications.resnet.preprocess_input",
        "tokenizer": "nltk PunktSentenceTokenizer (untrained) + NLTKWordTokenizer",
        "nltk_version": _version("nltk"), "gensim_version": _version("gensim"),
        "word_vectors": fasttext or {"gensim.models.FastText": {
            **FASTTEXT_PARAMS, "bucket": int(fasttext_bucket), "seed": int(seed), "workers": 1}}}


def _read_text(path: str, what: str) -> str:
    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: no {what}")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text ({e})") from None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def manifest_template(*, source: dict, pipeline_options: dict) -> schema.Manifest:
    """The CUB manifest without its splits and with a placeholder vocabulary (both filled in by
    the WriteManifest stage). No label: train and test classes are disjoint (SPEC 3 declares CCA
    coherence for CUB instead)."""
    weights = beam_io.balanced_likelihood_weights({IMAGE: cub.FEATURE_DIM, CAPTION: cub.CAPTION_LENGTH})
    modalities = (
        schema.ModalitySpec(IMAGE, "vector", (cub.FEATURE_DIM,), "float32", "laplace", weights[IMAGE]),
        schema.ModalitySpec(CAPTION, "sequence", (cub.CAPTION_LENGTH,), "int64", "categorical",
                            weights[CAPTION], vocab=cub.SPECIAL_TOKENS),
    )
    return schema.Manifest(
        name=DATASET_NAME, modalities=modalities, splits={}, label=None,
        metadata_keys=dict(METADATA_SHAPES), source=source, pipeline_options=pipeline_options,
        extras={"cca": {"image": IMAGE, "caption": CAPTION, "sentence_vectors": sentence_vectors.FILENAME,
                        "components": CCA_COMPONENTS},
                "image_report": REPORT_FILENAME})


# --------------------------------------------------------------------------------------------
# Captions and word vectors


def read_captions(entry: cub.ImageEntry, captions_dir: str
                  ) -> tuple[tuple[str, int], tuple[cub.ImageEntry, list[list[str]]]]:
    """An image's caption file -> (key, (entry, its 10 tokenised captions))."""
    path = cub.caption_file(captions_dir, entry.path)
    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: no caption file for image {entry.path}")
    with tf.io.gfile.GFile(path, "rb") as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None
    tokens = [cub.tokenize(caption) for caption in cub.parse_captions(text, path)]
    Metrics.counter(NAMESPACE, "caption_files_read").inc()
    return entry.key, (entry, tokens)


class CountWordsFn(beam.CombineFn):
    """Word counts over (key, (entry, token lists)) elements; the merge is order-free."""

    def create_accumulator(self) -> collections.Counter:
        return collections.Counter()

    def add_input(self, counts, element):
        for tokens in element[1][1]:
            counts.update(tokens)
        return counts

    def merge_accumulators(self, accumulators):
        total = collections.Counter()
        for counts in accumulators:
            total.update(counts)
        return total

    def extract_output(self, counts) -> dict[str, int]:
        return dict(sorted(counts.items()))


def train_fasttext(captions: Sequence[Sequence[str]], seed: int, bucket: int = FASTTEXT_BUCKETS):
    """gensim FastText with SPEC 6's settings (others at gensim's defaults) on tokenised
    captions, one caption per training sentence; one worker thread so a seed repeats a run."""
    from gensim.models import FastText

    return FastText(sentences=[list(c) for c in captions], seed=seed, workers=1, bucket=bucket,
                    **FASTTEXT_PARAMS)


def load_pretrained_vectors(path: str):
    """Pretrained word vectors -> (lookup(word) -> vector, dim). `.bin`: Facebook's FastText
    format (subword vectors cover unseen words); anything else: word2vec text format (unseen
    words get zeros, counted in `cub/words_without_pretrained_vector`)."""
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import load_facebook_vectors

    local = path
    if "://" in path:
        local = os.path.join(tempfile.mkdtemp(), os.path.basename(path))
        tf.io.gfile.copy(path, local)
    try:
        if path.endswith(".bin"):
            vectors = load_facebook_vectors(local)
            return vectors.__getitem__, int(vectors.vector_size)
        vectors = KeyedVectors.load_word2vec_format(local, binary=False)
    except (ValueError, OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"--fasttext {path}: cannot read word vectors ({e})") from None
    dim = int(vectors.vector_size)

    def lookup(word: str) -> np.ndarray:
        if word in vectors.key_to_index:
            return vectors[word]
        Metrics.counter(NAMESPACE, "words_without_pretrained_vector").inc()
        return np.zeros(dim, np.float32)

    return lookup, dim


def fit_sentence_vectors(train_captions: Iterable, *, vocab: Sequence[str], counts: Mapping[str, int],
                         output_dir: str, fasttext: str | None, seed: int,
                         bucket: int = FASTTEXT_BUCKETS) -> str:
    """One worker: word vectors (FastText trained on the trainval captions, or pretrained), SIF
    weights and the trainval captions' first principal component -> DIR/sentence_vectors.npz.
    Returns the file name. The captions are taken in image-id order (CUB's images.txt order),
    whichever split (train or validation) an image is in."""
    ordered = sorted(train_captions, key=lambda item: (item[1][0].image_id, item[0]))
    texts = [tokens for _, (_, captions) in ordered for tokens in captions]
    if fasttext:
        lookup, dim = load_pretrained_vectors(fasttext)
        source = fasttext
    else:
        model = train_fasttext(texts, seed, bucket)
        lookup, dim, source = model.wv.__getitem__, model.wv.vector_size, "fasttext-trained"
    word_ids = {word: i for i, word in enumerate(vocab)}
    tokens = np.stack([cub.encode_caption(t, word_ids) for t in texts])
    embedding = sentence_vectors.fit(vocab, sentence_vectors.word_vectors(lookup, vocab, dim), counts,
                                     tokens, source=source)
    sentence_vectors.write(os.path.join(output_dir, sentence_vectors.FILENAME), embedding)
    logger.info("sentence vectors: %d words x %d from %s, principal component of %d train captions",
                len(vocab), dim, source, len(texts))
    return sentence_vectors.FILENAME


# --------------------------------------------------------------------------------------------
# Images


def _read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


class DecodeImageFn(beam.DoFn):
    """entry -> ((height, width), entry) for a usable image, keyed by its resized shape.

    Unusable images go to the `bad` output as (entry, reason); converted ones (grayscale, CMYK,
    ...) are also listed in the `converted` output as (entry, original mode).
    """

    def __init__(self, cub_dir: str, image_size: int):
        self._cub_dir = cub_dir
        self._image_size = image_size

    def process(self, entry: cub.ImageEntry):
        path = os.path.join(self._cub_dir, "images", entry.path)
        try:
            if not tf.io.gfile.exists(path):
                raise cub.BadImage(f"{path}: no such file")
            pixels, mode = cub.decode_image(_read_bytes(path), path, self._image_size)
        except cub.BadImage as e:
            Metrics.counter(NAMESPACE, "images_bad").inc()
            yield beam.pvalue.TaggedOutput(_BAD, (entry, str(e)))
            return
        if mode != "RGB":
            Metrics.counter(NAMESPACE, f"images_converted_from_{mode}").inc()
            yield beam.pvalue.TaggedOutput(_CONVERTED, (entry, mode))
        Metrics.counter(NAMESPACE, "images_decoded").inc()
        yield tuple(int(s) for s in pixels.shape[:2]), entry


def same_size_batches(group: tuple[tuple[int, int], Iterable[cub.ImageEntry]], batch_size: int
                      ) -> Iterator[tuple[tuple[int, int], list[cub.ImageEntry]]]:
    """(shape, entries) -> (shape, up to batch_size entries), in entry order, so the batches (and
    the features, which depend slightly on the batch a kernel sees) do not depend on the runner.
    Only entries travel through the shuffle; LoadBatch decodes the pixels."""
    shape, entries = group
    entries = sorted(entries)
    for start in range(0, len(entries), batch_size):
        yield shape, entries[start:start + batch_size]


class LoadBatchFn(beam.DoFn):
    """(shape, [entry]) -> (entries, float32 ResNet inputs [B, H, W, 3]) for one same-shape batch."""

    def __init__(self, cub_dir: str, image_size: int):
        self._cub_dir = cub_dir
        self._image_size = image_size

    def process(self, element):
        shape, batch = element
        batch = sorted(batch)
        pixels = []
        for entry in batch:
            path = os.path.join(self._cub_dir, "images", entry.path)
            image, _ = cub.decode_image(_read_bytes(path), path, self._image_size)
            if image.shape[:2] != tuple(shape):  # the file changed since DecodeImages read it
                raise RuntimeError(f"{path}: decoded to {image.shape[:2]}, earlier to {shape}")
            pixels.append(image)
        yield tuple(batch), cub.resnet_inputs(np.stack(pixels))


_feature_models: dict = {}
_feature_models_lock = threading.Lock()


def resnet_feature_model(weights: str | None):
    """ResNet-101 without its classifier, global average pooled: [B, H, W, 3] -> [B, 2048].

    One model per worker process and weights: RunInference shares a model between the threads of
    a process only while one of its DoFns holds it, and runners that tear DoFns down between
    bundles would otherwise build, load and trace ResNet-101 again (~15 s each time on a CPU).
    """
    with _feature_models_lock:
        if weights not in _feature_models:
            _feature_models[weights] = _build_feature_model(weights)
        return _feature_models[weights]


def _build_feature_model(weights: str | None):
    import keras

    if weights not in (None, "imagenet") and "://" in weights:
        local = os.path.join(tempfile.mkdtemp(), os.path.basename(weights))
        tf.io.gfile.copy(weights, local)  # Keras reads weight files from local paths only
        weights = local
    model = keras.applications.ResNet101(include_top=False, weights=weights, pooling="avg",
                                         input_shape=(None, None, 3))
    # One graph for every image shape: a trace per resized shape would cost seconds each.
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True,
                       input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])


def _run_batches(model, batch: Sequence[np.ndarray], inference_args, model_id=None
                 ) -> Iterator[PredictionResult]:
    # Each element is already a batch of same-shape images; shapes differ between elements.
    for images in batch:
        yield PredictionResult(images, model(tf.constant(images)).numpy(), model_id)


class ResNetFeatureHandler(TFModelHandlerNumpy):
    """Beam's TensorFlow model handler around `resnet_feature_model`.

    Its elements are pre-batched arrays [B, H, W, 3] (one resized shape each, from
    BatchBySize), so RunInference passes them one at a time.
    """

    def __init__(self, weights: str | None):
        super().__init__(model_uri=weights or "", model_type=ModelType.SAVED_WEIGHTS,
                         create_model_fn=lambda: None, inference_fn=_run_batches,
                         min_batch_size=1, max_batch_size=1)
        self._weights = weights

    def load_model(self):
        return resnet_feature_model(self._weights)

    def get_metrics_namespace(self) -> str:
        return "bmvae_resnet101"


def split_batch(element: tuple[tuple[cub.ImageEntry, ...], PredictionResult]
                ) -> Iterator[tuple[tuple[str, int], np.ndarray]]:
    """(entries, prediction [B, 2048]) -> (key, features [2048]) per image."""
    entries, prediction = element
    features = np.asarray(prediction.inference, np.float32)
    if features.shape != (len(entries), cub.FEATURE_DIM):
        raise RuntimeError(f"ResNet-101 returned features of shape {features.shape} for "
                           f"{len(entries)} images; expected [{len(entries)}, {cub.FEATURE_DIM}]")
    for entry, row in zip(entries, features):
        yield entry.key, row


def write_image_report(findings: Iterable[tuple[str, tuple[cub.ImageEntry, str]]], *,
                       planned: Mapping[str, int], output_dir: str,
                       max_bad_fraction: float) -> dict[str, int]:
    """Writes DIR/image_report.json (every unusable and every converted image) and fails the job
    (UserError) when more than `max_bad_fraction` of the images are unusable.

    findings: ("bad", (entry, reason)) and ("converted", (entry, original mode)) items.
    Returns the number of unusable images per split.
    """
    findings = list(findings)
    bad = sorted((item for kind, item in findings if kind == _BAD), key=lambda item: item[0])
    converted = sorted((item for kind, item in findings if kind == _CONVERTED), key=lambda item: item[0])
    per_split = {split: sum(1 for entry, _ in bad if entry.split == split) for split in planned}
    total = sum(planned.values())
    report = {
        "num_images": total, "num_bad": len(bad), "max_bad_fraction": max_bad_fraction,
        "bad_per_split": per_split,
        "bad": [{"image_id": e.image_id, "path": e.path, "split": e.split, "reason": reason}
                for e, reason in bad],
        "converted": [{"image_id": e.image_id, "path": e.path, "mode": mode} for e, mode in converted],
    }
    path = os.path.join(output_dir, REPORT_FILENAME)
    atomic.write_text(path, json.dumps(report, indent=2) + "\n")
    if bad:
        logger.warning("%d unusable image(s), listed in %s", len(bad), path)
    cub.check_bad_fraction(len(bad), total, max_bad_fraction, path)
    return per_split


# --------------------------------------------------------------------------------------------
# Pairs and manifest


class MakePairsFn(beam.DoFn):
    """(key, {"features": [f], "captions": [(entry, tokens)]}) -> the image's 10 examples as
    (split, 10 * index + c, serialized tf.train.Example); nothing for an unusable image."""

    def __init__(self, template: schema.Manifest):
        self._template = template
        self._vocab = None
        self._word_ids: dict[str, int] = {}

    def process(self, element, vocab: Sequence[str]):
        key, joined = element
        if not joined["features"]:
            return  # an unusable image, listed in the report
        (features,) = joined["features"]
        ((entry, captions),) = joined["captions"]
        Metrics.counter(NAMESPACE, "images_paired").inc()
        if self._vocab is not vocab:
            self._vocab, self._word_ids = vocab, {word: i for i, word in enumerate(vocab)}
        for c, tokens in enumerate(captions):
            record = {IMAGE: features, CAPTION: cub.encode_caption(tokens, self._word_ids),
                      "image_id": [entry.image_id], "caption_index": [c],
                      "class_index": [entry.class_index]}
            yield entry.split, cub.CAPTIONS_PER_IMAGE * entry.index + c, \
                schema.encode_example(self._template, record)


def finish_cub_manifest(shards: Iterable[tuple[str, str, int]], *, vocab: Sequence[str],
                        report: Mapping[str, int], sentence_file: str, output_dir: str,
                        template: schema.Manifest, num_shards: Mapping[str, int]) -> str:
    """The manifest, once the shards, the vocabulary, the image report and the sentence vectors
    exist: the expected pair counts are 10 per usable image."""
    planned = template.source["num_images"]
    expected = {split: cub.CAPTIONS_PER_IMAGE * (planned[split] - report[split]) for split in planned}
    modalities = tuple(dataclasses.replace(m, vocab=tuple(vocab)) if m.name == CAPTION else m
                       for m in template.modalities)
    source = {**template.source, "num_bad_images": dict(report), "vocab_size": len(vocab)}
    extras = {**template.extras, "cca": {**template.extras["cca"], "sentence_vectors": sentence_file}}
    finished = dataclasses.replace(template, modalities=modalities, source=source, extras=extras)
    return beam_io.finish_manifest(shards, output_dir=output_dir, template=finished,
                                   expected_counts=expected, num_shards=num_shards)
