"""Attention behind one function, so fused kernels plug in without touching the model.

Every implementation takes q [batch, q_len, heads, head_dim], k and v [batch, kv_len,
kv_heads, head_dim], plus per-token segment ids and positions for both sides, and
returns [batch, q_len, heads, head_dim]. A query attends to a key when both are in the
same segment (document) and the key's position is not after the query's. Masking by
positions rather than by array index keeps attention correct when the sequence is
reordered (context parallelism's load-balanced chunks) or packed with several documents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """Boolean [batch, q_len, kv_len]: same document and causal by position."""
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    causal = q_positions[:, :, None] >= kv_positions[:, None, :]
    return same_doc & causal


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """Reference implementation in plain XLA ops; scores and softmax in float32."""
    b, s, h, d = q.shape
    kv_heads = k.shape[2]
    # GQA without materialising repeated K/V: group query heads by their kv head.
    q = q.reshape(b, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(v.dtype)


def jax_nn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """`jax.nn.dot_product_attention`, which picks cuDNN's fused kernel on GPUs that have it."""
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


IMPLEMENTATIONS = {"xla": xla_attention, "jax_nn": jax_nn_attention}


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, impl="xla"):
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"model.attention_impl={impl!r} unknown; choose one of "
                         f"{', '.join(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
