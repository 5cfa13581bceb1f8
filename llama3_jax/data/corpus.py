"""The embedded default corpus: this Python's own standard library sources.

Every Python install carries them, so `python train.py` needs no download and the
project ships no data.
"""

import functools
import os
import pathlib
import sysconfig


def default_corpus_files() -> list[pathlib.Path]:
    """Sorted .py files of the standard library (site-packages excluded), deterministic."""
    return list(_corpus_files())


@functools.cache
def _corpus_files() -> tuple[pathlib.Path, ...]:
    # os.walk prunes site-packages instead of listing it (a restart pays for this walk).
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        files += [pathlib.Path(here) / n for n in names if n.endswith(".py")]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))
