"""Small synthetic multimodal datasets written in the real on-disk format, for fast tests.

Each class c has a fixed random prototype per modality; an example is its class prototype plus
noise, so a working model can recover the class from any modality.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from bmvae_tf import schema

VOCAB = ("<pad>", " ") + tuple("abcdefghijklmnopqrstuvwxyz")

# Network sizes small enough for unit tests of the models.
TINY_NETWORKS = dict(hidden_units=(16,), channels=(8, 8, 8), sequence_width=8)
# The same networks (and a 4-d latent) as `bmvae train` arguments.
TINY_CLI = ["--set", "model.latent_dim=4", "--set", "model.hidden_units=[16]",
            "--set", "model.channels=[8,8,8]", "--set", "model.sequence_width=8"]


def random_inputs(specs, batch: int, seed: int = 0) -> dict:
    """Uniform random model inputs {modality: [batch, *shape]}: tokens for sequences, [0, 1) else."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if s.kind == "sequence":
            out[s.name] = tf.constant(rng.integers(0, s.vocab_size, size=(batch, *s.shape)), tf.int64)
        else:
            out[s.name] = tf.constant(rng.uniform(size=(batch, *s.shape)), tf.float32)
    return out


def record_decoder_calls(model) -> list:
    """Wraps every decoder of `model` so each call appends (decoder index, latents [N, D])."""
    calls = []
    for index, decoder in enumerate(model.decoders):
        def recorded(z, _original=decoder.call, _index=index):
            calls.append((_index, z))
            return _original(z)

        decoder.call = recorded
    return calls


def digits_like_modalities(num_modalities: int = 3) -> list[schema.ModalitySpec]:
    """digit [8,8,1], street [16,16,3], text [8]; with num_modalities > 3, extra vectors [6]."""
    specs = [
        schema.ModalitySpec("digit", "image", (8, 8, 1), likelihood_weight=12.0),
        schema.ModalitySpec("street", "image", (16, 16, 3)),
        schema.ModalitySpec("text", "sequence", (8,), dtype="int64", likelihood="categorical",
                            vocab=VOCAB, likelihood_weight=96.0),
    ]
    for i in range(3, num_modalities):
        specs.append(schema.ModalitySpec(f"vec{i}", "vector", (6,), likelihood="gaussian"))
    return specs[:num_modalities]


def _prototypes(specs, num_classes: int, rng: np.random.Generator) -> dict:
    protos = {}
    for spec in specs:
        if spec.kind == "sequence":
            protos[spec.name] = rng.integers(2, len(spec.vocab), size=(num_classes, *spec.shape))
        elif spec.kind == "image":
            protos[spec.name] = rng.uniform(0.0, 1.0, size=(num_classes, *spec.shape))
        else:
            protos[spec.name] = rng.normal(0.0, 2.0, size=(num_classes, *spec.shape))
    return protos


def _example(spec, proto, rng):
    if spec.kind == "sequence":
        tokens = proto.copy()
        flip = rng.uniform(size=tokens.shape) < 0.1
        tokens[flip] = rng.integers(2, len(spec.vocab), size=int(flip.sum()))
        return tokens.astype(np.int64)
    if spec.kind == "image":
        return np.clip(proto + rng.normal(0, 0.1, proto.shape), 0, 1).astype(np.float32)
    return (proto + rng.normal(0, 0.3, proto.shape)).astype(np.float32)


def write_dataset(directory: str, *, num_train: int = 256, num_test: int = 128, num_validation: int = 64,
                  num_modalities: int = 3, num_classes: int = 10, seed: int = 0,
                  shards: int = 2, name: str = "synthetic",
                  nan_train_example: int | None = None) -> schema.Manifest:
    """Writes DIR/manifest.json and gzip TFRecord shards; returns the manifest.

    nan_train_example: that train example's first image is all NaN (a corrupt record).
    num_validation: examples of the validation split; 0 writes none (a dataset built before
        validation splits existed). Drawn after train and test, so it leaves their records as
        they were.
    """
    rng = np.random.default_rng(seed)
    specs = digits_like_modalities(num_modalities)
    protos = _prototypes(specs, num_classes, rng)
    label = schema.LabelSpec(num_classes=num_classes, names=tuple(f"c{i}" for i in range(num_classes)))
    stub = schema.Manifest(name=name, modalities=tuple(specs), label=label,
                           metadata_keys={"noise_seed": (1,)},
                           splits={"train": schema.SplitInfo(("x",), 0)})
    os.makedirs(directory, exist_ok=True)
    splits = {}
    for split, count in (("train", num_train), ("test", num_test), ("validation", num_validation)):
        if count == 0 and split == "validation":
            continue
        files = [schema.shard_name(split, i, shards) for i in range(shards)]
        writers = [tf.io.TFRecordWriter(os.path.join(directory, f), options=schema.COMPRESSION)
                   for f in files]
        for i in range(count):
            c = int(rng.integers(num_classes))
            record = {spec.name: _example(spec, protos[spec.name][c], rng) for spec in specs}
            record["label"] = c
            record["noise_seed"] = [float(i)]
            serialized = schema.encode_example(stub, record)
            if split == "train" and i == nan_train_example:
                # encode_example refuses NaN, as the Beam writers do; forge the corrupt record.
                example = tf.train.Example.FromString(serialized)
                values = example.features.feature[specs[0].name].float_list.value
                values[:] = [float("nan")] * len(values)
                serialized = example.SerializeToString()
            writers[i % shards].write(serialized)
        for w in writers:
            w.close()
        splits[split] = schema.SplitInfo(tuple(files), count, shard_counts=tuple(
            len(range(i, count, shards)) for i in range(shards)))
    splits = {split: splits[split] for split in schema.SPLITS if split in splits}
    manifest = schema.Manifest(name=name, modalities=tuple(specs), label=label,
                               metadata_keys={"noise_seed": (1,)}, splits=splits,
                               source={"generator": "tests.synthetic", "seed": seed},
                               directory=directory)
    schema.write_manifest(directory, manifest)
    return schema.read_manifest(directory)


def write_untrained_run(data_dir: str, workdir: str, *, model: dict, eval_settings: dict | None = None,
                        history: list[dict] | None = None, prepare=None):
    """A run directory (config.yaml, a checkpoint, history.jsonl) of an untrained model on the
    dataset in `data_dir`, for tests of the commands that read runs. `prepare(model)` may set
    weights before the checkpoint is written. Returns (config, model)."""
    from bmvae_tf.trainers import config as config_lib
    from bmvae_tf.trainers import run_dir

    manifest = schema.read_manifest(data_dir)
    config = config_lib.from_dict({"data": {"dir": data_dir}, "model": model,
                                   "eval": dict(eval_settings or {})})
    vae = config_lib.build_model(config.model, manifest.modalities)
    run_dir.build_variables(vae, manifest)
    if prepare is not None:
        prepare(vae)
    paths = run_dir.RunPaths(workdir)
    run_dir.model_checkpoint(vae).save(os.path.join(paths.checkpoints, "ckpt"))
    with open(paths.config, "w") as f:
        f.write(config_lib.dump_yaml(config))
    with open(paths.history, "w") as f:
        for record in history or []:
            f.write(json.dumps(record) + "\n")
    return config, vae
