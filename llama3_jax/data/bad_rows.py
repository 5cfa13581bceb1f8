"""Skipping the documents a source cannot read, counted in the iterator state.

Sources return a `BadRow` for a document they cannot read (bad JSON, a missing field, text
that is not UTF-8). Per source, `SkipBadRows` (right after the documents are read) drops
them, logs each once per process and counts the documents read, the reads dropped and the
different rows dropped (those first read in epoch 0); `StampCounts` (after packing and the
row shuffle) records those counts as of each packed row it passes on. Both keep their
counts in their Grain state, so the counts travel with the position through prefetch
threads and worker processes, and a restored iterator replays to the same counts: a skip
is a pure function of the document, so every run, interrupted or not, skips the same rows
and reports the same counts. Imported lazily, as it imports Grain.
"""

from __future__ import annotations

import logging

import grain

from llama3_jax.config import ConfigError
from llama3_jax.data.sources import BadRow

# State keys: the counts at the documents' stage (to resume from) and as of the last row
# passed on (what `counts_in` reports: it includes documents the row shuffle read ahead).
_BASE = ("llama3_jax_bad_reads", "llama3_jax_reads", "llama3_jax_bad_rows")
_STAMP = tuple(k + "_stamp" for k in _BASE)
_ROWS = "llama3_jax_rows_of_source_"  # + the source's index: rows it gave the mix

_log = logging.getLogger("llama3_jax.data")
_reported: set[str] = set()  # rows this process logged: an epoch loop meets them again


class Live:
    """The counts of one source's `SkipBadRows` iterator, for its `StampCounts` to read.

    Both datasets of a source hold the same object (pickling the pipeline into a worker
    process keeps them sharing one); a pipeline is iterated once per process."""

    counts = (0, 0, 0)  # (bad reads, reads, different bad rows)


class SkipBadRows(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, live: Live, *, name: str, epoch_len: int):
        super().__init__(parent)
        self._live, self._name, self._epoch_len = live, name, epoch_len

    def __iter__(self):
        return _SkipBadRowsIterator(self._parent.__iter__(), self._live, self._name, self._epoch_len)


class _SkipBadRowsIterator(grain.DatasetIterator):
    def __init__(self, parent, live: Live, name: str, epoch_len: int):
        super().__init__(parent)
        self._live, self._name, self._epoch_len = live, name, epoch_len
        live.counts = (0, 0, 0)

    def __next__(self):
        streak = 0
        while True:
            doc = next(self._parent)
            bad, reads, distinct = self._live.counts
            if not isinstance(doc, BadRow):
                self._live.counts = (bad, reads + 1, distinct)
                return doc
            self._live.counts = (bad + 1, reads + 1, distinct + doc.first)
            streak += 1
            if streak > 2 * self._epoch_len:  # a whole epoch in the streak: the loop would never end
                raise ConfigError(f"data source {self._name!r}: none of this shard's {self._epoch_len} "
                                  f"document(s) can be read (e.g. {doc.where}: {doc.why}); fix the files "
                                  "or drop the source")
            if doc.where not in _reported:
                _reported.add(doc.where)
                _log.warning("skipped a bad row: %s: %s", doc.where, doc.why)

    def get_state(self):
        # The parent's dict with the counts added: a state saved before there were counts
        # loads with counts 0.
        return {**self._parent.get_state(), **dict(zip(_BASE, self._live.counts))}

    def set_state(self, state):
        state = dict(state)
        self._live.counts = tuple(state.pop(k, 0) for k in _BASE)
        self._parent.set_state(state)


class StampCounts(grain.IterDataset):
    """Also counts the rows source `index` passed on to the mix (`rows_in`: the mix as read)."""

    def __init__(self, parent: grain.IterDataset, live: Live, index: int = 0):
        super().__init__(parent)
        self._live, self._rows_key = live, f"{_ROWS}{index}"

    def __iter__(self):
        return _StampCountsIterator(self._parent.__iter__(), self._live, self._rows_key)


class _StampCountsIterator(grain.DatasetIterator):
    def __init__(self, parent, live: Live, rows_key: str):
        super().__init__(parent)
        self._live, self._rows_key = live, rows_key
        self._stamp, self._rows = (0, 0, 0), 0

    def __next__(self):
        row = next(self._parent)
        self._stamp = self._live.counts
        self._rows += 1
        return row

    def get_state(self):
        return {**self._parent.get_state(), **dict(zip(_STAMP, self._stamp)), self._rows_key: self._rows}

    def set_state(self, state):
        state = dict(state)
        self._stamp = tuple(state.pop(k, 0) for k in _STAMP)
        self._rows = state.pop(self._rows_key, 0)  # states from before row counts: 0
        self._parent.set_state(state)  # replays the documents' stage to the same live counts


def _walk(state):
    todo = [state]
    while todo:
        s = todo.pop()
        if isinstance(s, dict):
            yield s
            todo.extend(s.values())
        elif isinstance(s, (list, tuple)):
            todo.extend(s)


def rows_in(state) -> dict[int, int]:
    """{source index: packed rows it gave the mix} summed over a Grain state's shards and
    worker processes."""
    rows: dict[int, int] = {}
    for s in _walk(state):
        for k, v in s.items():
            if isinstance(k, str) and k.startswith(_ROWS):
                i = int(k[len(_ROWS):])
                rows[i] = rows.get(i, 0) + v
    return rows


def counts_in(state) -> tuple[int, int, int]:
    """(bad reads, reads, different bad rows) summed over the sources (and worker
    processes) of a Grain state."""
    total = [0, 0, 0]
    for s in _walk(state):
        for j, k in enumerate(_STAMP):
            total[j] += s.get(k, 0)
    return tuple(total)
