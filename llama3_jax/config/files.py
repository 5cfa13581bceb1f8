"""Files written whole or not at all: a reader (another process, the next session) sees the
old file or the new one, never a part, and a write cut short leaves only a hidden temp file."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


@contextlib.contextmanager
def replaced_atomically(path, mode: int = 0o644):
    """`with replaced_atomically(path) as f: f.write(...)`: a binary file next to `path` that
    replaces it (by rename) when the block ends, and is removed if the block raises."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: str | bytes, mode: int = 0o644) -> None:
    """Write `data` (text as UTF-8) to `path` whole (see `replaced_atomically`)."""
    with replaced_atomically(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)
