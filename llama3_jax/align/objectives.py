"""The post-training objectives, each `objective(cfg, ordered)(params, batch) -> (summed
loss, {"count": what it is averaged over, ...sums of metrics})` for `train.step.make_step`.

- SFT: next-token loss on answer tokens (the batch's loss mask), and answer-token accuracy.
- Reward model (Bradley-Terry): rows 2i and 2i+1 are pair i's chosen and rejected answers;
  r = value_head . h at a row's last token; loss -log sigmoid(r_chosen - r_rejected).
- DPO (Rafailov et al. 2023, with the NLL term of the Llama 3 paper section 4.1.4):
  -log sigmoid(beta (log-ratio_chosen - log-ratio_rejected)) + nll_coef * NLL per chosen
  token, where a log-ratio is log pi(answer) - log pi_ref(answer) summed over the loss
  mask (formatting tokens excluded) and pi_ref's sums arrive in the batch as `ref_logps`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama3_jax.config import AlignConfig, Config
from llama3_jax.model.loss import head_loss
from llama3_jax.model.model import hidden_states, output_logits, value_of
from llama3_jax.parallel.sharding import replicated


def hidden(params, batch, cfg: Config, ordered: bool = True):
    """Final-normed hidden states [b, s, dim] of a batch dict."""
    return hidden_states(params, batch["tokens"], batch["segment_ids"], batch["positions"], cfg.model, ordered)


def token_logps(params, batch, cfg: Config, ordered: bool = True, h=None):
    """log p(target) of every position [b, s] in float32 (0 where the loss mask is 0), from
    hidden states `h` if given. The target's logit is picked by comparison with an iota, so
    vocab-sharded logits stay put."""
    h = hidden(params, batch, cfg, ordered) if h is None else h
    logits = output_logits(h, params, cfg.model)
    picked = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == batch["targets"][..., None],
                               logits, 0.0), axis=-1)
    return (picked - jax.nn.logsumexp(logits, axis=-1)) * batch["loss_mask"]


def sequence_logps(params, batch, cfg: Config, ordered: bool = True, h=None):
    """Summed log-probabilities of each row's masked tokens [b] (one sequence per row)."""
    return jnp.sum(token_logps(params, batch, cfg, ordered, h), axis=1)


def hidden_fn_of(cfg: Config, ordered: bool, given=None):
    """The objective's `hidden(params, batch)`: given (the pipeline's), else the model's."""
    return given or (lambda params, batch: hidden(params, batch, cfg, ordered))


def sft(cfg: Config, ordered: bool, hidden_fn=None):
    hidden_fn = hidden_fn_of(cfg, ordered, hidden_fn)

    def objective(params, batch):
        h = hidden_fn(params, batch)
        loss = head_loss(h, params, batch["targets"], batch["loss_mask"], cfg.model)
        guess = jnp.argmax(output_logits(jax.lax.stop_gradient(h), jax.lax.stop_gradient(params), cfg.model), -1)
        correct = jnp.sum((guess == batch["targets"]) * batch["loss_mask"])
        return loss, {"count": jnp.sum(batch["loss_mask"]), "accuracy": correct}
    return objective


def last_token_values(params, batch, cfg: Config, ordered: bool = True, h=None):
    """The value head at each row's last token [b] (one sequence per row, from position 0)."""
    h = hidden(params, batch, cfg, ordered) if h is None else h
    length = jnp.sum(batch["segment_ids"] > 0, axis=1)
    last = (batch["positions"] == (length - 1)[:, None]) & (batch["segment_ids"] > 0)
    return value_of(jnp.einsum("bs,bsd->bd", last.astype(h.dtype), h), params)


def bradley_terry(chosen, rejected):
    """Summed -log sigmoid(r_chosen - r_rejected), and metric sums."""
    margin = chosen - rejected
    return jnp.sum(jax.nn.softplus(-margin)), {
        "count": jnp.float32(margin.shape[0]), "accuracy": jnp.sum(margin > 0).astype(jnp.float32),
        "margin": jnp.sum(margin), "reward_chosen": jnp.sum(chosen), "reward_rejected": jnp.sum(rejected)}


def reward_model(cfg: Config, ordered: bool, hidden_fn=None):
    hidden_fn = hidden_fn_of(cfg, ordered, hidden_fn)

    def objective(params, batch):
        r = last_token_values(params, batch, cfg, h=hidden_fn(params, batch)).reshape(-1, 2)
        return bradley_terry(r[:, 0], r[:, 1])
    return objective


def dpo_loss(logps, ref_logps, chosen_tokens, ac: AlignConfig):
    """Summed DPO loss of pairs from per-row sums [2 * pairs] (chosen rows first in each
    pair), the chosen answers' token counts [pairs], and metric sums."""
    ratio = (logps - ref_logps).reshape(-1, 2)
    chosen, rejected = ratio[:, 0], ratio[:, 1]
    preference = jax.nn.softplus(-ac.dpo_beta * (chosen - rejected))
    nll = -logps.reshape(-1, 2)[:, 0] / jnp.maximum(chosen_tokens, 1.0)
    return jnp.sum(preference + ac.dpo_nll_coef * nll), {
        "count": jnp.float32(chosen.shape[0]), "dpo_loss": jnp.sum(preference), "nll": jnp.sum(nll),
        "reward_margin": ac.dpo_beta * jnp.sum(chosen - rejected), "chosen_logratio": jnp.sum(chosen),
        "rejected_logratio": jnp.sum(rejected), "accuracy": jnp.sum(chosen > rejected).astype(jnp.float32)}


def dpo(cfg: Config, ordered: bool, hidden_fn=None):
    hidden_fn = hidden_fn_of(cfg, ordered, hidden_fn)

    def objective(params, batch):
        logps = sequence_logps(params, batch, cfg, h=hidden_fn(params, batch))
        chosen_tokens = jnp.sum(batch["loss_mask"], axis=1).reshape(-1, 2)[:, 0]
        return dpo_loss(logps, batch["ref_logps"], chosen_tokens, cfg.align)
    return objective


OBJECTIVES = {"sft": sft, "rm": reward_model, "dpo": dpo}


def on_host(fn, mesh, **settings):
    """`fn(params, batch, **settings)` jitted with its result on every device of `mesh`, so
    that every process can read all of it (several processes run the same SPMD program)."""
    return jax.jit(functools.partial(fn, **settings), out_shardings=replicated(mesh))
