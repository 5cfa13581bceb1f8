"""The quality classifier: logistic regression on hashed word 1- and 2-grams, in numpy.

Positives are "reference quality" text (the paper uses Wikipedia-referenced pages), negatives
random web text. A document's features are its n-grams hashed (CRC32, stable across
processes) into `dim` buckets, log(1 + count), L2-normalised. Training is
full-batch Adam on the class-balanced logistic loss with L2 regularisation. The model is a
.npz file: weights, bias, dim, ngram.

    python -m llama3_jax.curate train-quality --positives P --negatives N --out model.npz
"""

from __future__ import annotations

import re
import zlib

import numpy as np

WORD = re.compile(r"\w+")
DIM = 1 << 18


def features(text: str, dim: int = DIM, ngram: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of one document: sparse, L2-normalised."""
    words = WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for n in range(1, ngram + 1) for i in range(len(words) - n + 1)]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    h = np.fromiter((zlib.crc32(g.encode()) for g in grams), np.int64, len(grams))
    idx, counts = np.unique(h % dim, return_counts=True)
    vals = np.log1p(counts)
    return idx, (vals / np.linalg.norm(vals)).astype(np.float32)


def design(texts, dim: int = DIM, ngram: int = 2):
    """Sparse rows of `texts`: (row of each entry, bucket, value)."""
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        c, v = features(t, dim, ngram)
        rows.append(np.full(len(c), i, np.int64))
        cols.append(c)
        vals.append(v)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    return cat(rows, np.int64), cat(cols, np.int64), cat(vals, np.float32)


def train(positives, negatives, dim: int = DIM, ngram: int = 2, steps: int = 300, lr: float = 0.1,
          l2: float = 1e-4) -> dict:
    """A model (dict of arrays) separating `positives` (label 1) from `negatives` (label 0)."""
    texts = list(positives) + list(negatives)
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    n = len(texts)
    rows, cols, vals = design(texts, dim, ngram)
    weight = np.where(y == 1, 0.5 / max(len(positives), 1), 0.5 / max(len(negatives), 1))  # balanced
    w, b = np.zeros(dim), 0.0
    m, v, mb, vb = np.zeros(dim), np.zeros(dim), 0.0, 0.0
    for t in range(1, steps + 1):
        z = np.bincount(rows, weights=vals * w[cols], minlength=n) + b
        r = (1 / (1 + np.exp(-z)) - y) * weight  # d loss / d z
        g = np.bincount(cols, weights=vals * r[rows], minlength=dim) + l2 * w
        gb = r.sum()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        b -= lr * (mb / (1 - 0.9 ** t)) / (np.sqrt(vb / (1 - 0.999 ** t)) + 1e-8)
    model = {"weights": w.astype(np.float32), "bias": np.float32(b), "dim": np.int64(dim), "ngram": np.int64(ngram)}
    model["train_accuracy"] = np.float32(np.mean((scores(model, texts) >= 0.5) == (y == 1)))
    return model


def scores(model: dict, texts) -> np.ndarray:
    """P(reference quality) of each text."""
    texts = list(texts)
    rows, cols, vals = design(texts, int(model["dim"]), int(model["ngram"]))
    z = np.bincount(rows, weights=vals * model["weights"][cols], minlength=len(texts)) + float(model["bias"])
    return 1 / (1 + np.exp(-z))


def save(model: dict, path) -> None:
    with open(path, "wb") as f:  # np.savez would add ".npz" to a path without it
        np.savez(f, **model)


def load(path) -> dict:
    with np.load(path) as z:
        missing = {"weights", "bias", "dim", "ngram"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not a quality model (no {', '.join(sorted(missing))}); "
                             f"train one with python -m llama3_jax.curate train-quality")
        return {k: z[k] for k in z.files}
