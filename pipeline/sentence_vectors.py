"""Sentence vectors for CUB captions, and the file that carries them from the Beam job to
`bmvae evaluate` (DIR/sentence_vectors.npz, beside the manifest).

A caption of token ids becomes a vector as in Shi et al.'s CCA evaluation (SPEC section 6), the
smooth inverse frequency (SIF) embedding of Arora et al. (2017):

    v(s) = (1 / n_s) sum_{t <= first <eos>} a / (a + p(w_t)) * e(w_t),      a = 1e-3,
    v'(s) = v(s) - (v(s) . u) u,

where e(w) is the word's FastText vector, p(w) its unigram frequency in the train captions,
n_s the number of tokens up to and including the first <eos> (all of them without one), and
u the first principal component (unit right-singular vector) of the centred train sentence
vectors v(s). `<exc>` takes the frequency mass of all words outside the vocabulary; `<pad>` and
`<eos>` weigh 0. The special tokens' vectors are -1 (`<exc>`), 0 (`<pad>`) and +1 (`<eos>`).

This module owns the file format, like `schema` owns the manifest: the Beam writer
(`pipeline/build_cub.py`) and the evaluation read and write it only through `write` and `read`.
It lives beside the CUB pipeline, not in `bmvae_tf`, because it reads and writes files.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Mapping, Sequence

import numpy as np

from bmvae_tf import atomic
from bmvae_tf.errors import UserError

SIF_A = 1e-3
FILENAME = "sentence_vectors.npz"
EXC, PAD, EOS = 0, 1, 2
SPECIAL_VALUES = (-1.0, 0.0, 1.0)  # e(<exc>), e(<pad>), e(<eos>)


def sif_weights(counts: Mapping[str, int], vocab: Sequence[str], a: float = SIF_A) -> np.ndarray:
    """[V] float64 weights a / (a + p(w)) by token id.

    counts: every word's count in the train captions, including words outside the vocabulary
    (their total is `<exc>`'s mass). Ids 1 and 2 (`<pad>`, `<eos>`) weigh 0.
    """
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError("no word counts to weigh the vocabulary with")
    ids = {word: i for i, word in enumerate(vocab)}
    weights = np.zeros(len(vocab))
    excluded = 0
    for word, count in counts.items():
        i = ids.get(word)
        if i is None or i < 3:
            excluded += count
        else:
            weights[i] = a / (a + count / total)
    weights[EXC] = a / (a + excluded / total)
    return weights


def word_vectors(lookup: Callable[[str], np.ndarray], vocab: Sequence[str], dim: int) -> np.ndarray:
    """[V, dim] float32: the special tokens' constant vectors, then lookup(word) per word."""
    rows = [np.full(dim, value, np.float32) for value in SPECIAL_VALUES]
    rows += [np.asarray(lookup(word), np.float32).reshape(dim) for word in vocab[3:]]
    return np.stack(rows)


def weighted_average(tokens: np.ndarray, vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """v(s) for each row of tokens [N, L] int -> [N, dim] float64 (module doc)."""
    tokens = np.asarray(tokens, np.int64)
    is_eos = tokens == EOS
    has_eos = is_eos.any(axis=1)
    lengths = np.where(has_eos, is_eos.argmax(axis=1) + 1, tokens.shape[1])           # [N]
    kept = np.arange(tokens.shape[1])[None, :] < lengths[:, None]                       # [N, L]
    token_weights = np.where(kept, weights[tokens], 0.0)                                 # [N, L]
    sums = np.einsum("nl,nld->nd", token_weights, vectors[tokens].astype(np.float64))
    return sums / lengths[:, None]


def first_principal_component(sentence_vectors: np.ndarray) -> np.ndarray:
    """u [dim]: the first right-singular vector of the centred [N, dim] vectors, its sign fixed
    so that its largest-magnitude entry is positive (the projection removed does not depend
    on the sign)."""
    centred = sentence_vectors - sentence_vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    u = vt[0]
    return u * np.sign(u[np.argmax(np.abs(u))])


def remove_component(sentence_vectors: np.ndarray, u: np.ndarray) -> np.ndarray:
    """v - (v . u) u for each row of [N, dim] (u a unit vector)."""
    return sentence_vectors - np.outer(sentence_vectors @ u, u)


@dataclasses.dataclass(frozen=True)
class SentenceEmbedding:
    """Everything needed to turn token ids into sentence vectors.

    vocab: [V] token id -> word (must equal the manifest's). vectors: [V, dim] word vectors.
    weights: [V] SIF weights. principal_component: [dim] unit vector u. source: how the word
    vectors were made ("fasttext-trained" or the pretrained file's name).
    """

    vocab: tuple[str, ...]
    vectors: np.ndarray
    weights: np.ndarray
    principal_component: np.ndarray
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids [N, L] -> sentence vectors [N, dim] float64 (weighted, component removed)."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= len(self.vocab)):
            raise ValueError(f"token ids outside [0, {len(self.vocab)})")
        return remove_component(weighted_average(tokens, self.vectors, self.weights),
                                self.principal_component)


def fit(vocab: Sequence[str], vectors: np.ndarray, counts: Mapping[str, int],
        train_tokens: np.ndarray, a: float = SIF_A, source: str = "") -> SentenceEmbedding:
    """The SIF embedding: weights from `counts`, u from the train captions' tokens [N, L]."""
    weights = sif_weights(counts, vocab, a)
    u = first_principal_component(weighted_average(train_tokens, vectors, weights))
    return SentenceEmbedding(tuple(vocab), np.asarray(vectors, np.float32), weights, u, source)


def to_bytes(embedding: SentenceEmbedding) -> bytes:
    """The .npz file's bytes (plain arrays only: it loads with allow_pickle=False)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, vocab=np.array(embedding.vocab, dtype=np.str_),
                        vectors=embedding.vectors.astype(np.float32),
                        weights=embedding.weights.astype(np.float64),
                        principal_component=embedding.principal_component.astype(np.float64),
                        source=np.array(embedding.source, dtype=np.str_))
    return buffer.getvalue()


def write(path: str, embedding: SentenceEmbedding) -> None:
    """Publishes the .npz at `path` (written whole, see bmvae_tf.atomic)."""
    atomic.write_bytes(path, to_bytes(embedding))


def read(path: str, vocab: Sequence[str] | None = None) -> SentenceEmbedding:
    """Reads a file `write` wrote; UserError naming it when missing, malformed, or when its
    vocabulary differs from `vocab` (the manifest's)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise UserError(f"{path}: no sentence vectors (the dataset's manifest declares them)")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
                embedding = SentenceEmbedding(
                    vocab=tuple(str(w) for w in data["vocab"]), vectors=data["vectors"],
                    weights=data["weights"], principal_component=data["principal_component"],
                    source=str(data["source"]))
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path}: malformed sentence vectors ({e})") from None
    v = len(embedding.vocab)
    if (embedding.vectors.ndim != 2 or embedding.vectors.shape[0] != v
            or embedding.weights.shape != (v,)
            or embedding.principal_component.shape != (embedding.vectors.shape[1],)):
        raise UserError(f"{path}: array shapes disagree (vocab {v}, vectors "
                        f"{embedding.vectors.shape}, weights {embedding.weights.shape}, "
                        f"component {embedding.principal_component.shape})")
    if vocab is not None and tuple(vocab) != embedding.vocab:
        raise UserError(f"{path}: its vocabulary differs from the manifest's")
    return embedding
