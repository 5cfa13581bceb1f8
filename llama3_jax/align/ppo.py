"""PPO and GRPO on the policy's own samples (`train.py --stage ppo [align.grpo=true]`).

A rollout: prompts (each `align.group_size` times) -> the KV-cache generator at
`align.temperature` -> a reward per answer (a reward model or a Python function) -> rows of
prompt + answer, one per row, whose loss mask covers the answer's tokens. On the devices,
without gradients: the policy's log-probabilities (the "old" ones), the frozen reference's,
and the value head's estimates. Sampling and these measurements run on the rollout mesh: the
training mesh's devices with pp and cp folded into fsdp (`parallel.sharding.fold_pp_cp`; the
training mesh itself when it has neither), the policy's and reference's parameters moved
there by `jax.device_put` for each rollout. With several processes, every process samples
and measures the same whole rollout (same prompts, same seeds, one SPMD program whose
results are replicated) and draws its own rows of each mini-batch, as the other stages'
batches do. On the host, in NumPy:

- PPO: per-token rewards -kl_coef * (log pi - log pi_ref), plus the answer's reward at its
  last token; GAE(gamma, lambda) advantages and returns over the answer's tokens; the
  advantages whitened over the rollout.
- GRPO: each answer's advantage is its reward normalised within its prompt's group
  ((r - mean) / (std + eps)), the same on all its tokens; no value model, and the KL to
  the reference is a loss term (the k3 estimator) rather than a reward.

Then `ppo_epochs` passes over the rollout in `ppo_minibatches` shuffled mini-batches, each one
optimizer update of the clipped objective (`objective`): the clipped policy loss, the
clipped value loss times value_coef (PPO), the KL term (GRPO); metrics policy_loss,
value_loss, clip_fraction, entropy and approx_kl. The value model is a scalar head on the
policy's backbone (model.value_head), initialised with the policy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.align import objectives
from llama3_jax.config import Config, ConfigError
from llama3_jax.model.model import PARAM_AXES, output_logits, value_of
from llama3_jax.parallel.sharding import param_shardings

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "old_logps", "ref_logps", "values",
        "advantages", "returns")


def check(cfg: Config) -> None:
    a, t = cfg.align, cfg.train
    per_rollout = a.ppo_epochs * a.ppo_minibatches
    if min(a.group_size, a.ppo_epochs, a.ppo_minibatches, a.max_new_tokens) < 1 or (a.grpo and a.group_size < 2):
        raise ConfigError("align.group_size, ppo_epochs, ppo_minibatches and max_new_tokens must be positive, "
                          "and align.grpo needs align.group_size >= 2")
    if (t.global_batch * a.ppo_minibatches) % a.group_size:
        raise ConfigError(f"a rollout of train.global_batch x align.ppo_minibatches = "
                          f"{t.global_batch * a.ppo_minibatches} answers does not divide into groups of "
                          f"align.group_size={a.group_size}")
    if t.steps % per_rollout or t.checkpoint_every % per_rollout:
        raise ConfigError(f"train.steps={t.steps} and train.checkpoint_every={t.checkpoint_every} count updates: "
                          f"make both multiples of align.ppo_epochs x align.ppo_minibatches = {per_rollout}")
    if t.micro_batches != 1:
        raise ConfigError("train.stage=ppo updates on whole mini-batches: set train.micro_batches=1")


# ---------------------------------------------------------------- advantages (NumPy)

def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns) [b, s] of per-position rewards and values over each row's masked
    positions (one contiguous answer per row; the value after the last is 0)."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for i in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[i])
        last, next_value = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t], next_value = last, values[i, t]
    return adv.astype(np.float32), (adv + values * mask).astype(np.float32)


def group_advantages(scores, group_size: int, eps: float = 1e-6):
    """GRPO: each score normalised by its group's mean and standard deviation."""
    s = np.asarray(scores, np.float64).reshape(-1, group_size)
    return ((s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + eps)).reshape(-1).astype(np.float32)


def whiten(x, mask, eps: float = 1e-8):
    m = mask > 0
    mean, std = x[m].mean(), x[m].std()
    return np.where(m, (x - mean) / (std + eps), 0.0).astype(np.float32)


def advantages(scores, old_logps, ref_logps, values, mask, cfg: Config):
    """(advantages, returns) of a rollout, as the module docstring says."""
    a = cfg.align
    if a.grpo:
        adv = group_advantages(scores, a.group_size)[:, None] * mask
        return adv.astype(np.float32), np.zeros_like(adv, np.float32)
    rewards = -a.kl_coef * (old_logps - ref_logps) * mask
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    rewards[np.arange(len(scores)), last] += scores
    adv, returns = gae(rewards, values * mask, mask, a.gamma, a.gae_lambda)
    return whiten(adv, mask), returns


# ---------------------------------------------------------------- the objective

def losses(logp, logp_all, values, batch, a):
    """The summed clipped objective of per-position log-probabilities [b, s] (and the full
    log-softmax [b, s, vocab] for the entropy, and the value head's [b, s]), with metric sums."""
    m, adv = batch["loss_mask"], batch["advantages"]
    ratio = jnp.exp(logp - batch["old_logps"])
    policy = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - a.ppo_clip, 1 + a.ppo_clip) * adv)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    sums = {"count": jnp.sum(m), "policy_loss": jnp.sum(policy * m), "entropy": jnp.sum(entropy * m),
            "clip_fraction": jnp.sum((jnp.abs(ratio - 1) > a.ppo_clip) * m),
            "approx_kl": jnp.sum((batch["old_logps"] - logp) * m)}
    if a.grpo:  # k3: exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased KL estimate
        d = batch["ref_logps"] - logp
        kl = jnp.exp(d) - d - 1
        sums["kl_loss"] = jnp.sum(kl * m)
        return jnp.sum((policy + a.kl_coef * kl) * m), sums
    old, returns = batch["values"], batch["returns"]
    clipped = old + jnp.clip(values - old, -a.value_clip, a.value_clip)
    value = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    sums["value_loss"] = jnp.sum(value * m)
    return jnp.sum((policy + a.value_coef * value) * m), sums


def objective(cfg: Config, ordered: bool, hidden_fn=None):
    hidden_fn = objectives.hidden_fn_of(cfg, ordered, hidden_fn)

    def fn(params, batch):
        h = hidden_fn(params, batch)
        logp_all = jax.nn.log_softmax(output_logits(h, params, cfg.model), axis=-1)
        iota = jax.lax.broadcasted_iota(jnp.int32, logp_all.shape, 2)
        logp = jnp.sum(jnp.where(iota == batch["targets"][..., None], logp_all, 0.0), axis=-1)
        values = None if cfg.align.grpo else value_of(h, params)
        return losses(logp, logp_all, values, batch, cfg.align)
    return fn


def _measure(params, batch, cfg: Config, with_values: bool):
    """Per-position log-probabilities of the targets and (PPO) the value head's estimates."""
    h = objectives.hidden(params, batch, cfg)
    logp = objectives.token_logps(params, batch, cfg, h=h)
    return logp, (value_of(h, params) if with_values else jnp.zeros_like(logp))


# ---------------------------------------------------------------- rollouts

class Rollouts:
    """The PPO stage's batch stream for train.py's loop: each draw is one update's
    mini-batch; when a rollout is used up, the next is sampled from `policy()` (the loop's
    current parameters). Its state is (prompt position, rollouts so far), taken at rollout
    boundaries (checkpoint_every is a multiple of the updates per rollout). `mesh`: the mesh
    it samples and measures on (no pp or cp; see the module docstring)."""

    def __init__(self, cfg: Config, tok, prompts: list, score, mesh, reference: dict, seq_len: int,
                 process_index: int | None = None, process_count: int | None = None):
        from llama3_jax.infer.generate import Sampling, allowed_ids
        self.cfg, self.tok, self.prompts, self.score, self.mesh = cfg, tok, prompts, score, mesh
        self.reference, self.seq_len = reference, seq_len
        a = cfg.align
        self.rows = cfg.train.global_batch * a.ppo_minibatches
        self.sampling = Sampling(a.max_new_tokens, a.temperature, seed=cfg.train.seed)
        self.stops = sorted(tok.stop_ids)
        self.allowed = allowed_ids(cfg.model.vocab_size, tok, self.stops)
        # Replicated results: every process reads the whole rollout's measurements.
        self.measure = objectives.on_host(_measure, mesh, cfg=cfg, with_values=not a.grpo)
        self.measure_ref = objectives.on_host(_measure, mesh, cfg=cfg, with_values=False)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.position, self.count, self.queue, self.stats = 0, 0, [], {}
        self.policy = None  # set by the loop: () -> the current parameters

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.queue:
            self._rollout()
        rows = self.cfg.train.global_batch // self.process_count  # this process's rows of the mini-batch
        return {k: v[self.process_index * rows:(self.process_index + 1) * rows] for k, v in self.queue.pop(0).items()}

    def _rollout(self):
        from llama3_jax.infer.generate import completion, generate
        a, g = self.cfg.align, self.cfg.align.group_size
        n = self.rows // g
        rows = [self.prompts[(self.position + i) % len(self.prompts)] for i in range(n)]
        messages = [r for r in rows for _ in range(g)]
        ids = [self.tok.encode_dialog(m) for m in messages]
        params, reference = self._on_mesh(self.policy()), self._on_mesh(self.reference)
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + self.count)
        out = generate(params, self.cfg.model, ids, sampling, stop_ids=self.stops, allowed=self.allowed,
                       mesh=self.mesh)
        scores = np.asarray(self.score(messages, [completion(self.tok, t) for t in out.tokens]), np.float32)
        batch = self._rows(ids, out.tokens)
        with jax.set_mesh(self.mesh):
            old, values = (np.asarray(x) for x in self.measure(params, batch))
            ref, _ = (np.asarray(x) for x in self.measure_ref(reference, batch))
        mask = batch["loss_mask"]
        adv, returns = advantages(scores, old, ref, values, mask, self.cfg)
        batch |= {"old_logps": old, "ref_logps": ref, "values": values * mask, "advantages": adv, "returns": returns}
        self.stats[self.count] = {"reward": float(scores.mean()),
                                  "kl": float(np.sum((old - ref) * mask) / len(scores)),
                                  "answer_tokens": float(mask.sum() / len(scores))}
        rng = np.random.default_rng((self.cfg.train.seed, self.count))
        size = self.cfg.train.global_batch
        for _ in range(a.ppo_epochs):
            order = rng.permutation(self.rows)
            self.queue += [{k: v[order[j:j + size]] for k, v in batch.items()} for j in range(0, self.rows, size)]
        self.position = (self.position + n) % len(self.prompts)
        self.count += 1

    def _on_mesh(self, params: dict) -> dict:
        """Parameters on the rollout mesh (as they are, when they live there already)."""
        shardings = param_shardings(PARAM_AXES, {n: x.shape for n, x in params.items()}, self.mesh)
        if all(getattr(x, "sharding", None) == shardings[n] for n, x in params.items()):
            return params
        return jax.device_put(params, shardings)

    def _rows(self, prompts, answers) -> dict:
        s = self.seq_len
        b = {k: np.zeros((self.rows, s), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        b["loss_mask"] = np.zeros((self.rows, s), np.float32)
        for i, (p, t) in enumerate(zip(prompts, answers)):
            seq = np.asarray(list(p) + list(t), np.int32)[:s + 1]
            n = len(seq) - 1
            b["tokens"][i, :n], b["targets"][i, :n] = seq[:-1], seq[1:]
            b["segment_ids"][i, :n], b["positions"][i, :n] = 1, np.arange(n)
            b["loss_mask"][i, len(p) - 1:n] = 1  # the positions whose next token is the answer's
        return b

    def stats_of(self, index: int) -> dict:
        """The rollout statistics (reward, KL to the reference, answer length) of batch `index`."""
        a = self.cfg.align
        return self.stats.get(index // (a.ppo_epochs * a.ppo_minibatches), {})

    # The data-stream interface of train.py's loop. Checkpoints fall between rollouts (except
    # a save on SIGTERM: its resume samples a fresh rollout rather than finish the old one).
    def get_state(self) -> dict:
        return {"position": self.position, "rollouts": self.count, "pending": len(self.queue)}

    def gather_state(self, local):
        return local

    def set_state(self, state: dict) -> None:
        self.position, self.count, self.queue = state["position"], state["rollouts"], []

    def bad_rows(self):
        return (0, 0, 0)
