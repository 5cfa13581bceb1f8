"""KV-cache decoding: the model's blocks over a preallocated cache, a jitted prefill and a
jitted one-token decode step, and the sampler they share.

The cache holds keys and values as [layers, batch, length, kv_heads, head_dim] (GQA: the
kv heads, not the query heads), sharded by the training rule table (batch over dp/fsdp, kv
heads over tp). Prompts are left-padded to one length, so every row writes the same cache
slot at each step; a row's positions start at 0 at its first real token, and pad slots are
a segment of their own, so RoPE and masking are exactly training's (`xla_attention` with
segment ids and positions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig, dtype_of
from llama3_jax.model import LAYER_PARAMS
from llama3_jax.model.attention import xla_attention
from llama3_jax.model.model import (embed_tokens, final_hidden, finish_block, output_logits, project_qkv,
                                    rope_angles)
from llama3_jax.parallel.sharding import constrain

CACHE_AXES = ("layers", "batch", "kv_seq", "kv_heads", "head_dim")


def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {n: constrain(jnp.zeros(shape, dtype), CACHE_AXES) for n in ("k", "v")}


def forward_cached(params: dict, tokens, cache: dict, start, pad, cfg: ModelConfig, last_only: bool = False):
    """Logits (float32) of `tokens` [b, t], written at cache slots start .. start + t - 1, and
    the updated cache. `pad` [b]: the number of left-pad slots of each row."""
    b, t = tokens.shape
    length = cache["k"].shape[2]
    positions = start + jnp.arange(t, dtype=jnp.int32)[None, :] - pad[:, None]
    cos, sin = rope_angles(cfg, positions)
    kv_slots = jnp.arange(length, dtype=jnp.int32)[None, :]
    kv_positions = kv_slots - pad[:, None]
    kv_segments = (kv_slots >= pad[:, None]).astype(jnp.int32)  # pad slots: segment 0, never attended
    q_segments = jnp.ones((b, t), jnp.int32)
    x = embed_tokens(params["embed"], tokens, cfg)

    def body(carry, p):
        x, k_all, v_all, i = carry
        q, k, v = project_qkv(x, p, cos, sin, cfg)
        # Written in place into the carried cache (donated by the caller): no copy per step.
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (i, 0, start, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (i, 0, start, 0, 0))
        k_layer = constrain(k_all[i].astype(x.dtype), CACHE_AXES[1:])
        v_layer = constrain(v_all[i].astype(x.dtype), CACHE_AXES[1:])
        a = xla_attention(q, k_layer, v_layer, q_segments, kv_segments, positions, kv_positions)
        return (finish_block(x, a, p, cfg), k_all, v_all, i + 1), None

    layers = {k: params[k] for k in LAYER_PARAMS}
    (x, k_all, v_all, _), _ = jax.lax.scan(body, (x, cache["k"], cache["v"], jnp.int32(0)), layers)
    if last_only:
        x = x[:, -1:]
    logits = output_logits(final_hidden(x, params["norm"], cfg), params, cfg)
    return logits, {"k": constrain(k_all, CACHE_AXES), "v": constrain(v_all, CACHE_AXES)}


def choose(logits, allowed, temperature, top_k, top_p, key):
    """Next tokens [b] from float32 logits [b, vocab] and their log-probabilities under the
    model (log-softmax of the raw logits, as a training forward pass computes them).

    Ids not `allowed` (reserved and unused specials, ids past the tokenizer) are never
    drawn. temperature 0 is greedy; top_k 0 and top_p 1 are off. Each row draws with its
    own key, so a row's tokens depend only on the seed, the step and its place in the batch.
    """
    masked = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(masked, axis=-1)
    scaled = masked / jnp.maximum(temperature, 1e-6)
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    vocab = logits.shape[-1]
    kth = jnp.take(ranked, jnp.clip(jnp.where(top_k > 0, top_k, vocab) - 1, 0, vocab - 1), axis=-1)
    scaled = jnp.where(scaled >= kth[:, None], scaled, -jnp.inf)
    # top-p: keep the smallest set of most likely tokens whose probability reaches top_p.
    probs = jax.nn.softmax(jnp.where(ranked >= kth[:, None], ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1)
    scaled = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
    keys = jax.random.split(key, logits.shape[0])
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    tokens = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


@functools.partial(jax.jit, static_argnames=("cfg", "length", "cache_dtype"))
def prefill(params, tokens, pad, knobs, allowed, key, *, cfg: ModelConfig, length: int, cache_dtype: str):
    """Fill a new cache of `length` slots with the left-padded prompts [b, p]; returns the
    first new tokens, their log-probs and the cache. `knobs`: (temperature, top_k, top_p)."""
    cache = empty_cache(cfg, tokens.shape[0], length, dtype_of(cache_dtype))
    logits, cache = forward_cached(params, tokens, cache, jnp.int32(0), pad, cfg, last_only=True)
    return (*replicated(choose(logits[:, -1], allowed, *knobs, key)), cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, cache, last, slot, pad, knobs, allowed, key, *, cfg: ModelConfig):
    """One token per row: `last` [b] is written at cache slot `slot`; returns the next tokens,
    their log-probs and the cache (donated: updated in place)."""
    logits, cache = forward_cached(params, last[:, None], cache, slot, pad, cfg)
    return (*replicated(choose(logits[:, -1], allowed, *knobs, key)), cache)


def replicated(arrays):
    """Small per-row outputs on every device, so every process can read them (multi-host)."""
    return tuple(constrain(a, (None,) * a.ndim) for a in arrays)
