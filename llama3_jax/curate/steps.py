"""Pipeline steps that datatrove lacks, as datatrove `PipelineStep`/`BaseFilter` subclasses:
`Part` (counts and times one stage's share of a task), token counts, domain scoping, the
dirty-word list, language id on py3langid, the domain labels, the quality score, and
writers that always leave one file per task."""

from __future__ import annotations

import json
import re
import time

from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from llama3_jax.curate import domain as rules
from llama3_jax.curate import quality

TOKENS = "token_count"  # the metadata key datatrove's own doc stats read


class RegexWords(WordTokenizer):
    """Words as runs of letters and digits or of symbols (about what NLTK's word tokenizer
    gives these filters), without the NLTK or spaCy data datatrove would otherwise load."""

    WORDS = re.compile(r"\w+|[^\w\s]+")
    SENTENCES = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")

    def __init__(self):
        super().__init__("xx")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORDS.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self.SENTENCES.finditer(text) if m.group().strip()]

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text)]


class TokenCounter:
    """Token counts with a tiktoken file (the Llama 3 tokenizer or our default BPE), loaded
    once per process on first use."""

    def __init__(self, path: str):
        self.path, self.tok = str(path), None

    def __getstate__(self):
        return {"path": self.path, "tok": None}

    def __call__(self, text: str) -> int:
        return len(self.ids(text))

    def ids(self, text: str) -> list[int]:
        if self.tok is None:
            from llama3_jax.formats.tokenizer import Tokenizer
            self.tok = Tokenizer(self.path)
        return self.tok.encode(text)


class CountTokens(PipelineStep):
    type = "🔢 - TOKENS"
    name = "count tokens"

    def __init__(self, counter: TokenCounter):
        super().__init__()
        self.counter = counter

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.metadata[TOKENS] = self.counter(doc.text)
            yield doc


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def add_since(acc: list, since: tuple[float, float]) -> list:
    now = clocks()
    acc[0] += now[0] - since[0]
    acc[1] += now[1] - since[1]
    return acc


def tokens_of(doc) -> int:
    return int(doc.metadata.get(TOKENS, 0))


class Part(PipelineStep):
    """One stage's share of a task: runs `steps` on the stream and writes to
    `folder/<stage>/<job>/<rank>.json` the documents, tokens and bytes that went in and came
    out, the wall and CPU seconds spent in the steps alone (not up- or downstream), out-document counts
    by metadata `label`, how many out-documents have metadata `cluster_key` > 0, and the
    steps' datatrove stats (a filter's `dropped_<reason>` counts). `source`: the first step
    reads documents (what comes in is what it read)."""

    type = "📊 - CURATE"

    def __init__(self, stage: str, job: str, steps: list, folder, source: bool = False, label: str = "",
                 cluster_key: str = ""):
        self.name = f"{stage}/{job}"
        super().__init__()
        self.stage, self.job, self.steps, self.source = stage, job, steps, source
        self.folder = get_datafolder(folder)
        self.label, self.cluster_key = label, cluster_key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        c = {"docs_in": 0, "tokens_in": 0, "bytes_in": 0, "docs_out": 0, "tokens_out": 0, "bytes_out": 0,
             "clustered": 0}
        labels: dict[str, dict[str, int]] = {}
        # [wall, CPU] seconds: CPU time is what other tenants of a busy machine do not inflate
        up, down = [0.0, 0.0], [0.0, 0.0]

        def feed():
            it = iter(data or ())
            while True:
                t = clocks()
                doc = next(it, None)
                add_since(up, t)
                if doc is None:
                    return
                c["docs_in"] += 1
                c["tokens_in"] += tokens_of(doc)
                c["bytes_in"] += len(doc.text.encode())
                yield doc

        start = clocks()
        out = None if self.source or data is None else feed()
        for step in self.steps:
            out = step(out, rank, world_size)
        for doc in out or ():
            n = tokens_of(doc)
            c["docs_out"] += 1
            c["tokens_out"] += n
            c["bytes_out"] += len(doc.text.encode())
            if self.cluster_key and doc.metadata.get(self.cluster_key, 0) > 0:
                c["clustered"] += 1
            if self.label:
                entry = labels.setdefault(str(doc.metadata.get(self.label, "")), {"docs": 0, "tokens": 0})
                entry["docs"] += 1
                entry["tokens"] += n
            t = clocks()
            yield doc
            add_since(down, t)
        if self.source:
            c.update(docs_in=c["docs_out"], tokens_in=c["tokens_out"], bytes_in=c["bytes_out"])
        stats: dict[str, dict] = {}
        for step in self.steps:
            for key, m in step.stats.stats.items():
                s = stats.setdefault(key, {"total": 0, "n": 0})
                s["total"] += m.total
                s["n"] += m.n
        total = add_since([0.0, 0.0], start)
        record = dict(c, seconds=total[0] - up[0] - down[0], cpu_seconds=total[1] - up[1] - down[1], labels=labels,
                      stats=stats, rank=rank)
        with self.folder.open(f"{self.stage}/{self.job}/{rank:05d}.json", "w") as f:
            json.dump(record, f)


class InDomains(BaseFilter):
    """A datatrove filter applied only to documents whose metadata "domain" is in `domains`
    (a document without one is "general"); the others pass untouched."""

    def __init__(self, inner: BaseFilter, domains, exclusion_writer=None):
        self.name = inner.name
        super().__init__(exclusion_writer)
        self.inner, self.domains = inner, frozenset(domains)

    def filter(self, doc):
        if doc.metadata.get("domain", "general") not in self.domains:
            return True
        return self.inner.filter(doc)


class GopherQuality(GopherQualityFilter):
    """datatrove's Gopher quality rules, with a document of no words removed as such rather
    than dividing by zero."""

    ALNUM = re.compile(r"[^\W_]")

    def filter(self, doc):
        if not self.ALNUM.search(doc.text):
            return False, "no_words"
        return super().filter(doc)


class DirtyWords(BaseFilter):
    """Removes documents where words of the list make up more than `max_fraction` of the words."""

    name = "🔞 dirty words"
    WORDS = re.compile(r"\w+")

    def __init__(self, words, max_fraction: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.words, self.max_fraction = frozenset(w.lower() for w in words), max_fraction

    def filter(self, doc):
        words = self.WORDS.findall(doc.text.lower())
        hits = sum(w in self.words for w in words)
        return hits <= self.max_fraction * len(words) or (False, "dirty_words")


def label_language(doc, max_chars: int) -> tuple[str, float]:
    """The document's language and score, from metadata or else py3langid (then stored)."""
    if "language" not in doc.metadata:
        lang, score = rules.identify_language(doc.text, max_chars)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
    return doc.metadata["language"], float(doc.metadata.get("language_score", 1.0))


class Language(BaseFilter):
    """Labels every document's language (metadata "language", "language_score") with
    py3langid, whose model ships with it (datatrove's LanguageFilter downloads fastText's),
    and in `domains` keeps the `keep` languages (all if empty) scoring at least `min_score`."""

    name = "🌍 language (py3langid)"

    def __init__(self, keep, min_score: float, max_chars: int, domains, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep, self.min_score, self.max_chars = frozenset(keep), min_score, max_chars
        self.domains = frozenset(domains)

    def filter(self, doc):
        lang, score = label_language(doc, self.max_chars)
        if doc.metadata.get("domain", "general") not in self.domains:
            return True
        if self.keep and lang not in self.keep:
            return False, "other_language"
        return score >= self.min_score or (False, "low_language_score")


class Domain(PipelineStep):
    """Labels each document's mix category (metadata "domain"), by the rules of `curate.domain`."""

    type = "🏷 - LABEL"
    name = "🏷 domain (rules)"

    def __init__(self, primary_languages, code_min_lines: float, math_min_score: float, max_chars: int):
        super().__init__()
        self.primary, self.code_min, self.math_min = tuple(primary_languages), code_min_lines, math_min_score
        self.max_chars = max_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            lang, _ = label_language(doc, self.max_chars)
            doc.metadata["domain"] = rules.classify(doc.text, lang, self.primary, self.code_min, self.math_min)
            self.stat_update(doc.metadata["domain"])
            yield doc


class Quality(BaseFilter):
    """Scores documents with our quality classifier (metadata "quality", in [0, 1]) and
    removes those below `threshold` (0: scores only)."""

    name = "⭐ quality (hashed n-gram logistic regression)"

    def __init__(self, model_path: str, threshold: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.model_path, self.threshold, self.model = str(model_path), threshold, None

    def __getstate__(self):
        return dict(self.__dict__, model=None)

    def filter(self, doc):
        if self.model is None:
            self.model = quality.load(self.model_path)
        score = float(quality.scores(self.model, [doc.text])[0])
        doc.metadata["quality"] = round(score, 4)
        return score >= self.threshold or (False, "low_quality")


class Finish(PipelineStep):
    """The last step before the output: every document gets a category."""

    type = "🏁 - FINISH"
    name = "finish"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.metadata.setdefault("domain", "general")
            yield doc


class TaskFileWriter(JsonlWriter):
    """Uncompressed JSONL, one file per task (`<rank>.jsonl`), written even when the task has
    no documents: the next pass then splits the files across its tasks as this one did."""

    def __init__(self, folder):
        super().__init__(folder, output_filename="${rank}.jsonl", compression=None)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        n = 0
        for doc in super().run(data, rank, world_size):
            n += 1
            yield doc
        if n == 0:
            self.output_folder.open(f"{rank:05d}.jsonl", "wb").close()
