"""The evaluation's batched computations equal the per-subset loops they replaced, bit for bit.

`batched.run_all_subsets` runs every subset of a batch in one traced call with each encoder run
once per distinct input; `encodings.encode_split` decodes the posterior samples of all subsets as
one batch. Both must give exactly what the per-subset loop (`subsets.run_subsets` over a
`masked_step`) gave, for every model.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bmvae_tf import schema
from bmvae_tf.models import MODELS
from bmvae_tf.random_streams import EvalStream
from bmvae_tf.trainers.evaluation import batched, classifiers as classifiers_lib, encodings, probes, robustness
from bmvae_tf.trainers.evaluation import subsets as subsets_lib
from tests import synthetic


def _tiny_model(name, num_modalities=3):
    cls, fixed = MODELS[name]
    keras.utils.set_random_seed(0)
    specs = synthetic.digits_like_modalities(num_modalities)
    kwargs = dict(synthetic.TINY_NETWORKS, **fixed)
    if cls.IMPORTANCE_SAMPLED:
        kwargs["K"] = 2
    return cls(specs, 4, **kwargs)


def _batches(model, sizes=(5, 3)):
    out = []
    for i, size in enumerate(sizes):
        batch = synthetic.random_inputs(model.modalities, size, seed=i)
        batch["label"] = tf.constant(np.arange(size) % 3, tf.int64)
        out.append(batch)
    return out


def _body(model):
    def body(inputs, present, seed):
        posterior = model.posterior(inputs, present)
        return {"mean": posterior.mean(), "sample": posterior.sample(seed=seed)}
    return body


# Models whose posterior reads the experts differently: masked by `encode` (bmvae_m), unmasked
# (mvae's product, bmvae_p's weighted product), split into shared and private parts (mmvae_ms).
_REPRESENTATIVE = ("bmvae_m", "bmvae_p", "mmvae_ms", "mvae")


@pytest.mark.parametrize("name", [n if n in _REPRESENTATIVE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(MODELS)])
def test_all_subsets_in_one_call_equal_the_per_subset_loop(name):
    model = _tiny_model(name)
    names = [spec.name for spec in model.modalities]
    subsets = schema.subset_names(names)
    seed = tf.constant([3, 1], tf.int32)
    scheme = subsets_lib.SeedScheme.BATCH_THEN_SUBSET
    loop = list(subsets_lib.run_subsets(subsets_lib.masked_step(model.modalities, _body(model)), _batches(model),
                                        names, subsets, seed=seed, scheme=scheme))
    once = list(batched.run_all_subsets(model, _body(model), _batches(model), subsets, seed=seed, scheme=scheme,
                                        output_signature={"mean": tf.float32, "sample": tf.float32}))
    assert len(loop) == len(once) == 2
    for (_, expected), (_, got) in zip(loop, once):
        assert list(got) == list(expected)
        for key in expected:
            for field in ("mean", "sample"):
                np.testing.assert_array_equal(got[key][field].numpy(), expected[key][field].numpy(),
                                              err_msg=f"{name} {key} {field}")


def test_each_encoder_runs_twice_per_batch_whatever_the_subsets_and_is_restored():
    model = _tiny_model("bmvae_m")
    batch = _batches(model)[0]
    model.posterior(batch, model.all_present())  # builds the networks, so the step traces once
    calls = []
    originals = list(model.encoders)

    class Counting:
        def __init__(self, encoder):
            self.encoder = encoder

        def __call__(self, x, *args, **kwargs):
            calls.append(x)
            return self.encoder(x, *args, **kwargs)

    object.__setattr__(model, "encoders", [Counting(e) for e in originals])
    subsets = schema.subset_names([spec.name for spec in model.modalities])
    step = batched.all_subsets_step(model, _body(model), subsets, subsets_lib.SeedScheme.NONE,
                                    {"mean": tf.float32, "sample": tf.float32})
    step({spec.name: batch[spec.name] for spec in model.modalities}, tf.zeros([2], tf.int32), tf.constant(0))
    # 7 subsets, 3 encoders: each ran on its modality's values and on zeros, nothing else.
    assert len(calls) == 2 * len(originals)
    assert all(isinstance(e, Counting) for e in model.encoders)  # the memo was taken away again
    object.__setattr__(model, "encoders", originals)


def _per_subset_encode_split(model, batches, classifiers, seed):
    """encode_split as it was: one traced call per subset, decoding that subset's samples alone."""
    specs = list(model.modalities)
    names = [spec.name for spec in specs]
    subsets = schema.subset_names(names)

    def encode(inputs, present, sample_seed):
        posterior = model.posterior(inputs, present)
        generated = model.generate(posterior.sample(seed=sample_seed))
        return {"mean": posterior.mean(), "predictions": tf.stack([classifiers_lib.predict_classes(
            classifiers[spec.name], spec, generated[spec.name]) for spec in specs])}

    means, predictions = {}, {}
    for _, outputs in subsets_lib.run_subsets(
            subsets_lib.masked_step(specs, encode), batches, names, subsets,
            seed=subsets_lib.stream_seed(seed, EvalStream.COHERENCE),
            scheme=subsets_lib.SeedScheme.BATCH_THEN_SUBSET):
        for subset in subsets:
            out = outputs[schema.subset_key(subset)]
            means.setdefault(schema.subset_key(subset), []).append(out["mean"].numpy())
            for m, name in enumerate(names):
                if name not in subset:
                    predictions.setdefault(subsets_lib.coherence_key(name, subset), []).append(
                        out["predictions"].numpy()[m])
    return ({k: np.concatenate(v) for k, v in means.items()},
            {k: np.concatenate(v) for k, v in predictions.items()})


@pytest.mark.parametrize("name", ["bmvae_m", "mvae"])
def test_encode_split_equals_the_per_subset_formulation(name):
    model = _tiny_model(name)
    keras.utils.set_random_seed(1)
    classifiers = {spec.name: classifiers_lib.build_classifier(spec, 3) for spec in model.modalities}
    split = encodings.encode_split(model, _batches(model), classifiers=classifiers, seed=4)
    means, predictions = _per_subset_encode_split(model, _batches(model), classifiers, 4)
    assert sorted(split.means) == sorted(means) and sorted(split.cross_predictions) == sorted(predictions)
    for key, value in means.items():
        np.testing.assert_array_equal(split.means[key], value)
    for key, value in predictions.items():
        np.testing.assert_array_equal(split.cross_predictions[key], value)
    np.testing.assert_array_equal(split.labels, [0, 1, 2, 0, 1, 0, 1, 2])


def _per_level_noisy_means(model, batches, levels, scales, seed):
    """Robustness' encodings as they were: per level a pass over the split, each batch corrupted by
    its own traced step, then one traced call per subset. {(level index, key): [N, D]}."""
    specs = list(model.modalities)
    names = [spec.name for spec in specs]
    subsets = schema.subset_names(names)
    encode = subsets_lib.masked_step(specs, lambda inputs, present, _: model.posterior(inputs, present).mean())
    base_seed = subsets_lib.stream_seed(seed, EvalStream.ROBUSTNESS_NOISE)
    fold = tf.random.experimental.stateless_fold_in
    out = {}
    for level_index, level in enumerate(levels):
        noisy = [robustness.add_noise(specs, {n: batch[n] for n in names}, tf.constant(level, tf.float32), scales,
                                      fold(fold(base_seed, level_index), index))
                 for index, batch in enumerate(batches)]
        for _, outputs in subsets_lib.run_subsets(encode, noisy, names, subsets):
            for key, mean in outputs.items():
                out.setdefault((level_index, key), []).append(mean.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


class _RecordingProbe:
    """Scores nothing; keeps what it was asked to score."""

    def __init__(self):
        self.seen = []

    def score(self, features, labels):
        self.seen.append(np.array(features))
        return float(np.sum(features, dtype=np.float64))  # names what it scored

    def predict(self, features):
        self.seen.append(np.array(features))
        return np.zeros(len(features), np.int64)


@pytest.mark.parametrize("name", ["bmvae_m", "bmvae_p"])
def test_noise_levels_in_one_pass_equal_the_per_level_passes(name):
    model = _tiny_model(name)
    names = [spec.name for spec in model.modalities]
    levels = [0.0, 0.3, 1.0]
    scales = {"digit": 1.0, "street": 1.0}
    probes = {schema.subset_key(s): _RecordingProbe() for s in schema.subset_names(names)}
    baselines = {key: _RecordingProbe() for key in probes}
    result = robustness.noisy_accuracy(model, _batches(model), probes, baselines, levels=levels,
                                       scales=scales, seed=2)
    assert result.num_test == 8
    expected = _per_level_noisy_means(model, _batches(model), levels, scales, 2)
    for key, probe in probes.items():
        # The levels are scored side by side on threads, so in no fixed order.
        assert len(probe.seen) == len(levels)
        for level_index in range(len(levels)):
            assert any(np.array_equal(seen, expected[(level_index, key)]) for seen in probe.seen), \
                f"{name} {key} level {level_index}"
            # and its score went to its level
            assert result.latent_accuracy[key][level_index] == float(
                np.sum(expected[(level_index, key)], dtype=np.float64))
    # The baseline saw the noisy inputs themselves, batch by batch (level 0 of batch 0, then the
    # other levels): at level 0 the clean features.
    clean = robustness.input_features(model.modalities, {n: _batches(model)[0][n] for n in names})
    np.testing.assert_array_equal(baselines["digit+text"].seen[0],
                                  robustness.subset_features(clean, ["digit", "text"]))
    assert not np.array_equal(baselines["digit"].seen[1], clean["digit"])
    assert len(baselines["digit"].seen) == len(levels) * 2 and result.baseline_accuracy["digit"] == [3 / 8] * 3


def test_probes_fitted_side_by_side_equal_lone_fits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    tasks = {key: (rng.normal(size=(300, width)) + labels[:, None], labels)
             for key, width in (("a", 4), ("b", 30), ("a+b", 34))}
    together = probes.fit_probes(tasks)
    assert list(together) == ["a", "b", "a+b"]
    for key, (features, y) in tasks.items():
        alone = probes.fit_probe(features, y)
        np.testing.assert_array_equal(together[key][-1].coef_, alone[-1].coef_)
        np.testing.assert_array_equal(together[key].predict(features), alone.predict(features))


def test_counting_correct_predictions_batch_by_batch_is_the_probe_score():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=1000)
    features = rng.normal(size=(1000, 50)) + 0.3 * labels[:, None]
    probe = probes.fit_probe(features[:500], labels[:500])
    counted = sum(robustness._count_correct(probe, features[i:i + 128], labels[i:i + 128])
                  for i in range(500, 1000, 128))
    assert counted / 500 == probe.score(features[500:], labels[500:])
