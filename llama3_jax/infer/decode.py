"""KV-cache decoding: the model's blocks over a preallocated cache, a jitted prefill and a
jitted one-token decode step, and the sampler they share.

The cache holds keys and values as one [batch, kv_heads, length, head_dim] array per layer
(GQA: the kv heads, not the query heads), sharded by the training rule table (batch over
dp/fsdp, kv heads over tp). An int8 cache stores each key and value vector (one token, one
kv head) as int8 with its own float32 scale, max|x| / 127, and attends over the dequantized
vectors: 1 + 4 / head_dim bytes per element instead of 2 (bf16) or 4 (fp32). Prompts are left-padded to one length, so every row writes the
same cache slot at each step; a row's positions start at 0 at its first real token, and
pad slots are a segment of their own, so RoPE and masking are exactly training's (`attention_mask` from
segment ids and positions, float32 scores and softmax as in `xla_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig, dtype_of
from llama3_jax.model.attention import attention_mask
from llama3_jax.model.model import (embed_tokens, final_hidden, finish_block, output_logits, project_qkv,
                                    rope_angles)
from llama3_jax.parallel.sharding import constrain

# Heads before slots: both attention products are then plain batched matmuls over (batch,
# kv head): at batch 8 on XLA:CPU, attention over the cache took about half the time of
# the training layout's einsums.
CACHE_AXES = ("batch", "kv_heads", "kv_seq", "head_dim")


def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> dict:
    """{"k": [one array per layer], "v": [...]}: a buffer per layer, each updated in place;
    an int8 cache adds "k_scale" and "v_scale", float32 [batch, kv_heads, length, 1] per layer."""
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    names = {"k": (shape, dtype), "v": (shape, dtype)}
    if jnp.dtype(dtype) == jnp.int8:
        names |= {"k_scale": (shape[:-1] + (1,), jnp.float32), "v_scale": (shape[:-1] + (1,), jnp.float32)}
    return {n: [constrain(jnp.zeros(sh, dt), CACHE_AXES) for _ in range(cfg.n_layers)] for n, (sh, dt) in names.items()}


def quantize_vectors(x):
    """(int8 values, float32 scales [..., 1]) of x [..., head_dim]: symmetric, one scale per
    vector, round to nearest; a zero vector gets scale 0."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def store(cache: dict, name: str, layer: int, new, start):
    """Write `new` [b, t, kv_heads, hd] at slots start .. start + t - 1 of the layer's `name`
    buffer (in place: the caller donates the cache) and return the buffer as attention reads
    it, dequantized for an int8 cache."""
    x = jnp.swapaxes(new, 1, 2)  # [b, kv_heads, t, hd]
    buf = cache[name][layer]
    if buf.dtype != jnp.int8:
        cache[name][layer] = constrain(jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, 0, start, 0)),
                                       CACHE_AXES)
        return cache[name][layer]
    q, scale = quantize_vectors(x)
    cache[name][layer] = constrain(jax.lax.dynamic_update_slice(buf, q, (0, 0, start, 0)), CACHE_AXES)
    scales = cache[name + "_scale"]
    scales[layer] = constrain(jax.lax.dynamic_update_slice(scales[layer], scale, (0, 0, start, 0)), CACHE_AXES)
    return cache[name][layer].astype(jnp.float32) * scales[layer]


def forward_cached(params: dict, tokens, cache: dict, start, pad, cfg: ModelConfig, last_only: bool = False):
    """Logits (float32) of `tokens` [b, t], written at cache slots start .. start + t - 1, and
    the updated cache. `pad` [b]: the number of left-pad slots of each row. `params` has
    the inference layout (`llama3_jax.infer.quant.prepare_params`)."""
    b, t = tokens.shape
    length = cache["k"][0].shape[2]
    positions = start + jnp.arange(t, dtype=jnp.int32)[None, :] - pad[:, None]
    cos, sin = rope_angles(cfg, positions)
    kv_slots = jnp.arange(length, dtype=jnp.int32)[None, :]
    kv_positions = kv_slots - pad[:, None]
    kv_segments = (kv_slots >= pad[:, None]).astype(jnp.int32)  # pad slots: segment 0, never attended
    mask = attention_mask(jnp.ones((b, t), jnp.int32), kv_segments, positions, kv_positions)
    x = embed_tokens(params["embed"], tokens, cfg)

    cache = {n: list(layers) for n, layers in cache.items()}  # the new buffers replace the old
    for i, p in enumerate(params["layers"]):
        q, k, v = project_qkv(x, p, cos, sin, cfg)
        # Written in place into the cache (donated by the caller): no copy per step.
        k, v = store(cache, "k", i, k, start), store(cache, "v", i, v, start)
        a = cached_attention(q, k.astype(x.dtype), v.astype(x.dtype), mask)
        x = finish_block(x, a, p, cfg)
    if last_only:
        x = x[:, -1:]
    logits = output_logits(final_hidden(x, params["norm"], cfg), params, cfg)
    return logits, cache


def cached_attention(q, k, v, mask):
    """q [b, t, heads, hd] over the cache's k, v [b, kv_heads, length, hd], where `mask`
    [b, t, length] allows: `xla_attention`'s arithmetic (float32 scores and softmax)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    q = jnp.moveaxis(q.reshape(b, t, kv, g, d), 1, 2).reshape(b, kv, t * g, d)
    scores = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    allowed = jnp.broadcast_to(mask[:, None, :, None, :], (b, kv, t, g, mask.shape[-1])).reshape(scores.shape)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, v, preferred_element_type=jnp.float32)
    return jnp.moveaxis(out.reshape(b, kv, t, g, d), 2, 1).reshape(b, t, h, d).astype(v.dtype)


def choose(logits, allowed, temperature, top_k, top_p, key):
    """Next tokens [b] from float32 logits [b, vocab] and their log-probabilities under the
    model (log-softmax of the raw logits, as a training forward pass computes them).

    Ids not `allowed` (reserved and unused specials, ids past the tokenizer) are never
    drawn. temperature 0 is greedy; top_k 0 and top_p 1 are off. Each row draws with its
    own key, so a row's tokens depend only on the seed, the step and its place in the batch.
    """
    masked = jnp.where(allowed, logits, -jnp.inf)
    vocab = logits.shape[-1]

    def truncate(scaled):  # top-k, then top-p: one sort, only when either is on
        ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
        kth = jnp.take(ranked, jnp.clip(jnp.where(top_k > 0, top_k, vocab) - 1, 0, vocab - 1), axis=-1)
        # top-p: keep the smallest set of most likely tokens whose probability reaches top_p.
        probs = jax.nn.softmax(jnp.where(ranked >= kth[:, None], ranked, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.maximum(kth, jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1))
        return jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)

    def draw(masked):
        scaled = masked / jnp.maximum(temperature, 1e-6)
        scaled = jax.lax.cond((top_k > 0) | (top_p < 1), truncate, lambda s: s, scaled)
        keys = jax.random.split(key, logits.shape[0])
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    # Greedy decoding skips the sort and the random draw altogether.
    tokens = jax.lax.cond(temperature > 0, draw, lambda m: jnp.argmax(m, axis=-1).astype(jnp.int32), masked)
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


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(params, tokens, cfg: ModelConfig):
    """float32 logits [b, t, vocab] of whole rows through the inference path (a prefill of
    every position): for perplexity in the inference dtype and quantization."""
    b, t = tokens.shape
    cache = empty_cache(cfg, b, t, dtype_of(cfg.compute_dtype))
    return forward_cached(params, tokens, cache, jnp.int32(0), jnp.zeros(b, jnp.int32), cfg)[0]


def replicated(arrays):
    """Small per-row outputs on every device, so every process can read them (multi-host)."""
    return tuple(constrain(a, (None,) * a.ndim) for a in arrays)
