"""Sampling from a model's parameters (a fixed-shape loop: one compile, no KV cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama3_jax.model import forward


def sample(params, cfg, prompt: list[int], n_tokens: int, *, temperature: float = 0.8,
           seed: int = 0, stop_ids=()) -> list[int]:
    length = len(prompt) + n_tokens
    buf = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))

    @jax.jit
    def next_token(buf, i, key):
        logits = forward(params, buf, cfg)[0, i - 1]
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    key = jax.random.key(seed)
    out = []
    for i in range(len(prompt), length):
        key, sub = jax.random.split(key)
        tok = next_token(buf, i, sub)
        buf = buf.at[0, i].set(tok)
        out.append(int(tok))
        if out[-1] in stop_ids:
            break
    return out
