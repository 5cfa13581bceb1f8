"""What every checkpoint format shares: a `Source` of our parameters, Meta's torch layout
(which Hugging Face's differs from only by the q/k rotary permutation), and writing an
output directory so that a failed conversion leaves nothing behind.

A Source yields our parameters by name (`llama3_jax.model.param_shapes`) in our layout:
stacked ones one layer at a time (`layer`), or any box of them (`read`), so a conversion
or a placement onto a mesh never holds a whole model, only a layer or a device's shard.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from llama3_jax.config import ConfigError, ModelConfig
from llama3_jax.model import LAYER_PARAMS, param_shapes

# Memory-mapped files are re-opened after this many bytes were read or written through them,
# so the pages touched (file-backed, but counted in the process's resident memory) do not pile up.
REMAP_BYTES = 2**30


class Source:
    """Our parameters from somewhere; subclasses set `model` and implement `layer` (one layer
    of a stacked parameter) and `whole` (a global one), or override `read`."""

    model: ModelConfig

    def layer(self, name: str, i: int) -> np.ndarray:
        raise NotImplementedError

    def whole(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """param[index] for a tuple of slices (missing trailing ones mean whole axes)."""
        shape = param_shapes(self.model)[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if name not in LAYER_PARAMS:
            return self.whole(name)[index]
        rows = range(*index[0].indices(shape[0]))
        return np.stack([self.layer(name, i)[index[1:]] for i in rows])

    def layers(self, name: str) -> Iterator[tuple[int | None, np.ndarray]]:
        """(layer, array) for each layer of a stacked parameter; (None, array) for a global one."""
        if name in LAYER_PARAMS:
            for i in range(self.model.n_layers):
                yield i, self.layer(name, i)
        else:
            yield None, self.whole(name)

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first layer, [k, ...] block) for stacked parameters; (0, array) for global ones."""
        for i, arr in self.layers(name):
            yield (0, arr) if i is None else (i, arr[None])


# ---------------------------------------------------------------- Meta's torch layout

def to_torch_layout(name: str, w, cfg: ModelConfig):
    """One layer's (or a global) parameter of ours -> Meta's torch tensor layout (out, in)."""
    if name in ("wq", "wk", "wv"):  # [dim, heads, hd] -> [heads*hd, dim]
        return w.reshape(w.shape[0], -1).T
    if name == "wo":  # [heads, hd, dim] -> [dim, heads*hd]
        return w.reshape(-1, w.shape[-1]).T
    if name in ("w1", "w3", "w2", "output"):
        return w.T
    return w  # embed [vocab, dim] and norms are stored alike


def from_torch_layout(name: str, w, cfg: ModelConfig):
    """Inverse of `to_torch_layout`."""
    hd = cfg.head_dim
    if name in ("wq", "wk", "wv"):
        return w.T.reshape(w.shape[1], -1, hd)
    if name == "wo":
        return w.T.reshape(-1, hd, w.shape[0])
    if name in ("w1", "w3", "w2", "output"):
        return w.T
    return w


def torch_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one layer's (or a global) tensor in Meta's / Hugging Face's torch layout."""
    d, hd, f, V = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    return {
        "embed": (V, d), "output": (V, d), "norm": (d,), "attention_norm": (d,), "ffn_norm": (d,),
        "wq": (cfg.n_heads * hd, d), "wk": (cfg.n_kv_heads * hd, d), "wv": (cfg.n_kv_heads * hd, d),
        "wo": (d, cfg.n_heads * hd), "w1": (f, d), "w3": (f, d), "w2": (d, f),
    }[name]


def tensor_names(cfg: ModelConfig, table: dict) -> list[tuple[str, int | None, str]]:
    """(our name, layer index or None, checkpoint name) for every tensor of a model."""
    out = []
    for name in param_shapes(cfg):
        if name in LAYER_PARAMS:
            out += [(name, i, table[name].format(i=i)) for i in range(cfg.n_layers)]
        else:
            out.append((name, None, table[name]))
    return out


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy without a copy (bfloat16 through ml_dtypes)."""
    import ml_dtypes
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ---------------------------------------------------------------- directories

def kind_hint(path: pathlib.Path) -> str:
    """What a directory looks like, in words that say what to do with it."""
    if (path / "config.json").exists():
        return "a Hugging Face directory (convert it with from-hf)"
    if (path / "params.json").exists() or list(path.glob("consolidated.*.pth")):
        return "a Meta directory (convert it with from-meta)"
    if (path / "checkpoints").is_dir() or (path / "state").is_dir():
        return "a llama3_jax run/checkpoint (export it with to-hf or to-meta)"
    return "not a checkpoint this tool knows"


def need_dir(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; expected a directory")
    return path


@contextlib.contextmanager
def new_output(out: pathlib.Path):
    """A new (or empty) output directory, written whole or not at all: yields a temporary
    sibling to write into, renamed to `out` when the block completes, removed if it fails."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pwrite(fd: int, arr: np.ndarray, offset: int):
    """Write an array's bytes at `offset` of an open file, in pieces of at most 1 GiB."""
    buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    while len(buf):
        n = os.pwrite(fd, buf[: 1 << 30], offset)
        buf, offset = buf[n:], offset + n
