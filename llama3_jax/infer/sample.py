"""Sampling from a model's parameters (a fixed-shape loop: one compile, no KV cache).

Call it under `jax.set_mesh(mesh)` when the parameters live on a mesh: the model's
activation constraints then follow the same rules as in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.model import forward


def sample(params, cfg, prompt: list[int], n_tokens: int, *, temperature: float = 0.8,
           seed: int = 0, stop_ids=()) -> list[int]:
    length = len(prompt) + n_tokens
    # A host buffer: under multi-process meshes it enters jit as a replicated input.
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(prompt)] = prompt

    @jax.jit
    def next_token(params, buf, i, key_data):
        logits = forward(params, buf, cfg)[0, i - 1]
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        key = jax.random.wrap_key_data(key_data)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n_tokens)))
    out = []
    for n, i in enumerate(range(len(prompt), length)):
        tok = int(next_token(params, buf, np.int32(i), keys[n]))
        buf[0, i] = tok
        out.append(tok)
        if out[-1] in stop_ids:
            break
    return out
