"""What each post-training stage brings to train.py's loop: its config adjustments, its rows,
its objective and batch keys, the frozen reference (DPO) and its evaluation on the task.

    python train.py --stage sft|rm|dpo|ppo [--config ... --mesh ... --out DIR]
                    [train.init_from=RUN_OR_HF_DIR] [data.path=ROWS.jsonl]

With no data.path the stage trains on the synthetic arithmetic task (`align.task`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np

from llama3_jax.align import objectives, ppo, task
from llama3_jax.config import Config, ConfigError
from llama3_jax.data.chat import (as_example, chat_tokens, load_examples, make_chat_iterator, pairs_batch,
                                  rows_batch)
from llama3_jax.infer.generate import Sampling, allowed_ids, completion, generate
from llama3_jax.parallel.sharding import fold_pp_cp

ROWS = {"sft": "sft", "rm": "pairs", "dpo": "pairs", "ppo": "prompts"}
BATCH_AXES = {k: ("batch", "seq") for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}


def configure(cfg: Config, out: pathlib.Path) -> Config:
    """The stage's config: a value head for the reward model, and the synthetic task's rows
    (written under the run) when no data is given."""
    stage = cfg.train.stage
    if stage == "ppo":
        ppo.check(cfg)
    if (stage == "rm" or (stage == "ppo" and not cfg.align.grpo)) and not cfg.model.value_head:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_head=True))
    if not cfg.data.path and not cfg.data.sources:
        path = task.write_task(out / "task", ROWS[stage], cfg.align.task_rows, cfg.align.task_max_operand,
                               seed=cfg.data.seed)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))
    return cfg


def on_task(cfg: Config, out: pathlib.Path) -> bool:
    """Whether the run trains on the synthetic task (then its evaluation means something)."""
    return pathlib.Path(cfg.data.path).parent == out / "task"


def batches(cfg: Config, tok, *, process_index: int, process_count: int, log=print):
    """(make, examples): the `ShardedBatches` iterator factory of the stage's rows."""
    stage = cfg.train.stage
    formatting = not (stage == "dpo" and cfg.align.dpo_mask_formatting)
    examples, skipped = load_examples(cfg.data, tok, ROWS[stage], cfg.data.seq_len, formatting=formatting)
    log(f"data: {len(examples)} {ROWS[stage]} rows from {cfg.data.path or 'data.sources'}"
        + (f"; skipped {len(skipped)} bad rows (data.skip_bad_rows):" if skipped else ""))
    for where, why in skipped:
        log(f"  skipped {where}: {why}")
    return functools.partial(make_chat_iterator, examples, ROWS[stage], cfg.data), examples


def rollouts(cfg: Config, tok, mesh, log=print) -> ppo.Rollouts:
    """The PPO stage's stream of mini-batches, sampled from the policy (set `.policy` and
    `.reference` before drawing) on the training mesh's devices with its pp and cp folded
    into fsdp (the generator and a reward model run there). With several processes, each
    samples the same whole rollout and draws its own rows of each mini-batch."""
    from llama3_jax.align.rejection import reward_function
    examples, skipped = load_examples(cfg.data, tok, "prompts", cfg.data.seq_len)
    prompts = [messages for (messages,) in examples]
    longest = max(len(tok.encode_dialog(m)) for m in prompts)
    if longest + cfg.align.max_new_tokens > cfg.data.seq_len + 1:
        raise ConfigError(f"prompts of up to {longest} tokens plus align.max_new_tokens={cfg.align.max_new_tokens} "
                          f"exceed data.seq_len={cfg.data.seq_len}; raise data.seq_len")
    spec = cfg.align.reward or "python:llama3_jax.align.task.reward"
    log(f"data: {len(prompts)} prompts from {cfg.data.path}; reward {spec}"
        + (f"; skipped {len(skipped)} bad rows (data.skip_bad_rows)" if skipped else ""))
    mesh = fold_pp_cp(mesh)
    return ppo.Rollouts(cfg, tok, prompts, reward_function(spec, mesh, tok), mesh, None, cfg.data.seq_len)


def objective(cfg: Config):
    return ppo.objective if cfg.train.stage == "ppo" else objectives.OBJECTIVES[cfg.train.stage]


def batch_axes(cfg: Config) -> dict:
    if cfg.train.stage == "ppo":
        return {k: ("batch", "seq") for k in ppo.KEYS}
    return BATCH_AXES | ({"ref_logps": ("batch",)} if cfg.train.stage == "dpo" else {})


class Reference:
    """The frozen DPO reference on the run's mesh: adds `ref_logps` (each row's summed
    log-probabilities over its loss mask) to a batch already on the devices."""

    def __init__(self, params: dict, cfg: Config, mesh, out_sharding):
        self.params, self.mesh = params, mesh
        self._fn = jax.jit(functools.partial(objectives.sequence_logps, cfg=cfg, ordered=mesh.shape["cp"] == 1),
                           out_shardings=out_sharding)

    def __call__(self, batch: dict) -> dict:
        with jax.set_mesh(self.mesh):
            return batch | {"ref_logps": self._fn(self.params, batch)}


# ------------------------------------------------------------------------ evaluation

def task_accuracy(params, cfg: Config, tok, mesh, n: int = 64, held: bool = False) -> float:
    """Greedy answers to n problems of the task (training problems, or held-out ones): the
    fraction that are right."""
    rows = task.rows("prompts", n, cfg.align.task_max_operand, seed=cfg.data.seed + 7, held=held)
    prompts = [tok.encode_dialog(r["prompt"]) for r in rows]
    stops = sorted(tok.stop_ids)
    g = generate(params, cfg.model, prompts, Sampling(max_new_tokens=8), stop_ids=stops,
                 allowed=allowed_ids(cfg.model.vocab_size, tok, stops), mesh=mesh)
    return float(np.mean([task.reward(r["prompt"], completion(tok, ids)) for r, ids in zip(rows, g.tokens)]))


def answer_probability(params, cfg: Config, tok, mesh, n: int = 64) -> float:
    """The mean probability the policy gives the right answer (and its <|eot_id|>) on n
    training problems: the expected reward of sampling at temperature 1, with no sampling noise."""
    rows = task.rows("sft", n, cfg.align.task_max_operand, seed=cfg.data.seed + 7)
    seqs = [as_example(*chat_tokens(tok, r["messages"])) for r in rows]
    batch = rows_batch(seqs, max(len(x) for x in seqs))
    with jax.set_mesh(mesh):
        logps = np.asarray(objectives.on_host(objectives.sequence_logps, mesh, cfg=cfg)(params, batch))
    return float(np.mean(np.exp(logps)))


def pair_accuracy(params, cfg: Config, tok, mesh, n: int = 64, held: bool = False) -> float:
    """The reward model on n pairs never trained on (training problems with wrong answers
    that training never shows, or held-out problems): the fraction ranking the right higher."""
    rows = task.rows("pairs", n, cfg.align.task_max_operand, seed=cfg.data.seed + 7, held=held, unseen_wrong=True)
    seqs = [chat_tokens(tok, r["prompt"] + r[k])[0] for r in rows for k in ("chosen", "rejected")]
    r = rewards(params, cfg, seqs, mesh)
    return float(np.mean(r[0::2] > r[1::2]))


def rewards(params, cfg: Config, seqs, mesh) -> np.ndarray:
    """The reward model's value at the last token of each token sequence."""
    examples = [as_example(np.asarray(ids, np.int32), np.zeros(len(ids), bool)) for ids in seqs]
    batch = rows_batch(examples, max(len(x) for x in examples))
    with jax.set_mesh(mesh):
        fn = objectives.on_host(objectives.last_token_values, mesh, cfg=cfg)
        return np.asarray(fn(params, batch))


def dpo_pairs(params, ref_params, cfg: Config, tok, mesh, n: int = 64) -> dict:
    """DPO's implicit reward on n pairs never trained on: the fraction where the chosen
    answer's log-ratio to the reference beats the rejected one's, and the mean margin."""
    rows = task.rows("pairs", n, cfg.align.task_max_operand, seed=cfg.data.seed + 7, unseen_wrong=True)
    formatting = not cfg.align.dpo_mask_formatting
    pairs = [tuple(as_example(*chat_tokens(tok, r["prompt"] + r[k], formatting)) for k in ("chosen", "rejected"))
             for r in rows]
    batch = pairs_batch(pairs, max(len(x) for p in pairs for x in p))
    with jax.set_mesh(mesh):
        fn = objectives.on_host(objectives.sequence_logps, mesh, cfg=cfg)
        ratio = (np.asarray(fn(params, batch)) - np.asarray(fn(ref_params, batch))).reshape(-1, 2)
    margin = cfg.align.dpo_beta * (ratio[:, 0] - ratio[:, 1])
    return {"eval_dpo_accuracy": float(np.mean(margin > 0)), "eval_reward_margin": float(np.mean(margin))}


def evaluate(params, cfg: Config, tok, mesh, reference=None) -> dict:
    """The stage's effect on the task: {metric: value} on pairs (reward model, DPO) or
    problems (policies) never trained on."""
    if cfg.train.stage == "rm":
        return {"eval_pair_accuracy": pair_accuracy(params, cfg, tok, mesh),
                "eval_heldout_pair_accuracy": pair_accuracy(params, cfg, tok, mesh, held=True)}
    out = {"eval_task_accuracy": task_accuracy(params, cfg, tok, mesh),
           "eval_heldout_task_accuracy": task_accuracy(params, cfg, tok, mesh, held=True),
           "eval_answer_probability": answer_probability(params, cfg, tok, mesh)}
    if reference is not None:
        out |= dpo_pairs(params, reference, cfg, tok, mesh)
    return out


def check_reference(cfg: Config) -> str:
    """The reference DPO compares with: align.reference, else train.init_from, else '' (the
    run's own initial weights)."""
    ref = cfg.align.reference or cfg.train.init_from
    if ref and not pathlib.Path(ref).exists():
        raise ConfigError(f"align.reference {ref} does not exist; give the SFT run (or leave it empty)")
    return ref
