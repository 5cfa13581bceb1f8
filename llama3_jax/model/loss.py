"""The training loss: summed float32 token cross-entropy of the model's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama3_jax.config import ModelConfig
from llama3_jax.model.model import forward


def cross_entropy(logits, targets, loss_mask):
    """Summed float32 token losses. The target logit is picked by comparison with an iota,
    so vocab-sharded logits are reduced in place and never gathered onto one device."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    return jnp.sum((lse - target_logit) * loss_mask)


def loss_sum(params, batch, cfg: ModelConfig):
    """Summed token losses of a batch dict (tokens, targets, segment_ids, positions, loss_mask)."""
    logits = forward(params, batch["tokens"], cfg, batch["segment_ids"], batch["positions"])
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])
