"""Attention behind one function, so fused kernels plug in without touching the model.

Every implementation takes q [batch, q_len, heads, head_dim], k and v [batch, kv_len,
kv_heads, head_dim], plus per-token segment ids and positions for both sides, and
returns [batch, q_len, heads, head_dim]. A query attends to a key when both are in the
same segment (document) and the key's position is not after the query's. Masking by
positions rather than by array index keeps attention correct when the sequence is
reordered (context parallelism's load-balanced chunks) or packed with several documents.

When the tokens are in sequence order (`ordered`: every document's tokens in order, as
packed rows are unless context parallelism reorders them), no query attends to a key at a
later index, so query block i needs only the keys before its end: the blocks above the
diagonal, all masked, are never computed. That halves causal attention's work.
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


def chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, chunk=1024):
    """`xla_attention` over blocks of `chunk` queries, one block at a time.

    Each query row still takes its softmax over all keys, so the result equals
    `xla_attention`; only one block's [chunk, kv_len] scores exist at once (forward and,
    being rematerialised, backward) instead of [q_len, kv_len]: at 8K tokens and 32 heads
    that is 0.5 GB instead of 8.6 GB of float32 scores per layer.
    """
    b, s = q.shape[:2]
    if s <= chunk or s % chunk:
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    n = s // chunk

    # Block j holds queries j, j + n, j + 2n, ...: strided, so that a sequence sharded over
    # context parallelism shards every block the same way and the loop runs over an unsharded
    # axis. Contiguous blocks put the loop on the sharded axis, which XLA can only gather: at
    # 8K tokens on cp=8 the step took 14x the one-device step.
    def blocks(x):  # [b, s, ...] -> [n, b, chunk, ...]
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    @jax.checkpoint
    def one_block(args):
        qb, seg, pos = args
        return xla_attention(qb, k, v, seg, kv_segment_ids, pos, kv_positions)

    out = jax.lax.map(one_block, (blocks(q), blocks(q_segment_ids), blocks(q_positions)))
    return jnp.moveaxis(out, 0, 2).reshape(q.shape)


def jax_nn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, ordered=False):
    """`jax.nn.dot_product_attention`: cuDNN's fused flash kernel when tracing for a GPU in
    bf16/fp16 (JAX's own default is its XLA path, so cuDNN must be asked for by name), else
    XLA. The full mask is passed either way, so packed documents stay exact; for ordered
    tokens `is_causal` is implied by that mask and lets cuDNN skip the blocks above the
    diagonal."""
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=ordered and cudnn,
                                        implementation="cudnn" if cudnn else None)


def causal_blocks(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, block: int, remat: bool):
    """`xla_attention` of query block i over keys [0, (i+1) * block) only: exact for tokens
    in sequence order, whose later keys are all masked for these queries."""
    fn = jax.checkpoint(xla_attention) if remat else xla_attention
    outs = [fn(q[:, a:a + block], k[:, :a + block], v[:, :a + block], q_segment_ids[:, a:a + block],
               kv_segment_ids[:, :a + block], q_positions[:, a:a + block], kv_positions[:, :a + block])
            for a in range(0, q.shape[1], block)]
    return jnp.concatenate(outs, axis=1)


CAUSAL_BLOCKS_MAX = 8192
IMPLEMENTATIONS = {"xla": xla_attention, "xla_chunked": chunked_attention, "jax_nn": jax_nn_attention}


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, impl="xla", ordered=False):
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"model.attention_impl={impl!r} unknown; choose one of "
                         f"{', '.join(IMPLEMENTATIONS)}") from None
    s = q.shape[1]
    if ordered and impl != "jax_nn" and k.shape[1] == s:
        # xla_chunked keeps its blocks of 1024 queries, rematerialised; xla takes up to 8
        # blocks of at least 128 (smaller ones cost more in overhead than they save), whose
        # saved probabilities already take half of plain xla's [s, s].
        block = 1024 if impl == "xla_chunked" else max(128, s // 8)
        # XLA schedules the unrolled blocks together, so their scores add up to about [s, s] / 2:
        # past CAUSAL_BLOCKS_MAX tokens xla_chunked takes its one-block-at-a-time loop instead,
        # whose memory grows linearly with s (at twice the block work).
        if s > block and s % block == 0 and (impl != "xla_chunked" or s <= CAUSAL_BLOCKS_MAX):
            return causal_blocks(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, block,
                                 remat=impl == "xla_chunked")
    if impl == "jax_nn":
        return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, ordered=ordered and k.shape[1] == s)
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
