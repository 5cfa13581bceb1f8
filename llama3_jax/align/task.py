"""A synthetic, verifiable chat task that needs no download: addition of two integers.

    user: "7 + 12 ="        assistant: "19"

`write_task` makes the stage's rows in TRL's conversational format (SFT conversations,
preference pairs of a right and a wrong answer, prompts); `reward` is its verifier (1.0
for the right number, else 0.0), usable as `--reward python:llama3_jax.align.task.reward`.

Two kinds of evaluation rows: problems held out of training altogether (chosen by a hash
of (a, b); they need arithmetic that a tiny model does not generalise to), and training
problems with wrong answers that training never shows (`unseen_wrong`): a reward model
that learned which answer is right, not which answers were rejected, ranks those.
"""

from __future__ import annotations

import json
import pathlib
import re
import zlib

import numpy as np

from llama3_jax.config import write_atomic

HELD_OUT_PERCENT = 20


def problem(a: int, b: int) -> list[dict]:
    # Short on purpose: tests train on it for seconds.
    return [{"role": "user", "content": f"{a} + {b} ="}]


def held_out(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}+{b}".encode()) % 100 < HELD_OUT_PERCENT


def problems(n: int, max_operand: int, seed: int, held: bool = False) -> list[tuple[int, int]]:
    """n problems (a, b) with 0 <= a, b <= max_operand, from the training or the held-out part."""
    pool = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1) if held_out(a, b) == held]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(0, len(pool), n)]


TRAIN_OFFSETS, UNSEEN_OFFSETS = (-3, -2, -1, 1, 2, 3), (-10, -5, -4, 4, 5, 10)


def wrong_answer(a: int, b: int, rng, unseen: bool = False) -> int:
    return a + b + int(rng.choice(UNSEEN_OFFSETS if unseen else TRAIN_OFFSETS))


def rows(kind: str, n: int, max_operand: int, seed: int = 0, held: bool = False,
         unseen_wrong: bool = False) -> list[dict]:
    """n rows of kind "sft", "pairs" or "prompts" (each prompt row also carries its `answer`)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for a, b in problems(n, max_operand, seed, held):
        if kind == "sft":
            out.append({"messages": problem(a, b) + [{"role": "assistant", "content": str(a + b)}]})
        elif kind == "pairs":
            out.append({"prompt": problem(a, b), "chosen": [{"role": "assistant", "content": str(a + b)}],
                        "rejected": [{"role": "assistant", "content": str(wrong_answer(a, b, rng, unseen_wrong))}]})
        else:
            out.append({"prompt": problem(a, b), "answer": a + b})
    return out


def task_jsonl(kind: str, n: int, max_operand: int, seed: int = 0) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows(kind, n, max_operand, seed))


def write_task(directory, kind: str, n: int, max_operand: int, seed: int = 0) -> pathlib.Path:
    """The stage's training rows as JSONL under `directory` (written atomically; every process
    writes the same bytes)."""
    path = pathlib.Path(directory) / f"{kind}.jsonl"
    write_atomic(path, task_jsonl(kind, n, max_operand, seed))
    return path


def answer_of(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None


def reward(prompt: list[dict], completion: str) -> float:
    """1.0 when the completion's first number is the sum the prompt asks for, else 0.0."""
    m = re.search(r"(-?\d+) \+ (-?\d+) =", prompt[-1]["content"])
    return float(m is not None and answer_of(completion) == int(m.group(1)) + int(m.group(2)))


def main(argv=None) -> int:
    """`python -m llama3_jax.align.task sft|pairs|prompts OUT.jsonl [--rows N --max-operand M --seed S]`."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m llama3_jax.align.task", description=main.__doc__)
    p.add_argument("kind", choices=("sft", "pairs", "prompts"))
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # Straight to OUT: a sibling KIND.jsonl (perhaps the user's) is never written or moved.
    write_atomic(args.out, task_jsonl(args.kind, args.rows, args.max_operand, args.seed))
    print(f"{args.rows} {args.kind} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
