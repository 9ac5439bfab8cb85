"""Tests of trainers.evaluation.cca (CCA coherence) and bmvae_tf.pipeline.sentence_vectors (SIF sentence vectors).

The maths is checked on data with known answers: a planted canonical correlation, SIF weights
and averages computed by hand. The end-to-end test trains a CUB config for one epoch on the tiny
CUB tree (tests/cub_tree.py) with the CLI and evaluates it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bmvae_tf.pipeline import sentence_vectors
from bmvae_tf.errors import UserError
from bmvae_tf.trainers import cli, input_pipeline
from bmvae_tf.trainers.evaluation import cca

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------ CCA


def _planted(n: int, rho: float, rng, dx: int = 120, dy: int = 60, k: int = 40):
    """Views x [n, dx], y [n, dy] mixing k latent pairs of correlation rho (and independent
    noise directions) through fixed random invertible maps; the maps come from a fixed seed so
    train and test share them."""
    maps = np.random.default_rng(1234)
    a, b = maps.normal(size=(dx, dx)), maps.normal(size=(dy, dy))
    s = rng.standard_normal((n, k))
    t = rho * s + np.sqrt(1 - rho ** 2) * rng.standard_normal((n, k))
    x = np.concatenate([s, rng.standard_normal((n, dx - k))], 1) @ a.T + 3.0
    y = np.concatenate([t, rng.standard_normal((n, dy - k))], 1) @ b.T - 1.0
    return x, y


@pytest.mark.parametrize("rho", [0.3, 0.7])
def test_cca_score_recovers_a_planted_canonical_correlation(rho):
    rng = np.random.default_rng(0)
    x_train, y_train = _planted(20000, rho, rng)
    x_test, y_test = _planted(5000, rho, rng)
    fitted = cca.fit_cca(x_train, y_train, components=40)
    assert fitted.x_weights.shape == (120, 40) and fitted.y_weights.shape == (60, 40)
    # Equal population correlations spread in a finite sample (train-set estimates are biased
    # up); the held-out score is the unbiased check.
    assert abs(np.mean(fitted.correlations) - rho) < 0.03
    assert abs(cca.cca_score(fitted, x_test, y_test) - rho) < 0.02
    # Canonical variates have unit variance and are uncorrelated on the train data.
    px, py = fitted.project(x_train, y_train)
    np.testing.assert_allclose(np.cov(px.T), np.eye(40), atol=1e-3)
    np.testing.assert_allclose(np.diag(np.cov(px.T, py.T)[:40, 40:]), fitted.correlations, atol=1e-3)


def test_cca_score_is_zero_for_unpaired_views_and_one_for_identical_ones():
    rng = np.random.default_rng(1)
    x_train, y_train = _planted(20000, 0.6, rng)
    fitted = cca.fit_cca(x_train, y_train)
    x_test, y_test = _planted(5000, 0.6, rng)
    shuffled = y_test[rng.permutation(len(y_test))]
    assert abs(cca.cca_score(fitted, x_test, shuffled)) < 0.02
    # y a copy of some of x's coordinates: perfectly correlated canonical pairs.
    same = cca.fit_cca(x_train, x_train[:, :60])
    assert cca.cca_score(same, x_test, x_test[:, :60]) > 0.999


def test_fit_cca_caps_components_and_survives_more_dimensions_than_pairs():
    rng = np.random.default_rng(2)
    fitted = cca.fit_cca(rng.normal(size=(10, 50)), rng.normal(size=(10, 8)), components=40)
    assert len(fitted.correlations) == 8
    assert np.all(np.isfinite(fitted.x_weights)) and np.all(np.isfinite(fitted.correlations))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        cca.fit_cca(np.zeros((1, 3)), np.zeros((1, 3)))


def test_nearest_rows_and_unique_images():
    rng = np.random.default_rng(3)
    references = rng.normal(size=(50, 7))
    queries = rng.normal(size=(300, 7))
    brute = np.argmin(((queries[:, None, :] - references[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(cca.nearest_rows(queries, references, chunk=64), brute)
    np.testing.assert_array_equal(cca.nearest_rows(references[[4, 9]], references), [4, 9])
    features = np.repeat(references[:3], 10, axis=0)
    ids = np.repeat([[7], [2], [5]], 10, axis=0)
    np.testing.assert_array_equal(cca.unique_images(features, ids), references[:3])
    np.testing.assert_array_equal(cca.unique_images(features, None),
                                  np.unique(references[:3], axis=0))


# ------------------------------------------------------------------------------------ SIF


VOCAB = ("<exc>", "<pad>", "<eos>", "bird", "red")


def test_sif_weights_by_hand():
    counts = {"bird": 6, "red": 4, "rare": 1, "odd": 1}  # total 12; rare + odd are <exc>
    weights = sentence_vectors.sif_weights(counts, VOCAB, a=1e-3)
    expected = [1e-3 / (1e-3 + 2 / 12), 0.0, 0.0, 1e-3 / (1e-3 + 6 / 12), 1e-3 / (1e-3 + 4 / 12)]
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_sentence_vectors_by_hand():
    vectors = sentence_vectors.word_vectors(
        {"bird": np.array([1.0, 2.0]), "red": np.array([0.0, 4.0])}.__getitem__, VOCAB, 2)
    np.testing.assert_array_equal(vectors, [[-1, -1], [0, 0], [1, 1], [1, 2], [0, 4]])
    weights = np.array([0.5, 0.0, 0.0, 2.0, 3.0])
    tokens = np.array([[3, 0, 4, 2, 1, 1],    # bird <exc> red <eos> <pad> <pad>: 4 tokens
                       [4, 4, 3, 4, 3, 3]])   # no <eos>: all 6 tokens
    averaged = sentence_vectors.weighted_average(tokens, vectors, weights)
    first = (2.0 * np.array([1, 2]) + 0.5 * np.array([-1, -1]) + 3.0 * np.array([0, 4]) + 0.0) / 4
    second = (3 * 3.0 * np.array([0, 4]) + 3 * 2.0 * np.array([1, 2])) / 6
    np.testing.assert_allclose(averaged, [first, second], rtol=1e-12)
    u = np.array([0.6, 0.8])
    embedding = sentence_vectors.SentenceEmbedding(VOCAB, vectors, weights, u)
    np.testing.assert_allclose(embedding.embed(tokens)[0], first - np.dot(first, u) * u, rtol=1e-12)
    with pytest.raises(ValueError, match="token ids outside"):
        embedding.embed(np.array([[5, 2]]))


def test_first_principal_component_of_centred_vectors():
    rng = np.random.default_rng(4)
    direction = np.array([3.0, 4.0, 0.0]) / 5
    data = rng.normal(size=(500, 1)) * 10 * direction + rng.normal(size=(500, 3)) * 0.1 + 100.0
    u = sentence_vectors.first_principal_component(data)
    assert abs(np.dot(u, direction)) > 0.999 and np.linalg.norm(u) == pytest.approx(1.0)
    removed = sentence_vectors.remove_component(data, u)
    np.testing.assert_allclose(removed @ u, 0.0, atol=1e-9)


def test_sentence_vector_file_round_trip_and_checks(tmp_path):
    embedding = sentence_vectors.SentenceEmbedding(
        VOCAB, np.arange(10, dtype=np.float32).reshape(5, 2), np.linspace(0, 1, 5), np.array([1.0, 0.0]),
        "test")
    path = str(tmp_path / "sv.npz")
    sentence_vectors.write(path, embedding)
    back = sentence_vectors.read(path, VOCAB)
    assert back.vocab == VOCAB and back.source == "test"
    np.testing.assert_array_equal(back.vectors, embedding.vectors)
    np.testing.assert_array_equal(back.weights, embedding.weights)
    with pytest.raises(UserError, match="vocabulary differs"):
        sentence_vectors.read(path, VOCAB[:4] + ("blue",))
    with pytest.raises(UserError, match="no sentence vectors"):
        sentence_vectors.read(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="bad.npz: malformed"):
        sentence_vectors.read(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # ~60 s on 2 cores: traces the CUB networks for training and evaluation
def test_train_and_evaluate_report_the_four_cca_coherences(cub_built, tmp_path, capsys):
    _, _, result = cub_built
    data = result.manifest.directory
    run = str(tmp_path / "run")
    overrides = ["--set", "model.latent_dim=16", "--set", "train.batch_size=16",
                 "--set", "eval.log_likelihood_samples=4", "--set", "eval.random_samples=50"]
    assert cli.main(["train", "--data", data, "--workdir", run, "--config",
                     os.path.join(REPO, "configs", "cub", "bmvae_m.yaml"), "--epochs", "1", *overrides]) == 0
    assert cli.main(["evaluate", "--workdir", run]) == 0
    metrics = json.load(open(os.path.join(run, "metrics.json")))
    scores = metrics["cca_coherence"]
    assert set(scores) == {"ground_truth", "image->caption", "caption->image", "joint"}
    assert all(np.isfinite(v) and -1.0 <= v <= 1.0 for v in scores.values())
    counts = metrics["num_examples"]["cca_coherence"]
    assert counts["train_pairs"] == 30 and counts["train_images"] == 3  # one class is validation
    assert counts["test_pairs"] == 50 and counts["prior_samples"] == 50
    # The ground truth does not involve the model: recompute it from the data alone.
    manifest = result.manifest
    embedding = sentence_vectors.read(os.path.join(data, "sentence_vectors.npz"),
                                      manifest.modality("caption").vocab)
    splits = {s: next(iter(input_pipeline.make_dataset(manifest, s, 1000))) for s in ("train", "test")}
    fitted = cca.fit_cca(splits["train"]["image"].numpy(),
                         embedding.embed(splits["train"]["caption"].numpy()))
    expected = cca.cca_score(fitted, splits["test"]["image"].numpy(),
                             embedding.embed(splits["test"]["caption"].numpy()))
    assert scores["ground_truth"] == pytest.approx(expected, abs=1e-9)
    assert metrics["skipped"]["latent_accuracy"] == "dataset 'cub' declares no label"
