"""Weights from any checkpoint directory: a llama3_jax run (or a converted checkpoint), a
Hugging Face directory or a Meta directory. `load` gives an NNX model; `load_params`
streams the parameters straight onto a mesh, each device reading only its own shard.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from llama3_jax.config import ConfigError, ModelConfig, dtype_of
from llama3_jax.formats.source import Source, kind_hint
from llama3_jax.model import Llama, param_shapes


def open_source(path) -> Source:
    """The Source of a directory, by what it holds (config.json: Hugging Face; params.json:
    Meta; else a llama3_jax run, its checkpoints/ folder or a step folder)."""
    from llama3_jax.formats.hf import HFSource
    from llama3_jax.formats.meta import MetaSource
    from llama3_jax.formats.run import RunSource
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "config.json").exists():
        return HFSource(path)
    if (path / "params.json").exists():
        return MetaSource(path)
    try:
        return RunSource(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no weights: it is {kind_hint(path)} (expected a llama3_jax run "
                                "or checkpoint, a Hugging Face directory or a Meta directory)") from None


def load_params(source: Source, shardings: dict, dtype: str) -> dict:
    """{name: jax.Array} of `dtype`, each built shard by shard from `source` with
    `jax.make_array_from_callback`: no host holds more than a device's piece at a time."""
    shapes, out = param_shapes(source.model), {}
    for name, sharding in shardings.items():
        def piece(index, name=name):
            return np.asarray(source.read(name, index), dtype=dtype_of(dtype))

        out[name] = jax.make_array_from_callback(shapes[name], sharding, piece)
    return out


def check_same_model(source: Source, cfg: ModelConfig, what: str) -> None:
    """A clear error when a checkpoint's shapes differ from the model config's."""
    want, got = param_shapes(cfg), param_shapes(source.model)
    if want != got:
        diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        raise ConfigError(f"{what}: its shapes differ from this model config (checkpoint vs config: {diff}); "
                          "use the matching model config")


def load(path, dtype="float32", compute_dtype=None):
    """An NNX `Llama` from a llama3_jax run or checkpoint, a Hugging Face directory or a Meta
    directory, on the first device.

    `model(tokens)` returns float32 logits [batch, seq, vocab]. `dtype` is the parameter
    dtype; compute runs in `compute_dtype` (default: the same as `dtype`).
    """
    import jax.numpy as jnp
    from flax import nnx

    source = open_source(path)
    dtype = jnp.dtype(dtype).name
    compute = jnp.dtype(compute_dtype).name if compute_dtype else dtype
    cfg = dataclasses.replace(source.model, param_dtype=dtype, compute_dtype=compute)
    cfg.validate()
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = load_params(source, {name: device for name in param_shapes(cfg)}, dtype)
    for name, arr in params.items():
        getattr(model, name).set_value(arr)
    return model
