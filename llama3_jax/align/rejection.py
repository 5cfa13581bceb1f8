"""Rejection sampling (Llama 3 paper section 4.2.2): K answers per prompt from the policy,
scored by a reward model or a Python function; the best answer per prompt becomes an SFT
row, with every candidate and score kept for inspection.

    python -m llama3_jax.rejection_sample --policy RUN --reward RM_RUN --prompts FILE --k 8 --out best.jsonl
    python -m llama3_jax.rejection_sample ... --reward python:llama3_jax.align.task.reward

A reward function is `fn(prompt_messages, completion_text) -> float` (for verifiable tasks:
arithmetic, code tests). Prompt rows are `{"prompt": [messages]}` (TRL's format); other
fields are carried through. Output rows: `{"messages": prompt + [best answer], "score",
"candidates", "scores", ...}`, ready for `train.py --stage sft data.path=...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pathlib
import sys

import numpy as np

from llama3_jax.config import Config, ConfigError


def reward_function(spec: str, mesh, tok):
    """`score(prompts, completions) -> [float]` from "python:module.fn" or a reward-model run."""
    if spec.startswith("python:"):
        module, _, name = spec[len("python:"):].rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"--reward {spec}: cannot import it ({e}); give python:package.module.function") from None
        return lambda prompts, texts: [float(fn(p, t)) for p, t in zip(prompts, texts)]
    from llama3_jax.align.stages import rewards
    from llama3_jax.data.chat import chat_tokens
    from llama3_jax.infer.generate import load_for_inference
    params, cfg, _, _ = load_for_inference(spec, dtype="float32", mesh=mesh)
    if not cfg.value_head:
        raise ConfigError(f"--reward {spec} is not a reward model (it has no value head); train one with "
                          "train.py --stage rm, or give python:module.fn")

    def score(prompts, texts):
        seqs = [chat_tokens(tok, p + [{"role": "assistant", "content": t}])[0] for p, t in zip(prompts, texts)]
        return rewards(params, Config(model=cfg), seqs, mesh).tolist()
    return score


def read_prompt_rows(path) -> list[dict]:
    from llama3_jax.data.chat import parse_row, read_rows
    rows = []
    for where, row in read_rows(path):
        try:
            parse_row(row, "prompts")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        rows.append(row)
    return rows


def sample_best(params, cfg, tok, rows: list[dict], score, *, k: int, sampling, mesh, batch_prompts: int = 16):
    """For each prompt row: its k completions, their scores and the best one (first on ties)."""
    from llama3_jax.infer.generate import allowed_ids, completion, generate
    stops = sorted(tok.stop_ids)
    allowed = allowed_ids(cfg.vocab_size, tok, stops)
    out = []
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i:i + batch_prompts]
        prompts = [tok.encode_dialog(r["prompt"]) for r in chunk for _ in range(k)]
        g = generate(params, cfg, prompts, sampling, stop_ids=stops, allowed=allowed, mesh=mesh)
        texts = [completion(tok, t) for t in g.tokens]
        scores = score([r["prompt"] for r in chunk for _ in range(k)], texts)
        for j, row in enumerate(chunk):
            cand, sc = texts[j * k:(j + 1) * k], scores[j * k:(j + 1) * k]
            best = int(np.argmax(sc))
            extra = {key: v for key, v in row.items() if key != "prompt"}
            out.append({"messages": row["prompt"] + [{"role": "assistant", "content": cand[best]}],
                        "score": sc[best], "candidates": cand, "scores": sc, **extra})
        sampling = dataclasses.replace(sampling, seed=sampling.seed + 1)  # fresh draws for the next batch
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_jax.rejection_sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="the policy: a run, converted checkpoint or HF/Meta directory")
    p.add_argument("--reward", required=True, help="a reward-model run (train.py --stage rm) or python:module.fn")
    p.add_argument("--prompts", required=True, type=pathlib.Path, help="JSONL/Parquet rows with `prompt` messages")
    p.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--out", required=True, type=pathlib.Path, help="JSONL of the best answer per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mesh", default=None, help="mesh name in meshes/ or a .toml path (dp, fsdp, tp)")
    args = p.parse_args(argv)
    try:
        from llama3_jax.infer.generate import Sampling, load_for_inference
        if args.k < 1:
            raise ConfigError(f"--k {args.k}: sample at least one answer per prompt")
        if not args.prompts.is_file():
            raise ConfigError(f"--prompts {args.prompts} is not a file")
        sampling = Sampling(args.max_new_tokens, args.temperature, 0, args.top_p, args.seed)
        sampling.check()
        rows = read_prompt_rows(args.prompts)
        params, cfg, tok, mesh = load_for_inference(args.policy, dtype=args.dtype, mesh=args.mesh)
        if tok is None:
            raise ConfigError(f"{args.policy} comes with no tokenizer")
        score = reward_function(args.reward, mesh, tok)
        best = sample_best(params, cfg, tok, rows, score, k=args.k, sampling=sampling, mesh=mesh)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in best)
    kept = np.mean([r["score"] for r in best])
    first = np.mean([r["scores"][0] for r in best])
    print(f"{len(best)} prompts x {args.k} answers -> {args.out}: mean kept score {kept:.3f}, "
          f"mean score of one random answer {first:.3f}")
    return 0
