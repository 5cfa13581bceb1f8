"""The token-distribution KL filter of the Llama 3 paper: documents whose unit distribution
is far from the training corpus's (KL divergence) hold too many outlier tokens. datatrove has
no such step, so it is three of ours, fitted into the passes:

1. `KLCount`, at the end of the second pass (after dedup, domain and language): counts each
   task's units per category (the documents' metadata "domain") and writes them;
2. `KLMerge`, one task: sums the tasks' counts into each category's corpus distribution;
3. `KLFilter`, in the last pass after the dirty-word filter: scores each document with
   KL(doc || corpus) in nats, stores it (metadata "kl") and removes documents above
   `threshold`; each task writes a histogram of the scores for the report's quantiles.

A document is compared with its own category's corpus (code and prose are other token
worlds). With c the document's unit counts (n in all), p = c / n, and C the category's counts
(N in all, V distinct units), q = (C + alpha) / (N + alpha * (V + 1)) (add-alpha smoothing over
the corpus's units and one unseen unit), and KL = sum over the document's units of
p log(p / q). The corpus includes the document itself, and is counted before line dedup and
the last pass's filters (their removals barely move it).

Units: "words" are the filters' regex words (runs of letters and digits, or of symbols),
lower-cased and cut into pieces of at most 16 characters (a base64 or hex blob weighs by its
length), hashed into 2^20 buckets; "tokens" are the pipeline tokenizer's ids.
"""

from __future__ import annotations

import json

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.hashing import HashConfig, create_hash_func

from llama3_jax.curate.steps import RegexWords

KEY = "kl"
WORD_BUCKETS = 1 << 20
PIECE = 16  # characters
BIN = 0.01  # nats: the width of the histogram bins the report's quantiles come from
QUANTILES = (0.5, 0.9, 0.99, 0.999)
FLUSH = 1 << 21  # units gathered before they are added to a task's counts


class Units:
    """A text's units as int64 ids: hashed word pieces, or the tokenizer's ids (`counter`,
    a `steps.TokenCounter`)."""

    def __init__(self, kind: str, counter=None):
        self.kind, self.counter, self.hash = kind, counter, None

    def __getstate__(self):
        return dict(self.__dict__, hash=None)

    def __call__(self, text: str) -> np.ndarray:
        if self.kind == "tokens":
            return np.asarray(self.counter.ids(text), np.int64)
        if self.hash is None:
            self.hash = create_hash_func(HashConfig(precision=64, hash_fc="xxhash"))
        h = self.hash
        return np.fromiter((h(w[i:i + PIECE]) % WORD_BUCKETS for w in RegexWords.WORDS.findall(text.lower())
                            for i in range(0, len(w), PIECE)), np.int64)


def divergence(units: np.ndarray, ids: np.ndarray, counts: np.ndarray, total: int, alpha: float) -> float:
    """KL(doc || corpus) in nats of a document's `units` against a corpus of sorted distinct
    `ids` (at least one) with `counts` summing to `total` (the module docstring's formula)."""
    u, c = np.unique(units, return_counts=True)
    p = c / c.sum()
    at = np.minimum(np.searchsorted(ids, u), len(ids) - 1)
    q = (np.where(ids[at] == u, counts[at], 0) + alpha) / (total + alpha * (len(ids) + 1))
    return float(np.sum(p * np.log(p / q)))


def category(doc) -> str:
    return doc.metadata.get("domain", "general")


def load_corpus(folder) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """{category: (sorted ids, counts, total)} of the merge's corpus.npz, non-empty ones only."""
    out = {}
    with folder.open("corpus.npz", "rb") as f, np.load(f) as z:
        for d in (k.removesuffix(".ids") for k in z.files if k.endswith(".ids")):
            ids, counts = z[f"{d}.ids"], z[f"{d}.counts"]
            if len(ids):
                out[d] = (ids, counts, int(counts.sum()))
    return out


class KLCount(PipelineStep):
    type = "🔢 - TOKENS"
    name = "📐 kl: count"

    def __init__(self, folder, units: Units, domains):
        super().__init__()
        self.folder, self.units, self.domains = get_datafolder(folder), units, frozenset(domains)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        totals: dict[str, np.ndarray] = {}
        pending: dict[str, list] = {}
        size = 0

        def flush():
            for d, chunks in pending.items():
                b = np.bincount(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64)
                acc = totals.get(d, np.zeros(0, np.int64))
                if len(b) > len(acc):
                    acc = np.pad(acc, (0, len(b) - len(acc)))
                acc[:len(b)] += b
                totals[d] = acc
            pending.clear()

        for doc in data:
            if category(doc) in self.domains:
                pending.setdefault(category(doc), []).append(self.units(doc.text))
                size += len(pending[category(doc)][-1])
                self.stat_update(f"docs_{category(doc)}")
                if size > FLUSH:
                    flush()
                    size = 0
            yield doc
        flush()
        arrays = {}
        for d, acc in totals.items():
            ids = np.flatnonzero(acc)
            arrays[f"{d}.ids"], arrays[f"{d}.counts"] = ids.astype(np.int64), acc[ids]
        with self.folder.open(f"counts/{rank:05d}.npz", "wb") as f:
            np.savez(f, **arrays)


class KLMerge(PipelineStep):
    type = "🔢 - TOKENS"
    name = "📐 kl: merge"

    def __init__(self, folder):
        super().__init__()
        self.folder = get_datafolder(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        totals: dict[str, np.ndarray] = {}  # dense per category: ids are < 2^20 or the vocabulary
        for name in self.folder.list_files("counts", glob_pattern="*.npz"):
            with self.folder.open(name, "rb") as f, np.load(f) as z:
                for d in (k.removesuffix(".ids") for k in z.files if k.endswith(".ids")):
                    ids, acc = z[f"{d}.ids"], totals.get(d, np.zeros(0, np.int64))
                    if len(ids) and ids[-1] >= len(acc):  # sorted
                        acc = np.pad(acc, (0, int(ids[-1]) + 1 - len(acc)))
                    acc[ids] += z[f"{d}.counts"]  # a task's ids are distinct
                    totals[d] = acc
        arrays, reference = {}, {}
        for d, acc in sorted(totals.items()):
            ids = np.flatnonzero(acc)
            arrays[f"{d}.ids"], arrays[f"{d}.counts"] = ids.astype(np.int64), acc[ids]
            reference[d] = {"units": int(acc.sum()), "distinct": len(ids)}
        with self.folder.open("corpus.npz", "wb") as f:
            np.savez(f, **arrays)
        with self.folder.open("corpus.json", "w") as f:
            json.dump(reference, f)
        return
        yield  # a generator, like every step


class KLFilter(BaseFilter):
    """Scores the documents of `domains` (metadata "kl") and removes those above `threshold`
    (0: scores only); a document without units, or of a category with no corpus, passes."""

    name = "📐 kl: filter"

    def __init__(self, folder, units: Units, threshold: float, alpha: float, domains, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.folder, self.units, self.threshold, self.alpha = get_datafolder(folder), units, threshold, alpha
        self.domains, self.corpus, self.hist = frozenset(domains), None, {}

    def __getstate__(self):
        return dict(self.__dict__, corpus=None, hist={})

    def filter(self, doc):
        d = category(doc)
        if d not in self.domains:
            return True
        if self.corpus is None:
            self.corpus = load_corpus(self.folder)
        units = self.units(doc.text)
        if d not in self.corpus or not len(units):
            return True
        kl = divergence(units, *self.corpus[d], self.alpha)
        doc.metadata[KEY] = round(kl, 4)
        h = self.hist.setdefault(d, {"bins": {}, "max": 0.0, "removed": 0})
        b = str(int(max(kl, 0.0) / BIN))
        h["bins"][b] = h["bins"].get(b, 0) + 1
        h["max"] = max(h["max"], kl)
        if self.threshold and kl > self.threshold:
            h["removed"] += 1
            return False, "kl_divergence"
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.hist = {}
        yield from super().run(data, rank, world_size)
        with self.folder.open(f"scores/{rank:05d}.json", "w") as f:
            json.dump(self.hist, f)


def summary(folder, cfg) -> dict:
    """The report's view of the scores: per category the corpus size, documents scored and
    removed, quantiles (to the histogram's 0.01 nats, rounded up) and the largest score."""
    folder = get_datafolder(folder)
    reference = {}
    if folder.exists("corpus.json"):
        with folder.open("corpus.json", "r") as f:
            reference = json.load(f)
    merged: dict[str, dict] = {}
    for name in folder.list_files("scores", glob_pattern="*.json"):
        with folder.open(name, "r") as f:
            for d, h in json.load(f).items():
                m = merged.setdefault(d, {"bins": {}, "max": 0.0, "removed": 0})
                for b, n in h["bins"].items():
                    m["bins"][int(b)] = m["bins"].get(int(b), 0) + n
                m["max"], m["removed"] = max(m["max"], h["max"]), m["removed"] + h["removed"]
    out = {}
    for d in sorted(set(reference) | set(merged)):
        m = merged.get(d, {"bins": {}, "max": 0.0, "removed": 0})
        bins = sorted(m["bins"].items())
        edges = np.array([b for b, _ in bins], np.int64)
        cum = np.cumsum([n for _, n in bins])
        n = int(cum[-1]) if len(cum) else 0
        quantiles = {}  # the upper edge of the bin that holds the ceil(p * n)-th score
        for p in QUANTILES if n else ():
            quantiles[str(p)] = round((int(edges[np.searchsorted(cum, p * n)]) + 1) * BIN, 2)
        out[d] = {"corpus_units": reference.get(d, {}).get("units", 0),
                  "corpus_distinct": reference.get(d, {}).get("distinct", 0), "docs": n, "removed": m["removed"],
                  "quantiles": quantiles, "max": round(m["max"], 4)}
    return {"unit": cfg.unit, "threshold": cfg.threshold, "smoothing": cfg.smoothing, "by_domain": out}
