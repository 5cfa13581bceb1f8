"""Weight-only int8: each matmul weight as int8 with a float32 scale per output channel.

Written with `jax.numpy` rather than AQT or Qwix: those quantize by intercepting the dots of
Flax modules, while the model here runs as pure functions over a dict of arrays. An
`Int8Weight` goes wherever an array went: the model calls `.astype(compute_dtype)` on every
weight, which here dequantizes (q * scale, fused by XLA into the matmul's operand read), and
the embedding is looked up row by row. Memory per parameter is 1 byte plus the scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The contracted (input) axes of each weight; the scale has one entry per remaining index.
# The embedding is scaled per row (token), which is per output channel of the tied head.
INPUT_AXES = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w1": (1,), "w3": (1,), "w2": (1,),
              "output": (0,), "embed": (1,)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    q: jax.Array       # int8, the weight's shape
    scale: jax.Array   # float32, size 1 on the input axes

    def astype(self, dtype):
        return self.q.astype(dtype) * self.scale.astype(dtype)

    def lookup(self, tokens):
        return jnp.take(self.q, tokens, axis=0).astype(jnp.float32) * jnp.take(self.scale, tokens, axis=0)

    @property
    def T(self):
        return Int8Weight(self.q.T, self.scale.T)

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize(w, input_axes) -> Int8Weight:
    """Symmetric int8 with the largest |w| of each output channel mapped to 127."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return Int8Weight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)


def quantize_params(params: dict, embeddings: bool = False) -> dict:
    """Every matmul weight as `Int8Weight`; the embedding too when `embeddings` (with tied
    embeddings that also quantizes the output head). Norms stay as they are."""
    names = [n for n in INPUT_AXES if n in params and (embeddings or n != "embed")]

    @jax.jit
    def run(ws):
        return {n: quantize(w, INPUT_AXES[n]) for n, w in ws.items()}

    return {**params, **run({n: params[n] for n in names})}


def param_bytes(params: dict) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))
