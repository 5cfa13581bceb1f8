"""Goodput under injected faults: a `debug` training with --max-restarts that meets three
SIGKILLs at random steps, one NaN batch and one hung step, against a clean run told to
skip the batch the faulty run rolled back over. Prints the goodput table and checks the
final parameters are bit-identical.

    python benchmarks/goodput.py [--steps 1000] [--seed 0] [--out DIR] [train.py overrides ...]

The faults come from LLAMA3_JAX_FAULTS (llama3_jax/train/recovery.py); the NaN batch rolls
back at once (train.rollback_after=1) to the checkpoint before it and is skipped from then on.
Exit status 1 if the parameters differ.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(out, steps, config, overrides, faults="", max_restarts=0):
    env = dict(os.environ, LLAMA3_JAX_FAULTS=faults)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config, "--steps", str(steps), "--out", str(out),
           "--max-restarts", str(max_restarts), *overrides]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"train.py failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return time.perf_counter() - t, p.stderr


def fault_plan(steps: int, seed: int) -> dict:
    """Three kill steps, a NaN batch and a hang step, spread over the run's middle 80%."""
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(steps // 10, steps * 9 // 10), 5))
    kinds = ["kill", "kill", "kill", "nan", "hang"]
    rng.shuffle(kinds)
    plan = {"kill": [], "nan": [], "hang": []}
    for k, s in zip(kinds, picks):
        plan[k].append(s)
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="debug")
    p.add_argument("--out", default=None, help="where the two runs go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="train.py overrides for both runs")
    args = p.parse_intermixed_args(argv)
    from llama3_jax.formats.run import RunSource, read_config
    from llama3_jax.train.goodput import format_summary

    root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="goodput-"))
    plan = fault_plan(args.steps, args.seed)
    # A NaN on the batch of step s: the batch index is s - 1 (nothing is skipped before it).
    faults = ",".join([f"kill@{s}" for s in plan["kill"]] + [f"nan@{s - 1}" for s in plan["nan"]]
                      + [f"hang@{s}" for s in plan["hang"]])
    # A compile cache of the benchmark's own, empty at first: the faulty run compiles as a new
    # job does, and its restarts load from the cache. Checkpoints every 2 steps cost about no
    # step time (configs/debug.toml saves from a copy of the state while the next step runs).
    common = ["train.sample_tokens=8", "train.checkpoint_every=2", "train.step_timeout_s=3",
              f"train.compile_cache={root / 'xla'}", *args.overrides]
    print(f"# {args.config}, {args.steps} steps; faults: {faults}", flush=True)
    faulty_s, log = train(root / "faulty", args.steps, args.config, common + ["train.rollback_after=1"],
                          faults, max_restarts=8)
    restarts = [json.loads(line) for line in (root / "faulty" / "restarts.jsonl").read_text().splitlines()]
    summary = json.loads((root / "faulty" / "goodput.json").read_text())
    cfg, step, step_dir = read_config(root / "faulty")
    skips = json.loads((step_dir / "data" / "metadata").read_text())["skip_batches"]
    clean_s, _ = train(root / "clean", args.steps, args.config, common + [f"train.skip_batches={skips}"])
    clean = json.loads((root / "clean" / "goodput.json").read_text())

    a, b = RunSource(root / "faulty"), RunSource(root / "clean")
    import numpy as np
    same = all(np.array_equal(a.whole(k), b.whole(k)) for k in a.dtypes)
    print(f"faulty run: {faulty_s:.1f} s wall (train.py with --max-restarts), {len(restarts)} restarts:")
    for r in restarts:
        print(f"  restart {r['restart']}: {r['cause']} after {r['ran_s']:.1f} s"
              + ("; the warm spare took over" if r.get("warm_spare") else ""))
    print("\n".join(format_summary(summary)))
    print(f"clean run skipping batches {skips}: {clean_s:.1f} s wall; "
          f"goodput {100 * clean['goodput']:.1f}% ({clean['productive_s']:.1f} s productive)")
    print(f"final parameters at step {step}: {'bit-identical' if same else 'DIFFERENT'} to the clean run's")
    print(f"goodput {100 * summary['goodput']:.1f}% (target 95%)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
