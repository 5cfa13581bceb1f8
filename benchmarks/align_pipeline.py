"""The post-training pipeline on the synthetic addition task, stage by stage, with each
stage's measured effect: pretrain -> SFT -> reward model -> rejection sampling (+ SFT on
its best answers) -> DPO -> PPO, every step a command a user would type.

    python benchmarks/align_pipeline.py --out runs/align [--config debug-tiny]

Prints the commands as they run, then a table: greedy accuracy on training problems and on
held-out problems, the mean probability of the right answer (the expected reward of a
temperature-1 sample), and the reward model's accuracy on pairs it never saw. Rejection
sampling and PPO use the task's verifier as the reward (`--reward rm`: the reward model).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TASK = ["data.seq_len=64", "train.global_batch=16"]
PPO = ["train.global_batch=64", "data.seq_len=32", "train.lr=1e-3", "train.warmup_steps=0", "train.checkpoint_every=40"]


def run(cmd: list[str], made: pathlib.Path) -> float:
    """Runs a stage's command unless what it makes exists (a rerun of the script goes on)."""
    print("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    if made.exists():
        return float("nan")
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t


def evaluate(run_dir: pathlib.Path, max_operand: int) -> dict:
    """The same measurements for every stage's model (the stages' own end-of-run evaluation)."""
    import dataclasses

    from llama3_jax.align import stages
    from llama3_jax.config import load_config
    from llama3_jax.formats.run import read_config
    from llama3_jax.infer.generate import load_for_inference
    params, model_cfg, tok, mesh = load_for_inference(run_dir, dtype="float32")
    cfg = dataclasses.replace(load_config(None, [f"align.task_max_operand={max_operand}"]), model=model_cfg)
    if read_config(run_dir)[0].train.stage == "rm":
        return {"pairs": stages.pair_accuracy(params, cfg, tok, mesh)}
    return {"task": stages.task_accuracy(params, cfg, tok, mesh),
            "held-out": stages.task_accuracy(params, cfg, tok, mesh, held=True),
            "p": stages.answer_probability(params, cfg, tok, mesh)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/align", type=pathlib.Path)
    ap.add_argument("--config", default="debug-tiny")
    ap.add_argument("--max-operand", type=int, default=5, help="the task's operands: 0..N")
    ap.add_argument("--sft-steps", type=int, default=40, help="short, to leave the later stages room")
    ap.add_argument("--reward", default="python:llama3_jax.align.task.reward",
                    help="the reward of rejection sampling and PPO: the task's verifier, or 'rm' for the reward model")
    args = ap.parse_args()
    TASK.append(f"align.task_max_operand={args.max_operand}")
    out = args.out.resolve()
    py = [sys.executable]
    train = py + ["train.py", "--config", args.config]
    times, rows = {}, []

    times["pretrain"] = run(train + ["--steps", "200", "--out", str(out / "base"), "train.sample_tokens=8"],
                            out / "base")
    times["sft"] = run(train + ["--stage", "sft", "--steps", str(args.sft_steps), *TASK, "train.lr=6e-3",
                                f"train.init_from={out / 'base'}", "--out", str(out / "sft")], out / "sft")
    reward = str(out / "rm") if args.reward == "rm" else args.reward
    times["rm"] = run(train + ["--stage", "rm", "--steps", "300", *TASK, "train.lr=3e-3",
                               f"train.init_from={out / 'sft'}", "--out", str(out / "rm")], out / "rm")
    run(py + ["-m", "llama3_jax.align.task", "prompts", str(out / "prompts.jsonl"), "--rows", "256",
              "--max-operand", str(args.max_operand), "--seed", "11"], out / "prompts.jsonl")
    times["rejection sampling"] = run(py + ["-m", "llama3_jax.rejection_sample", "--policy", str(out / "sft"),
                                            "--reward", reward, "--prompts", str(out / "prompts.jsonl"),
                                            "--k", "8", "--max-new-tokens", "6", "--out", str(out / "best.jsonl")],
                                           out / "best.jsonl")
    times["sft on best"] = run(train + ["--stage", "sft", "--steps", "100", *TASK, "train.lr=1e-3",
                                        f"data.path={out / 'best.jsonl'}", f"train.init_from={out / 'sft'}",
                                        "--out", str(out / "sft-rs")], out / "sft-rs")
    times["dpo"] = run(train + ["--stage", "dpo", "--steps", "60", *TASK, "train.lr=1e-3",
                                f"train.init_from={out / 'sft-rs'}", "--out", str(out / "dpo")], out / "dpo")
    times["ppo"] = run(train + ["--stage", "ppo", "--steps", "80", *TASK, *PPO, f"align.reward={reward}",
                                f"train.init_from={out / 'dpo'}", "--out", str(out / "ppo")], out / "ppo")

    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    kept = sum(r["score"] for r in best) / len(best)
    one = sum(r["scores"][0] for r in best) / len(best)
    print(f"\nrejection sampling ({args.reward}): mean score of the kept answer {kept:.3f}, of one random "
          f"answer {one:.3f} ({len(best)} prompts x 8)\n")
    print(f"{'stage':<22}{'task acc':>10}{'held-out acc':>14}{'P(right)':>10}{'pairs acc':>11}{'seconds':>9}")
    for stage, run_dir in (("pretrain", "base"), ("sft", "sft"), ("rm", "rm"), ("sft on best", "sft-rs"),
                           ("dpo", "dpo"), ("ppo", "ppo")):
        e = evaluate(out / run_dir, args.max_operand)
        cell = lambda k: f"{e[k]:.3f}" if k in e else "-"  # noqa: E731
        print(f"{stage:<22}{cell('task'):>10}{cell('held-out'):>14}{cell('p'):>10}{cell('pairs'):>11}"
              f"{times[stage]:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
