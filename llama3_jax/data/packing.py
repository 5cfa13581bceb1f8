"""Training data: read documents, tokenize, pack into rows, mix sources, batch.

The pipeline is built from Grain datasets (`grain.MapDataset` / `grain.IterDataset`):

    per source:  documents (random access: files, JSONL lines, Parquet rows)
                 -> this process's shard (every process_count-th document)
                 -> shuffle(seed)  -> repeat()       (reshuffled every epoch)
                 -> map(tokenize)                    (optionally in threads)
                 -> skip unreadable documents        (counted in the state: bad_rows.py)
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

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence

import numpy as np

from llama3_jax.config import ConfigError, DataConfig
from llama3_jax.data.sources import DEFAULT_CORPUS_HELDOUT, BadRow, check_data, open_sources

__all__ = ["DataIterator", "ShardedBatches", "encode_document", "heldout_batches", "make_iterator"]

_STATE_VERSION = 1
# Seeds of different sources are spread apart so their shuffles are unrelated
# (Grain reshuffles epoch e of a source with seed + e).
_SOURCE_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------- tokenization


class _Encode:
    """(index in the repeated shard, document text) -> {"x": int32 [n, 2]} with columns
    (token, next token or -1). A bad row goes on to `SkipBadRows`, marked with whether this
    is its first read (epoch 0), so that different bad rows are counted exactly."""

    def __init__(self, tokenizer, epoch_len: int):
        self.tokenizer, self.epoch_len = tokenizer, epoch_len

    def __call__(self, index: int, text: str | BadRow) -> dict[str, np.ndarray] | BadRow:
        if isinstance(text, BadRow):
            return text._replace(first=index < self.epoch_len)
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


def check_bad_rows(bad: int, seen: int, distinct: int, data: DataConfig) -> str | None:
    """The one-line reason to stop a run for bad data, or None: more than 10 different bad
    rows, and bad reads over data.max_bad_row_fraction of all reads."""
    if distinct > 10 and bad > data.max_bad_row_fraction * seen:
        return (f"{bad} of the {seen} documents read so far could not be read ({distinct} different rows: bad JSON, "
                f"a missing field or text that is not UTF-8), over data.max_bad_row_fraction="
                f"{data.max_bad_row_fraction}; fix the data (each bad row was logged with its file and line) or raise "
                "data.max_bad_row_fraction")
    return None


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


def state_to_json(obj):
    """Grain state -> JSON-safe (tuples, numpy scalars/arrays and non-str keys tagged)."""
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: state_to_json(v) for k, v in obj.items()}
        return {"__items__": [[state_to_json(k), state_to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [state_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [state_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"data iterator state holds a {type(obj).__name__}, not JSON-serialisable")


def state_from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(state_from_json(v) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {state_from_json(k): state_from_json(v) for k, v in obj["__items__"]}
        if set(obj) == {"__ndarray__", "dtype"}:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: state_from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_from_json(v) for v in obj]
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
        identity = {k: v for k, v in self._identity.items() if k != "data_legacy"}
        return {"version": _STATE_VERSION, "identity": identity, "grain": state_to_json(self._it.get_state())}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator made with the same arguments."""
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a data iterator state: expected the dict that "
                             "DataIterator.get_state() returned")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                             f"{_STATE_VERSION}; it was written by another version of data.py")
        old, now = state.get("identity", {}), self._identity
        explained = ("data", "data_config", "data_legacy")  # compared below, by settings
        diff = sorted(k for k in set(old) | set(now) if k not in explained and old.get(k) != now.get(k))
        details = [f"{k}: saved {old.get(k)!r}, now {now.get(k)!r}" for k in diff]
        if old.get("data") not in (now["data"], now["data_legacy"]):
            saved_cfg, cfg = old.get("data_config") or {}, now["data_config"]
            changed = sorted(k for k in set(saved_cfg) | set(cfg) if saved_cfg.get(k) != cfg.get(k))
            details.insert(0, "; ".join(f"data.{k}: saved {saved_cfg.get(k)!r}, now {cfg.get(k)!r}" for k in changed)
                           if saved_cfg else "the [data] settings (sources, seed, tokenizer or row shuffle)")
        if details:
            raise ConfigError("cannot resume the data where the checkpoint left it: the data pipeline differs "
                              f"({'; '.join(details)}); resume with the saved settings, or start a new --out")
        self._it.set_state(state_from_json(state["grain"]))

    def bad_rows(self) -> tuple[int, int, int]:
        """(reads of unreadable documents, documents read, different unreadable documents),
        as of the rows returned so far (documents the row shuffle read ahead included).
        Derived from `get_state()`, so a resumed iterator counts on where it left off."""
        from llama3_jax.data.bad_rows import counts_in
        return counts_in(self._it.get_state())

    def rows_read(self) -> dict[int, int]:
        """{source index: packed rows taken from it}, as of the batches returned so far."""
        from llama3_jax.data.bad_rows import rows_in
        return rows_in(self._it.get_state())

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside absl.app they are not parsed yet."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _data_settings(data: DataConfig) -> dict:
    """What in the data config decides a shard's stream (seq_len and the shard count are
    recorded on their own; the bad-row limit decides none, and raising it must resume; the
    annealing mix is a stream of its own)."""
    d = dataclasses.asdict(data)
    for k in ("seq_len", "shards", "max_bad_row_fraction", "eval_sources", "anneal_sources", "anneal_steps"):
        d.pop(k, None)
    if not d["eval_fraction"]:  # runs from before held-out fractions existed resume
        d.pop("eval_fraction")
    if not data.sources and not data.path:  # the default corpus holds out some files
        d["default_corpus_heldout"] = data.eval_fraction or DEFAULT_CORPUS_HELDOUT
    return json.loads(json.dumps(d, default=str))


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_iterator(data: DataConfig, tokenizer, *, global_batch: int, seq_len: int | None = None,
                  process_index: int = 0, process_count: int = 1, epoch_loop: bool = True,
                  num_threads: int = 0, worker_count: int = 0,
                  prefetch: int = 2, sources=None, window_cache=None) -> DataIterator:
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
      sources: `open_sources(data)` when the caller opened them already (each JSONL file
        is line-indexed once, however many iterators read it).
      window_cache: a directory where the row shuffle's windows are kept, so a restore
        does not read its window again (`llama3_jax.data.window_cache`; None = not kept).
    """
    import grain

    from llama3_jax.data import bad_rows

    check_data(data, global_batch, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    seq_len = data.seq_len if seq_len is None else seq_len
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    for name, v in (("num_threads", num_threads), ("worker_count", worker_count),
                    ("prefetch", prefetch)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    rows = global_batch // process_count

    names, docs, weights = zip(*(sources if sources is not None else open_sources(data)))

    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=max(2 * num_threads, 1))
    packed = []
    for i, (name, src) in enumerate(zip(names, docs)):
        if len(src) < process_count:
            raise ConfigError(f"data source {name!r} has {len(src)} document(s), fewer than "
                             f"the {process_count} processes that each need their own; add "
                             f"documents or split the file")
        ds = grain.MapDataset.source(src)[process_index::process_count]
        epoch_len = len(ds)
        ds = ds.shuffle(seed=(data.seed + i * _SOURCE_SEED_STRIDE) % 2**32)
        ds = ds.repeat(None if epoch_loop else 1)
        ds = ds.map_with_index(_Encode(tokenizer, epoch_len))
        live = bad_rows.Live()
        it = bad_rows.SkipBadRows(ds.to_iter_dataset(read_options), live, name=name, epoch_len=epoch_len)
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"x": seq_len})
        it = it.map(_pack_row)
        if data.shuffle_rows > 1 and window_cache and not worker_count:
            from llama3_jax.data.window_cache import WindowCache
            it = WindowCache(it, window_cache, window=data.shuffle_rows, identity=dict(
                data=_fingerprint(_data_settings(data)), source=i, seq_len=seq_len, shard=process_index,
                shards=process_count, epoch_loop=epoch_loop))
        if data.shuffle_rows > 1:
            # Packing keeps a long file's rows together; shuffling rows within a window
            # spreads them over many batches (checkpointable: replays from the window start).
            it = grain.experimental.WindowShuffleIterDataset(
                it, window_size=data.shuffle_rows,
                seed=(data.seed + i * _SOURCE_SEED_STRIDE + 1) % 2**32)
        packed.append(bad_rows.StampCounts(it, live, i))

    ds = packed[0] if len(packed) == 1 else grain.IterDataset.mix(packed, list(weights))
    ds = ds.batch(rows, drop_remainder=False, batch_fn=_MakeBatch(rows, seq_len))
    if worker_count:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=2))
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)

    settings = _data_settings(data)
    identity = {"data": _fingerprint(settings), "rows": rows, "seq_len": seq_len,
                "process_index": process_index, "process_count": process_count,
                "epoch_loop": epoch_loop, "worker_count": worker_count, "data_config": settings,
                # States saved before the shard count left the fingerprint (llama3_jax <= 0.1
                # hashed data.shards too) still resume.
                "data_legacy": _fingerprint({**settings, "shards": data.shards})}
    return DataIterator(ds, rows=rows, seq_len=seq_len, identity=identity)


def heldout_batches(data: DataConfig, tokenizer, *, global_batch: int, seq_len: int, batches: int
                    ) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
    """(source name, up to `batches` global batches) of each held-out source
    (`open_sources(data, "eval")`), the same on every run and resume: one pass over the
    source's shuffled held-out documents, rows unshuffled, the last batch padded with empty rows."""
    out = []
    settings = dataclasses.replace(data, shuffle_rows=0, shards=0)
    for name, docs, _ in open_sources(data, "eval"):
        with make_iterator(settings, tokenizer, global_batch=global_batch, seq_len=seq_len, epoch_loop=False,
                           prefetch=0, sources=[(name, docs, 1.0)]) as it:
            out.append((name, [b for _, b in zip(range(batches), it)]))
    return out


class ShardedBatches:
    """This process's rows of the global batch, drawn from a fixed number of data shards.

    Documents are split into `shards` independent streams (each packed on its own);
    global batch row block s comes from shard s. A process owns a contiguous range of
    shards, so the global batch is the same whatever the number of processes, as long as
    it divides `shards`: a run can move to another host count and still resume exactly.
    """

    def __init__(self, data: DataConfig, tokenizer, *, global_batch: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1, make=None, **kw):
        """`make(global_batch=, seq_len=, process_index=, process_count=)` builds one shard's
        iterator (default: `make_iterator` over the configured documents)."""
        check_data(data, global_batch, process_count)
        shards = data.shards or process_count
        per_process = shards // process_count
        self.shard_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        self.shards, self.data_shards = shards, data.shards
        if make is None:
            self.sources = sources = open_sources(data)
            make = functools.partial(make_iterator, data, tokenizer, sources=sources, **kw)
        self.iterators = [make(global_batch=global_batch, seq_len=seq_len, process_index=s, process_count=shards)
                          for s in self.shard_ids]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def bad_rows(self) -> tuple[int, int, int]:
        """(reads of unreadable documents, documents read, different unreadable documents)
        by this process's shards."""
        counts = [it.bad_rows() for it in self.iterators]
        return tuple(sum(c[k] for c in counts) for k in range(3))

    def rows_read(self, state: dict | None = None) -> dict[int, int]:
        """{source index: packed rows taken from it} by this process's shards, or in a
        `gather_state` of every process's."""
        from llama3_jax.data.bad_rows import rows_in
        if state is None:
            parts = [it.rows_read() for it in self.iterators]
        else:
            parts = [rows_in(s.get("grain", {})) for s in state.values()]
        return {i: sum(p.get(i, 0) for p in parts) for i in sorted({i for p in parts for i in p})}

    def select(self, step: int) -> None:
        """The mix for 0-based step `step` (one mix here; see `data.schedule`)."""

    def get_state(self) -> dict:
        """{shard id: state} for this process's shards (see `gather_state` for all)."""
        return {str(s): it.get_state() for s, it in zip(self.shard_ids, self.iterators)}

    def set_state(self, state: dict) -> None:
        saved = len(state)
        if saved != self.shards or any(str(s) not in state for s in self.shard_ids):
            default = ", one per process" if not self.data_shards else ""
            raise ConfigError(
                f"the checkpoint's data was read as {saved} shard(s), but this run splits it into {self.shards} "
                f"(data.shards={self.data_shards}{default}); to resume exactly, set data.shards={saved} and run "
                f"on a number of processes that divides {saved}, or start a new --out")
        for s, it in zip(self.shard_ids, self.iterators):
            it.set_state(state[str(s)])

    def gather_state(self, local: dict | None = None) -> dict:
        """Every process's shard states (`local`: this process's, taken earlier with
        `get_state`), merged. A collective: all processes must call it."""
        import jax
        local = self.get_state() if local is None else local
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
