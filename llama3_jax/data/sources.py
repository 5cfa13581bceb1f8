"""Documents from data sources, by random access: whole text files, JSONL lines (a field),
Parquet rows (a column), and the default corpus. Grain reads them through `__getitem__`.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import pathlib
import threading
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama3_jax.config import ConfigError, DataConfig, DataSource
from llama3_jax.data.corpus import default_corpus_files

SOURCE_KINDS = ("auto", "text", "jsonl", "parquet")


def configured_sources(data: DataConfig) -> tuple[DataSource, ...]:
    """[[data.sources]], or the one source of data.path; empty = the default corpus."""
    return (DataSource(path=data.path),) if data.path else data.sources


def resolve_kind(source: DataSource) -> str:
    """The source's kind; "auto" decides from the suffix (.jsonl/.json, .parquet, else text)."""
    kind = source.kind.lower()
    if kind != "auto":
        return kind
    suffix = pathlib.Path(source.path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _expand_paths(source: DataSource) -> list[pathlib.Path]:
    path = pathlib.Path(source.path).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob(source.glob) if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ConfigError(
                f"data source {str(path)!r} yields no documents: no files match "
                f"glob {source.glob!r} in this folder (searched recursively); add files "
                f"or change the source's `glob`")
        return files
    return [path]


class BadRow(typing.NamedTuple):
    """What a source returns for a document it cannot read (bad JSON, a missing field, text
    that is not UTF-8): the pipeline drops it, counts it and logs it once."""
    where: str  # file, file:line or file:row
    why: str
    first: bool = True  # False when an epoch loop reads the row again (set by the pipeline)


def _utf8(raw: bytes, where: str) -> str | BadRow:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(where, f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})")


class TextFiles:
    """Random-access documents: one whole UTF-8 text file each."""

    def __init__(self, paths: Sequence[pathlib.Path], replace_errors: bool = False):
        self.paths = [str(p) for p in paths]
        self.replace_errors = replace_errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str | BadRow:
        with open(self.paths[i], "rb") as f:
            raw = f.read()
        return raw.decode("utf-8", errors="replace") if self.replace_errors else _utf8(raw, self.paths[i])

    def __repr__(self) -> str:
        return f"TextFiles({len(self.paths)} files)"


def _line_spans(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the lines of a file (empty ones included, but not the
    empty tail after a final newline), read in chunks."""
    newlines = []
    size = 0
    with open(path, "rb") as f:
        while buf := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + size)
            size += len(buf)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    if ends[-1] == starts[-1]:
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


class JsonlLines:
    """Random-access documents: the `field` of each line of JSONL files."""

    def __init__(self, paths: Sequence[pathlib.Path], field: str):
        self.paths = [str(p) for p in paths]
        self.field = field
        self._starts, self._ends, self._skipped, counts = [], [], [], [0]
        for p in self.paths:
            s, e = _line_spans(p)
            # Empty and whitespace-only lines (e.g. "\r" or "  ") are no documents.
            keep = e > s
            if len(s):
                with open(p, "rb") as f:
                    for j in np.flatnonzero(keep & ((e - s) <= 8)).tolist():
                        f.seek(int(s[j]))
                        keep[j] = bool(f.read(int(e[j] - s[j])).strip())
            self._starts.append(s[keep])
            self._ends.append(e[keep])
            # Line numbers of bad rows: skipped line m (0-based) minus the m skipped before it
            # is the number of documents before it, a non-decreasing array to search.
            skipped = np.flatnonzero(~keep)
            self._skipped.append(skipped - np.arange(len(skipped)))
            counts.append(counts[-1] + int(keep.sum()))
        self._cum = counts
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        if self._cum[-1] == 0:
            where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files"
            raise ConfigError(f"JSONL data source {where} yields no documents: it has no "
                             f"non-empty lines; give a JSONL file with one JSON object per line")
        first = self[0]  # a wrong `field` fails early; other bad lines are skipped as they are read
        if isinstance(first, BadRow) and "no field" in first.why:
            raise ConfigError(f"{first.where}: {first.why}")

    def __len__(self) -> int:
        return self._cum[-1]

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_fds"] = {}
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            with self._lock:
                fd = self._fds.get(k)
                if fd is None:
                    fd = os.open(self.paths[k], os.O_RDONLY)
                    self._fds[k] = fd
        return fd

    def _line_number(self, k: int, j: int) -> int:
        """The 1-based line of document j of file k."""
        return j + 1 + int(np.searchsorted(self._skipped[k], j, side="right"))

    def __getitem__(self, i: int) -> str | BadRow:
        k = bisect.bisect_right(self._cum, i) - 1
        j = i - self._cum[k]
        start, end = int(self._starts[k][j]), int(self._ends[k][j])
        raw = os.pread(self._fd(k), end - start, start)
        where = lambda: f"{self.paths[k]}:{self._line_number(k, j)}"  # only for bad rows
        text = _utf8(raw, "")
        if isinstance(text, BadRow):
            return BadRow(where(), text.why)
        try:
            obj = json.loads(text)
        except ValueError as e:
            return BadRow(where(), f"not valid JSON ({e})")
        if not isinstance(obj, dict) or self.field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            return BadRow(where(), f"JSON line has no field {self.field!r} (found: {keys}); set the source's "
                                   "`field` to the key that holds the document text, or fix the line")
        text = obj[self.field]
        if not isinstance(text, str):
            return BadRow(where(), f"field {self.field!r} is a {type(text).__name__}, not a string")
        return text

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlLines({len(self)} lines, field={self.field!r})"


class ParquetRows:
    """Random-access documents: a string column of Parquet files (read with pyarrow).

    The column of a file is loaded on first access and kept in memory (per process).
    """

    def __init__(self, paths: Sequence[pathlib.Path], field: str):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.paths = [str(p) for p in paths]
        self.field = field
        counts = [0]
        for p in self.paths:
            try:
                meta = pq.ParquetFile(p)
            except Exception as e:  # pyarrow raises ArrowInvalid etc.
                raise ConfigError(f"{p}: cannot read as Parquet ({e}); set the source's "
                                 f"`kind` if this is not a Parquet file") from None
            names = meta.schema_arrow.names
            if field not in names:
                raise ConfigError(f"{p}: Parquet file has no column {field!r} (columns: "
                                 f"{names}); set the source's `field` to the text column")
            kind = meta.schema_arrow.field(field).type
            if not any(is_(kind) for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                             pa.types.is_large_binary, pa.types.is_null)):
                raise ConfigError(f"{p}: column {field!r} holds {kind} values, not text; set the "
                                 f"source's `field` to the text column")
            counts.append(counts[-1] + meta.metadata.num_rows)
        self._cum = counts
        self._columns: dict[int, Any] = {}
        self._lock = threading.Lock()
        if self._cum[-1] == 0:
            raise ConfigError(f"Parquet data source {self.paths[0]!r} yields no documents: "
                             f"it has no rows")

    def __len__(self) -> int:
        return self._cum[-1]

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_columns"] = {}
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _column(self, k: int):
        col = self._columns.get(k)
        if col is None:
            with self._lock:
                col = self._columns.get(k)
                if col is None:
                    import pyarrow.parquet as pq
                    col = pq.read_table(self.paths[k], columns=[self.field]).column(0)
                    col = col.combine_chunks()
                    self._columns[k] = col
        return col

    def __getitem__(self, i: int) -> str | BadRow:
        k = bisect.bisect_right(self._cum, i) - 1
        j = i - self._cum[k]
        value = self._column(k)[j]
        if not value.is_valid:
            return ""
        # Arrow does not check a string column's bytes when reading: decode them here.
        return _utf8(value.as_buffer().to_pybytes(), f"{self.paths[k]}:row {j}")

    def __repr__(self) -> str:
        return f"ParquetRows({len(self)} rows, field={self.field!r})"


def document_source(source: DataSource):
    """A random-access sequence of the source's documents (strings)."""
    check_source(source)
    kind = resolve_kind(source)
    paths = _expand_paths(source)
    if kind == "text":
        return TextFiles(paths)
    if kind == "jsonl":
        return JsonlLines(paths, source.field)
    return ParquetRows(paths, source.field)


# The share of the default corpus's files held out for evaluation (never trained on) when
# data.eval_fraction is 0.
DEFAULT_CORPUS_HELDOUT = 0.02
SPLITS = ("train", "eval")


class Subset:
    """Random-access documents: the documents of `docs` at `indices`."""

    def __init__(self, docs, indices: np.ndarray):
        self.docs, self.indices = docs, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.docs[int(self.indices[i])]

    @property
    def paths(self) -> list[str]:
        """The files its documents come from."""
        paths = getattr(self.docs, "paths", [])
        return [paths[i] for i in self.indices] if isinstance(self.docs, TextFiles) else paths

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.docs!r})"


def heldout_mask(n: int, fraction: float) -> np.ndarray:
    """Which of n documents are held out: a fixed pseudo-random choice of round(fraction x n)
    (at least one when fraction > 0 and n > 1), the same on every run and machine."""
    held = np.zeros(n, bool)
    k = min(max(round(fraction * n), 1 if fraction > 0 and n > 1 else 0), n - 1)
    held[np.random.default_rng(20240723).permutation(n)[:k]] = True
    return held


def _split(docs, fraction: float, split: str):
    """The training or held-out part of a source's documents (None: no held-out part)."""
    if fraction == 0:
        return docs if split == "train" else None
    held = heldout_mask(len(docs), fraction)
    idx = np.flatnonzero(held if split == "eval" else ~held)
    return Subset(docs, idx) if len(idx) else None


def open_sources(data: DataConfig, split: str = "train") -> list[tuple[str, object, float]]:
    """(name, documents, weight) of every configured source (each file indexed once), or
    of the default corpus when none is configured; `split` "eval": the held-out documents
    (data.eval_sources, else data.eval_fraction of each source; sources without any left out)."""
    assert split in SPLITS, split
    if not configured_sources(data):
        held = data.eval_fraction or DEFAULT_CORPUS_HELDOUT
        parts = [("<default corpus>", _split(_default_corpus_source(), held, split), 1.0)]
    elif split == "eval" and data.eval_sources:
        return [(s.path, document_source(s), float(s.weight)) for s in data.eval_sources]
    else:
        parts = [(s.path, _split(document_source(s), data.eval_fraction, split), float(s.weight))
                 for s in configured_sources(data)]
    return [p for p in parts if p[1] is not None]


def _default_corpus_source():
    # Empty files (package __init__.py) would be documents of BOS and EOS alone.
    files = [f for f in default_corpus_files() if f.stat().st_size > 0]
    if not files:
        raise ConfigError("the default corpus is empty: this Python has no standard library "
                          ".py sources; set [data] sources to your own text/JSONL/Parquet data")
    # The standard library keeps a few test files in other encodings on purpose; the
    # embedded corpus reads them with replacement characters rather than report them.
    return TextFiles(files, replace_errors=True)


def check_data(data: DataConfig, global_batch: int, process_count: int = 1) -> None:
    """The data settings against the batch and the processes, and each source's entry
    (weight, kind, path). What the files hold is checked when they are read."""
    if data.seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {data.seq_len}")
    if process_count <= 0:
        raise ConfigError(f"the process count must be positive, got {process_count}")
    if global_batch <= 0:
        raise ConfigError(f"train.global_batch must be positive, got {global_batch}")
    if global_batch % process_count:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by the number of processes "
                          f"({process_count}); pick a global batch that is a multiple of {process_count}")
    shards = data.shards or process_count
    if data.shards < 0 or shards % process_count or global_batch % shards:
        raise ConfigError(f"data.shards={shards} must be a multiple of the {process_count} process(es) and "
                          f"divide train.global_batch={global_batch}")
    if not 0 <= data.max_bad_row_fraction <= 1:
        raise ConfigError(f"data.max_bad_row_fraction must be in [0, 1] (1 = never stop for bad rows), "
                          f"got {data.max_bad_row_fraction}")
    if data.path and data.sources:
        raise ConfigError("set data.path (one source) or [[data.sources]], not both")
    if not 0 <= data.eval_fraction <= 0.5:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be in [0, 0.5] (the share of each source's "
                          "documents held out for evaluation)")
    if data.eval_fraction and data.eval_sources:
        raise ConfigError("set data.eval_sources (held-out files) or data.eval_fraction (held out from each source), "
                          "not both")
    if data.anneal_steps < 0 or bool(data.anneal_steps) != bool(data.anneal_sources):
        raise ConfigError("annealing needs both data.anneal_steps (the last steps, > 0) and [[data.anneal_sources]] "
                          f"(their mix); got anneal_steps={data.anneal_steps} and {len(data.anneal_sources)} source(s)")
    for source in configured_sources(data) + tuple(data.eval_sources) + tuple(data.anneal_sources):
        check_source(source)


def check_source(s: DataSource) -> None:
    """One [[data.sources]] entry: a positive weight, a known kind, a path that exists."""
    w = s.weight
    if not math.isfinite(w) or w <= 0:
        raise ConfigError(f"data source {s.path!r}: weight must be a positive number, got {w!r}; drop the "
                          "source instead of giving it weight 0")
    if s.kind.lower() not in SOURCE_KINDS:
        raise ConfigError(f"data source {s.path!r}: unknown kind {s.kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    path = pathlib.Path(s.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data source path {str(path)!r} does not exist; fix `path` of this entry in [data] sources "
            "(or leave `sources` empty to train on the default corpus)")
