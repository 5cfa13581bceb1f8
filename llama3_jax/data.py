"""Training data: read documents, tokenize, pack into rows, mix sources, batch.

The pipeline is built from Grain datasets (`grain.MapDataset` / `grain.IterDataset`):

    per source:  documents (random access: files, JSONL lines, Parquet rows)
                 -> this process's shard (every process_count-th document)
                 -> shuffle(seed)  -> repeat()       (reshuffled every epoch)
                 -> map(tokenize)                    (optionally in threads)
                 -> ConcatThenSplit packing into rows of seq_len tokens
    all sources: IterDataset.mix(rows, weights)     (rows are full, so the weights
                                                      are shares of *tokens*)
                 -> batch(rows per process)          -> numpy dict
                 -> optional worker processes (mp_prefetch) / background thread

Every document is encoded with BOS and EOS. A packed row holds pieces of one or more
documents; `segment_ids` number the pieces 1, 2, ... (0 = padding) and `positions`
restart at 0 at each piece, so attention restricted to equal segment ids never crosses
a document boundary. A document longer than a row continues in the next row as a new
segment. `targets` are the next token *of the same document* (also across a row break,
since targets are packed alongside tokens); `loss_mask` is 0 on a document's last
token (EOS, whose successor belongs to another document) and on padding.

The iterator is checkpointable: `get_state()` is a JSON-serialisable dict and
`set_state()` on a fresh iterator built with the same arguments resumes exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama3_jax.config import DataConfig, DataSource
from llama3_jax.corpus import default_corpus_files

__all__ = ["DataIterator", "make_iterator", "resolve_kind", "document_source",
           "encode_document"]

KINDS = ("auto", "text", "jsonl", "parquet")
_STATE_VERSION = 1
# Seeds of different sources are spread apart so their shuffles are unrelated
# (Grain reshuffles epoch e of a source with seed + e).
_SOURCE_SEED_STRIDE = 1_000_003


# --------------------------------------------------------------------------- sources


def resolve_kind(source: DataSource) -> str:
    """The source's kind; "auto" decides from the suffix (.jsonl/.json, .parquet, else text)."""
    kind = source.kind.lower()
    if kind not in KINDS:
        raise ValueError(f"data source {source.path!r}: unknown kind {source.kind!r}; "
                         f"use one of {', '.join(KINDS)}")
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
    if not path.exists():
        raise FileNotFoundError(
            f"data source path {str(path)!r} does not exist; fix `path` of this entry in "
            f"[data] sources (or leave `sources` empty to train on the default corpus)")
    if path.is_dir():
        files = sorted((p for p in path.rglob(source.glob) if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(
                f"data source {str(path)!r} yields no documents: no files match "
                f"glob {source.glob!r} in this folder (searched recursively); add files "
                f"or change the source's `glob`")
        return files
    return [path]


class TextFiles:
    """Random-access documents: one whole UTF-8 text file each."""

    def __init__(self, paths: Sequence[pathlib.Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        with open(self.paths[i], encoding="utf-8", errors="replace") as f:
            return f.read()

    def __repr__(self) -> str:
        return f"TextFiles({len(self.paths)} files)"


def _line_spans(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-empty lines of a file, read in chunks."""
    newlines = []
    size = 0
    with open(path, "rb") as f:
        while buf := f.read(chunk):
            newlines.append(np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + size)
            size += len(buf)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    keep = ends > starts
    return starts[keep], ends[keep]


class JsonlLines:
    """Random-access documents: the `field` of each line of JSONL files."""

    def __init__(self, paths: Sequence[pathlib.Path], field: str):
        self.paths = [str(p) for p in paths]
        self.field = field
        self._starts, self._ends, counts = [], [], [0]
        for p in self.paths:
            s, e = _line_spans(p)
            # Whitespace-only lines (e.g. "\r" or "  ") are no documents either.
            keep = np.ones(len(s), bool)
            if len(s):
                with open(p, "rb") as f:
                    for j in np.flatnonzero((e - s) <= 8).tolist():
                        f.seek(int(s[j]))
                        keep[j] = bool(f.read(int(e[j] - s[j])).strip())
            self._starts.append(s[keep])
            self._ends.append(e[keep])
            counts.append(counts[-1] + int(keep.sum()))
        self._cum = counts
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        if self._cum[-1] == 0:
            where = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files"
            raise ValueError(f"JSONL data source {where} yields no documents: it has no "
                             f"non-empty lines; give a JSONL file with one JSON object per line")
        self[0]  # Fail early on a wrong `field` (other lines are checked as they are read).

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

    def _line_number(self, k: int, start: int) -> int:
        with open(self.paths[k], "rb") as f:
            return f.read(start).count(b"\n") + 1

    def __getitem__(self, i: int) -> str:
        k = bisect.bisect_right(self._cum, i) - 1
        j = i - self._cum[k]
        start, end = int(self._starts[k][j]), int(self._ends[k][j])
        raw = os.pread(self._fd(k), end - start, start)
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{self.paths[k]}:{self._line_number(k, start)}: not valid JSON "
                             f"({e}); JSONL sources need one JSON object per line") from None
        if not isinstance(obj, dict) or self.field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(
                f"{self.paths[k]}:{self._line_number(k, start)}: JSON line has no field "
                f"{self.field!r} (found: {keys}); set the source's `field` to the key that "
                f"holds the document text, or fix the line")
        text = obj[self.field]
        if not isinstance(text, str):
            raise ValueError(f"{self.paths[k]}:{self._line_number(k, start)}: field "
                             f"{self.field!r} is a {type(text).__name__}, not a string")
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
        import pyarrow.parquet as pq
        self.paths = [str(p) for p in paths]
        self.field = field
        counts = [0]
        for p in self.paths:
            try:
                meta = pq.ParquetFile(p)
            except Exception as e:  # pyarrow raises ArrowInvalid etc.
                raise ValueError(f"{p}: cannot read as Parquet ({e}); set the source's "
                                 f"`kind` if this is not a Parquet file") from None
            names = meta.schema_arrow.names
            if field not in names:
                raise ValueError(f"{p}: Parquet file has no column {field!r} (columns: "
                                 f"{names}); set the source's `field` to the text column")
            counts.append(counts[-1] + meta.metadata.num_rows)
        self._cum = counts
        self._columns: dict[int, Any] = {}
        self._lock = threading.Lock()
        if self._cum[-1] == 0:
            raise ValueError(f"Parquet data source {self.paths[0]!r} yields no documents: "
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

    def __getitem__(self, i: int) -> str:
        k = bisect.bisect_right(self._cum, i) - 1
        text = self._column(k)[i - self._cum[k]].as_py()
        if text is None:
            return ""
        if isinstance(text, bytes):
            return text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise ValueError(f"{self.paths[k]}: column {self.field!r} holds "
                             f"{type(text).__name__} values, not text")
        return text

    def __repr__(self) -> str:
        return f"ParquetRows({len(self)} rows, field={self.field!r})"


def document_source(source: DataSource):
    """A random-access sequence of the source's documents (strings)."""
    kind = resolve_kind(source)
    paths = _expand_paths(source)
    if kind == "text":
        return TextFiles(paths)
    if kind == "jsonl":
        return JsonlLines(paths, source.field)
    return ParquetRows(paths, source.field)


def _default_corpus_source():
    files = default_corpus_files()
    if not files:
        raise ValueError("the default corpus is empty: this Python has no standard library "
                         ".py sources; set [data] sources to your own text/JSONL/Parquet data")
    return TextFiles(files)


# ----------------------------------------------------------------------- tokenization


class _Encode:
    """Document text -> {"x": int32 [n, 2]} with columns (token, next token or -1)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        return {"x": encode_document(self.tokenizer, text)}


def encode_document(tokenizer, text: str) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("tokenizer.encode returned no tokens for a document")
    x = np.empty((len(ids), 2), np.int32)
    x[:, 0] = ids
    x[:-1, 1] = ids[1:]
    x[-1, 1] = -1  # the document's last token has no next token in this document
    return x


def _pack_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": row["x"], "segment_ids": row["x_segment_ids"],
            "positions": row["x_positions"]}


class _MakeBatch:
    """Rows -> the batch dict; a short final batch (epoch_loop=False) is padded with empty rows."""

    def __init__(self, rows: int, seq_len: int):
        self.rows, self.seq_len = rows, seq_len

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        x = np.zeros((self.rows, self.seq_len, 2), np.int32)
        seg = np.zeros((self.rows, self.seq_len), np.int32)
        pos = np.zeros((self.rows, self.seq_len), np.int32)
        for i, r in enumerate(rows):
            x[i] = r["x"]
            seg[i] = r["segment_ids"]
            pos[i] = r["positions"]
        nxt = x[..., 1]
        valid = (nxt >= 0) & (seg > 0)
        return {
            "tokens": np.ascontiguousarray(x[..., 0]),
            "targets": np.where(valid, nxt, 0).astype(np.int32),
            "segment_ids": seg,
            "positions": pos,
            "loss_mask": valid.astype(np.float32),
        }


# ------------------------------------------------------------------------- the state


def _to_json(obj):
    """Grain state -> JSON-safe (tuples, numpy scalars/arrays and non-str keys tagged)."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v) for k, v in obj.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"data iterator state holds a {type(obj).__name__}, not JSON-serialisable")


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_from_json(k): _from_json(v) for k, v in obj["__items__"]}
        if set(obj) == {"__ndarray__", "dtype"}:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


# ------------------------------------------------------------------------ the iterator


class DataIterator:
    """Batches for this process: dict of numpy arrays, each [rows, seq_len].

    Keys: tokens, targets, segment_ids, positions (int32) and loss_mask (float32).
    """

    def __init__(self, dataset, *, rows: int, seq_len: int, identity: dict):
        self._dataset = dataset
        self._it = iter(dataset)
        self.rows = rows
        self.seq_len = seq_len
        self._identity = identity

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def next(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        """JSON-serialisable position in the stream (after the batches returned so far)."""
        return {"version": _STATE_VERSION, "identity": dict(self._identity),
                "grain": _to_json(self._it.get_state())}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator made with the same arguments."""
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a data iterator state: expected the dict that "
                             "DataIterator.get_state() returned")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                             f"{_STATE_VERSION}; it was written by another version of data.py")
        old = state.get("identity", {})
        diff = sorted(k for k in set(old) | set(self._identity)
                      if old.get(k) != self._identity.get(k))
        if diff:
            details = "; ".join(f"{k}: saved {old.get(k)!r}, now {self._identity.get(k)!r}"
                                for k in diff)
            raise ValueError("cannot resume the data iterator: the data pipeline differs from "
                             f"the one that saved the state ({details}); resume with the same "
                             "data config, batch, seq_len, processes and workers")
        self._it.set_state(_from_json(state["grain"]))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_weights(sources: Sequence[DataSource]) -> None:
    for s in sources:
        w = s.weight
        if not isinstance(w, (int, float)) or not np.isfinite(w) or w <= 0:
            raise ValueError(f"data source {s.path!r}: weight must be a positive number, got "
                             f"{w!r}; drop the source instead of giving it weight 0")


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside absl.app they are not parsed yet."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _fingerprint(data: DataConfig) -> str:
    """What in the data config decides the stream (seq_len is recorded separately)."""
    d = dataclasses.asdict(data)
    d.pop("seq_len", None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_iterator(data: DataConfig, tokenizer, *, global_batch: int, seq_len: int | None = None,
                  process_index: int = 0, process_count: int = 1, epoch_loop: bool = True,
                  num_threads: int = 0, worker_count: int = 0,
                  prefetch: int = 2) -> DataIterator:
    """The training batches of this process (see the module docstring).

    Args:
      data: sources (empty = default corpus), seed and default seq_len.
      tokenizer: has `encode(text, bos=, eos=) -> list[int]`, `bos_id`, `eos_id`.
      global_batch: rows per step over all processes; this process gets
        global_batch // process_count rows.
      seq_len: tokens per row (default `data.seq_len`).
      process_index, process_count: this JAX process; processes read disjoint documents.
      epoch_loop: loop over the data forever, reshuffled every epoch; if False, one
        pass: stop when the first source runs out (Grain's mix semantics); the last
        row is padded and the last batch is filled up with empty rows (all-zero,
        loss_mask 0), so nothing is dropped.
      num_threads: threads tokenizing documents (0 = in the calling thread). Helps when
        the tokenizer releases the GIL (e.g. tiktoken).
      worker_count: worker processes running the whole pipeline (Grain mp_prefetch;
        0 = none). Each worker reads its own slice of the documents, so the stream
        depends on worker_count (it is deterministic and checkpointable for a given
        value). The tokenizer must be picklable.
      prefetch: batches prepared ahead in a background thread (0 = none), so the
        pipeline runs while the accelerator computes.
    """
    import grain

    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} is not divisible by the number of "
                         f"processes ({process_count}); pick a global batch that is a "
                         f"multiple of {process_count}")
    seq_len = data.seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    for name, v in (("num_threads", num_threads), ("worker_count", worker_count),
                    ("prefetch", prefetch)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    rows = global_batch // process_count

    sources = tuple(data.sources)
    if sources:
        _check_weights(sources)
        docs = [document_source(s) for s in sources]
        names = [s.path for s in sources]
        weights = [float(s.weight) for s in sources]
    else:
        docs = [_default_corpus_source()]
        names = ["<default corpus>"]
        weights = [1.0]

    encode = _Encode(tokenizer)
    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=max(2 * num_threads, 1))
    packed = []
    for i, (name, src) in enumerate(zip(names, docs)):
        if len(src) < process_count:
            raise ValueError(f"data source {name!r} has {len(src)} document(s), fewer than "
                             f"the {process_count} processes that each need their own; add "
                             f"documents or split the file")
        ds = grain.MapDataset.source(src)[process_index::process_count]
        ds = ds.shuffle(seed=(data.seed + i * _SOURCE_SEED_STRIDE) % 2**32)
        ds = ds.repeat(None if epoch_loop else 1)
        ds = ds.map(encode)
        it = ds.to_iter_dataset(read_options)
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"x": seq_len})
        it = it.map(_pack_row)
        if data.shuffle_rows > 1:
            # Packing keeps a long file's rows together; shuffling rows within a window
            # spreads them over many batches (checkpointable: replays from the window start).
            it = grain.experimental.WindowShuffleIterDataset(
                it, window_size=data.shuffle_rows,
                seed=(data.seed + i * _SOURCE_SEED_STRIDE + 1) % 2**32)
        packed.append(it)

    ds = packed[0] if len(packed) == 1 else grain.IterDataset.mix(packed, weights)
    ds = ds.batch(rows, drop_remainder=False, batch_fn=_MakeBatch(rows, seq_len))
    if worker_count:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=2))
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)

    identity = {"data": _fingerprint(data), "rows": rows, "seq_len": seq_len,
                "process_index": process_index, "process_count": process_count,
                "epoch_loop": epoch_loop, "worker_count": worker_count}
    return DataIterator(ds, rows=rows, seq_len=seq_len, identity=identity)


class ShardedBatches:
    """This process's rows of the global batch, drawn from a fixed number of data shards.

    Documents are split into `shards` independent streams (each packed on its own);
    global batch row block s comes from shard s. A process owns a contiguous range of
    shards, so the global batch is the same whatever the number of processes, as long as
    it divides `shards`: a run can move to another host count and still resume exactly.
    """

    def __init__(self, data: DataConfig, tokenizer, *, global_batch: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1, **kw):
        shards = data.shards or process_count
        if shards % process_count or global_batch % shards:
            raise ValueError(f"data.shards={shards} must be a multiple of the {process_count} "
                             f"process(es) and divide train.global_batch={global_batch}")
        per_process = shards // process_count
        self.shard_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        self.iterators = [make_iterator(data, tokenizer, global_batch=global_batch, seq_len=seq_len,
                                        process_index=s, process_count=shards, **kw)
                          for s in self.shard_ids]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        """{shard id: state} for this process's shards (see `gather_state` for all)."""
        return {str(s): it.get_state() for s, it in zip(self.shard_ids, self.iterators)}

    def set_state(self, state: dict) -> None:
        missing = [s for s in self.shard_ids if str(s) not in state]
        if missing:
            raise ValueError(f"the checkpoint's data state has no entry for shard(s) {missing}; "
                             f"it was saved with another data.shards ({sorted(state)})")
        for s, it in zip(self.shard_ids, self.iterators):
            it.set_state(state[str(s)])

    def gather_state(self) -> dict:
        """Every process's shard states, merged (a collective: all processes must call it)."""
        import jax
        local = self.get_state()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:blob.size] = blob
        everything = np.asarray(multihost_utils.process_allgather(padded))
        merged = {}
        for row, size in zip(everything, sizes):
            merged.update(json.loads(row[:size].tobytes()))
        return merged
