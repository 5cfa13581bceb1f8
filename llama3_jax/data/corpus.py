"""The embedded default corpus: this Python's own standard library sources.

Every Python install carries them, so `python train.py` needs no download and the
project ships no data.
"""

import pathlib
import sysconfig


def default_corpus_files() -> list[pathlib.Path]:
    """Sorted .py files of the standard library (site-packages excluded), deterministic."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
