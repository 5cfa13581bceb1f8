"""The training loss: summed float32 token cross-entropy of the model's logits, whole or
over chunks of the sequence (model.loss_chunk).

The whole-sequence loss is one function with its own backward pass (`linear_cross_entropy`):
autodiff of logits = h @ head lays out the [tokens, vocab] gradient transposed for the
weight gradient, and on CPU that copy alone cost as long as the head's matmul. The
written-out backward transposes the hidden states instead, which are vocab / dim times
smaller."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model.model import hidden_states, output_head, tokens_last
from llama3_jax.parallel.sharding import constrain


def cross_entropy(logits, targets, loss_mask):
    """Summed float32 token losses. The target logit is picked by comparison with an iota,
    so vocab-sharded logits are reduced in place and never gathered onto one device."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.sum(jnp.where(_vocab_ids(logits) == targets[..., None], logits, 0.0), axis=-1)
    return jnp.sum((lse - target_logit) * loss_mask)


def _vocab_ids(logits):
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)


@jax.custom_vjp
def linear_cross_entropy(h, head, targets, loss_mask):
    """`cross_entropy(h @ head, targets, loss_mask)`: h [b, s, dim], head [dim, vocab]."""
    return _linear_cross_entropy_fwd(h, head, targets, loss_mask)[0]


def _linear_cross_entropy_fwd(h, head, targets, loss_mask):
    w = head.astype(h.dtype)
    logits = constrain(jnp.einsum("bsd,dv->bsv", h, w, preferred_element_type=jnp.float32), ("batch", "seq", "vocab"))
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - top)  # kept for the backward pass, which then needs no exp of its own
    total = jnp.sum(e, axis=-1)
    lse = top[..., 0] + jnp.log(total)
    # The target's logit from its own column of the head: [tokens, dim] work instead of a
    # pass over [tokens, vocab] (under tensor parallelism a gather of [tokens, dim] rows).
    target_logit = jnp.einsum("bsd,bsd->bs", h, jnp.take(w.T, targets, axis=0), preferred_element_type=jnp.float32)
    return jnp.sum((lse - target_logit) * loss_mask), (h, head, e, total, targets, loss_mask)


def _linear_cross_entropy_bwd(res, g):
    h, head, e, total, targets, loss_mask = res
    # d loss / d logits = softmax - one-hot, per token scaled by its mask (and the cotangent).
    onehot = _vocab_ids(e) == targets[..., None]
    dlogits = ((e / total[..., None] - onehot) * (loss_mask * g)[..., None]).astype(h.dtype)
    # Materialised once: fused into each of the two matmuls below, XLA:CPU computed it inside
    # both, at half their speed.
    dlogits = jax.lax.optimization_barrier(constrain(dlogits, ("batch", "seq", "vocab")))
    dh = jnp.einsum("bsv,dv->bsd", dlogits, head.astype(h.dtype), preferred_element_type=jnp.float32)
    # The weight gradient as (h^T) @ dlogits with h^T materialised (small), so that XLA does not
    # transpose the [tokens, vocab] gradient instead; (batch, seq) stay unmerged for CP.
    dhead = jnp.einsum("dbs,bsv->dv", tokens_last(h), dlogits, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dhead.astype(head.dtype), None, None


linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def chunked_cross_entropy(h, head, targets, loss_mask, chunk: int):
    """`cross_entropy(h @ head, ...)` over chunks of `chunk` positions. Each chunk's logits are
    rematerialised, so the backward pass recomputes them instead of keeping [b, s, vocab]
    float32 logits and their gradient. Chunk i holds positions i, i+n, i+2n, ... (n chunks),
    so every chunk spreads evenly over the sequence's shards under context parallelism; the
    vocabulary stays sharded under tensor parallelism."""
    b, s = targets.shape
    n = s // chunk

    def split(x):  # [b, s, ...] -> [n, b, chunk, ...]
        return jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)

    @jax.checkpoint
    def one(total, xs):
        hc, tc, mc = xs
        logits = jnp.einsum("bsd,dv->bsv", hc, head.astype(hc.dtype), preferred_element_type=jnp.float32)
        return total + cross_entropy(constrain(logits, ("batch", "seq", "vocab")), tc, mc), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (split(h), split(targets), split(loss_mask)))
    return total


def head_loss(h, params, targets, loss_mask, cfg: ModelConfig):
    """Summed token losses of final-normed hidden states [b, s, dim] through the output head."""
    if cfg.loss_chunk and cfg.loss_chunk < targets.shape[1]:
        return chunked_cross_entropy(h, output_head(params, cfg), targets, loss_mask, cfg.loss_chunk)
    return linear_cross_entropy(h, output_head(params, cfg), targets, loss_mask)


def loss_sum(params, batch, cfg: ModelConfig, ordered: bool = True):
    """Summed token losses of a batch dict (tokens, targets, segment_ids, positions, loss_mask);
    `ordered` as in `hidden_states`."""
    h = hidden_states(params, batch["tokens"], batch["segment_ids"], batch["positions"], cfg, ordered)
    return head_loss(h, params, batch["targets"], batch["loss_mask"], cfg)
