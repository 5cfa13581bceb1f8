"""The row shuffle's window, kept on disk, so a restored iterator need not rebuild it.

Grain's `WindowShuffleIterDataset` checkpoints the position where its current window began
and, on restore, reads the whole window again (`data.shuffle_rows` packed rows: reading,
tokenizing and packing every document in it) just to drop the rows already used. That is
most of what a restart spends on the data.

`WindowCache` sits between packing and the row shuffle. When the shuffle starts a window
(it asks for the position first, then reads `window` rows), the rows it reads are written
once, in a background thread, to DIR/<key>.npz with the position after them; the key is a
hash of the pipeline's identity and the position the window starts from. When a restore
asks to start from a position with such a file, the rows come from the file and the
pipeline below goes on from the position after them: the same rows, bit for bit, and the
same bad-row counts (they are in that position). A missing, partial or unreadable file
means the window is read as before. The newest `keep` files of each stream stay (the window
being read and the one before it); older ones are removed (they are this module's own files,
nothing a user wrote).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import threading
import time

import grain
import numpy as np

from llama3_jax.config import replaced_atomically
from llama3_jax.data.packing import state_from_json, state_to_json

_VERSION = 1


class WindowCache(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, directory, *, window: int, identity: dict, keep: int = 2):
        super().__init__(parent)
        self._dir, self._window, self._keep = pathlib.Path(directory), window, keep
        self._stream = _hash({"version": _VERSION, "window": window, **identity})

    def __iter__(self):
        return _WindowCacheIterator(self._parent.__iter__(), self._dir, self._window, self._stream, self._keep)


class _WindowCacheIterator(grain.DatasetIterator):
    def __init__(self, parent, directory: pathlib.Path, window: int, stream: str, keep: int):
        super().__init__(parent)
        self._dir, self._window, self._stream, self._keep = directory, window, stream, keep
        self._served: list = []          # rows still to give from a file (last first)
        self._after = None               # the parent's position after them
        self._recording = None           # (start position as JSON, rows read since)

    def __next__(self):
        if self._served:
            row = self._served.pop()
            if not self._served:
                self._parent.set_state(self._after)
                self._after = None
            return row
        try:
            row = next(self._parent)
        except StopIteration:
            self._recording = None  # a last, short window: not kept
            raise
        if self._recording is not None:
            rows = self._recording[1]
            rows.append(row)
            if len(rows) == self._window:
                start, self._recording = self._recording[0], None
                after = state_to_json(self._parent.get_state())
                threading.Thread(target=_write, args=(self._dir, self._stream, self._keep, start, rows, after),
                                 daemon=True).start()
        return row

    def get_state(self):
        if self._served:  # the row shuffle asks only at a window's start; never mid-file
            raise RuntimeError("WindowCache: position asked while rows are served from a file")
        state = self._parent.get_state()
        self._recording = (state_to_json(state), [])  # the window the shuffle is about to read
        return state

    def set_state(self, state):
        start = state_to_json(state)
        self._served, self._after, self._recording = [], None, None
        loaded = _load(_path(self._dir, self._stream, start), start, self._window)
        if loaded is None:
            self._parent.set_state(state)
            self._recording = (start, [])  # read it once more, and keep it this time
        else:
            rows, self._after = loaded
            self._served = rows[::-1]


# -------------------------------------------------------------- files

def _path(directory: pathlib.Path, stream: str, start) -> pathlib.Path:
    return directory / f"{stream}-{_hash(start)}.npz"


def _load(path: pathlib.Path, start, window: int):
    """(rows, position after them) from a window's file; None if it is not there or not whole."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(f["meta"].tobytes())
            if meta["start"] != start or meta["rows"] != window:
                return None
            columns = {k: f[f"row_{k}"].astype(meta["dtypes"][k]) for k in meta["keys"]}
    except Exception:  # noqa: BLE001 - unreadable or cut short: read the window instead
        return None
    rows = [{k: columns[k][i] for k in meta["keys"]} for i in range(window)]
    return rows, state_from_json(meta["after"])


def _write(directory: pathlib.Path, stream: str, keep: int, start, rows, after) -> None:
    try:
        if not all(isinstance(r, dict) and r.keys() == rows[0].keys() for r in rows):
            return
        keys = list(rows[0])
        columns = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}
        meta = {"start": start, "after": after, "rows": len(rows), "keys": keys,
                "dtypes": {k: str(c.dtype) for k, c in columns.items()}}
        arrays = {f"row_{k}": _narrow(c) for k, c in columns.items()}
        with replaced_atomically(_path(directory, stream, start)) as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        for stale in directory.glob(f".{stream}-*.tmp"):  # cut short by an earlier session's end
            if stale.stat().st_mtime < time.time() - 600:
                stale.unlink(missing_ok=True)
        mine = sorted(directory.glob(f"{stream}-*.npz"), key=lambda p: p.stat().st_mtime)
        for old in mine[:-keep]:
            old.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - a cache: a window not kept is read again on restore
        return


def _narrow(a: np.ndarray) -> np.ndarray:
    """Integers in the narrowest of int8/int16/int32 that holds them (read back exactly)."""
    if a.dtype.kind in "iu" and a.size:
        lo, hi = int(a.min()), int(a.max())
        for t in (np.int8, np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return a.astype(t) if np.dtype(t).itemsize < a.dtype.itemsize else a
    return a


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]

