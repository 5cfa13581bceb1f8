"""Inference layouts of the weights: per-layer buffers, outputs first, optionally int8.

`prepare_params` turns the training layout (layers stacked, weights [*in, *out]) into what
decoding reads fastest:
- each layer's weights in their own buffers (a scan would copy each layer's slice out of
  the stack first, and in decoding reading the weights is nearly the whole cost);
- each matmul weight stored outputs first, [*out, *in], and multiplied as the left operand
  (`OutFirst.rmatmul`): XLA:CPU runs a few rows of activations through a weight about twice
  as fast that way round (measured: 3.7 against 7.2 ms for this model's layer matmuls at
  batch 8, dim 512);
- with `quantize_to="int8"`, weight-only int8 with one float32 scale per output channel
  (`Int8Weight`), dequantized to the compute dtype inside the jitted step.

Written with `jax.numpy` rather than AQT or Qwix: both quantize by intercepting a Flax
module's dots, while this model runs as pure functions over a dict of arrays. The model
multiplies through `_contract`, which hands the product to any weight with `rmatmul`, and
looks up rows of an embedding with `lookup`; that is all these classes need.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama3_jax.model import LAYER_PARAMS

# How many leading (input) axes each per-layer weight contracts, in the training layout.
INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w3": 1, "w2": 1, "output": 1}


def out_first(w, n_in: int):
    """[*in, *out] -> [*out, *in]."""
    return jnp.moveaxis(w, tuple(range(n_in)), tuple(range(w.ndim - n_in, w.ndim)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OutFirst:
    """A matmul weight stored [*out, *in] that multiplies as the left operand."""
    w: jax.Array
    n_in: int = dataclasses.field(metadata=dict(static=True))

    def astype(self, dtype):
        return self if self.w.dtype == dtype else OutFirst(self.w.astype(dtype), self.n_in)

    def rmatmul(self, x, n: int, preferred=None):
        """x [*lead, *in] -> [*lead, *out], the product x @ w of the training layout."""
        assert n == self.n_in, (n, self.n_in)
        w = self.w
        dims = ((tuple(range(w.ndim - n, w.ndim)), tuple(range(x.ndim - n, x.ndim))), ((), ()))
        out = jax.lax.dot_general(w, x, dims, preferred_element_type=preferred)  # [*out, *lead]
        k = w.ndim - n
        return jnp.moveaxis(out, tuple(range(k)), tuple(range(out.ndim - k, out.ndim)))

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    """int8 [*out, *in] with a float32 scale per output channel ([*out, 1, ...])."""
    q: jax.Array
    scale: jax.Array
    n_in: int = dataclasses.field(metadata=dict(static=True))

    def astype(self, dtype):
        return OutFirst(self.q.astype(dtype) * self.scale.astype(dtype), self.n_in)

    def lookup(self, tokens):  # an embedding [vocab, dim]: its rows, dequantized
        return jnp.take(self.q, tokens, axis=0).astype(jnp.float32) * jnp.take(self.scale, tokens, axis=0)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize(w, n_in: int) -> Int8Weight:
    """Symmetric int8 of an outputs-first weight, each output channel's largest |w| -> 127."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - n_in, w.ndim)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return Int8Weight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale, n_in)


def prepare_params(params: dict, quantize_to: str | None = None, embeddings: bool = False) -> dict:
    """The inference layout of training-layout parameters (see the module docstring): norms
    and the embedding as they were, "layers" a list of per-layer dicts, an "output" head
    (for a tied model, the embedding itself read outputs first). `quantize_to="int8"`
    quantizes every matmul weight; `embeddings` the embedding (and a tied head) too."""
    n = params["wq"].shape[0]

    def weight(w, n_in):
        w = out_first(w, n_in)
        return quantize(w, n_in) if quantize_to == "int8" else OutFirst(w, n_in)

    @jax.jit
    def run(params):
        out = {k: params[k] for k in ("embed", "norm")}
        out["layers"] = [{k: (weight(params[k][i], INPUTS[k]) if k in INPUTS else params[k][i])
                          for k in LAYER_PARAMS} for i in range(n)]
        if quantize_to == "int8" and embeddings:
            out["embed"] = quantize(params["embed"], 1)
        if "output" in params:
            out["output"] = weight(params["output"], 1)
        return out

    out = run(params)
    if "output" not in out:  # tied: the embedding [vocab, dim] is already the head's [out, in]; one buffer
        out["output"] = out["embed"] if isinstance(out["embed"], Int8Weight) else OutFirst(out["embed"], 1)
    return out


def param_bytes(params: dict) -> int:
    """Bytes of parameters, a buffer shared by the tied embedding and head counted once."""
    leaves = {id(x): x for x in jax.tree.leaves(params)}
    return sum(x.nbytes for x in leaves.values())
