"""Where one training step's time goes on this machine: a jax.profiler trace of the step at
vs_transformers.py's shape, its ops grouped by what they are.

    python benchmarks/step_profile.py [--vocab 32000 128256] [--dtype float32]

Ops can run at the same time (XLA:CPU runs independent ops on separate threads), so each
moment of the step is shared equally among the ops running then, and moments with none
count as idle. Kinds come from the compiled HLO: a fusion whose computation holds a dot is
a matmul. The last column is the step's tokens/s if everything but the matmuls took no
time ("matmuls alone"), the bound on what removing overhead can buy; the matmul rate is
our FLOP formula over the matmuls' time. "wall" is the profiled step timed from Python.
An unprofiled step's page faults and kernel CPU time are given too: buffers the allocator
takes fresh from the kernel each step are zeroed page by page, which shows as time spread
over the ops that first touch them (another allocator, or glibc's tunables, changes it;
see the README).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vs_transformers import BATCH, SEQ, SHAPE  # noqa: E402

KINDS = ("matmul", "transpose/copy", "other", "idle")


def op_kinds(hlo: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of the compiled module."""
    calls, dots = {}, set()
    computation = None
    for line in hlo.splitlines():
        if m := re.match(r"^(?:ENTRY )?%(\S+) ", line):
            computation = m.group(1)
        elif m := re.match(r"^\s+(?:ROOT )?%(\S+) = .*? (\w[\w-]*)\(", line):
            name, op = m.groups()
            if op in ("dot", "convolution"):
                dots.add(computation)
            if c := re.search(r"calls=%([\w.-]+)", line):
                calls[name] = c.group(1)
            calls.setdefault(name, op)
    kinds = {}
    for name, target in calls.items():
        if target in dots or target in ("dot", "convolution"):
            kinds[name] = "matmul"
        elif re.match(r"(copy|transpose)", name):
            kinds[name] = "transpose/copy"
        else:
            kinds[name] = "other"
    return kinds


def shares(trace: list[dict], kinds: dict[str, str]) -> tuple[float, collections.Counter, collections.Counter]:
    """Step seconds, seconds per kind and per op: each moment split among the ops running."""
    done = [e for e in trace if e.get("ph") == "X" and e["name"].startswith("ThunkExecutor::Execute (wait")]
    ops = [e for e in trace if e.get("ph") == "X" and e["name"] in kinds]
    if done:  # the executable's whole run, as XLA:CPU 0.10 names it
        t0, t1 = done[-1]["ts"], done[-1]["ts"] + done[-1]["dur"]
    else:  # otherwise from its first op to its last: idle time at either end is not seen
        t0, t1 = min(e["ts"] for e in ops), max(e["ts"] + e["dur"] for e in ops)
    ops = [e for e in ops if t0 <= e["ts"] <= t1]
    edges = sorted([(e["ts"], 1, i) for i, e in enumerate(ops)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(ops)])
    per_op, per_kind, running, last = collections.Counter(), collections.Counter(), set(), t0
    for t, change, i in edges + [(t1, 0, None)]:
        if t > last:
            for j in running:
                per_op[ops[j]["name"]] += (t - last) / len(running)
            if not running:
                per_kind["idle"] += t - last
            last = t
        if change == 1:
            running.add(i)
        elif change == -1:
            running.discard(i)
    for name, us in per_op.items():
        per_kind[kinds[name]] += us
    scale = 1e-6  # trace times are microseconds
    return (t1 - t0) * scale, scaled(per_kind, scale), scaled(per_op, scale)


def scaled(counter: collections.Counter, factor: float) -> collections.Counter:
    return collections.Counter({key: v * factor for key, v in counter.items()})


def profile(vocab: int, dtype: str, top: int) -> None:
    import jax
    from llama3_jax.config import load_config
    from llama3_jax.model import flops_per_token
    from llama3_jax.train.step import Trainer, synthetic_batch
    overrides = [f"model.{k}={v}" for k, v in SHAPE.items()] + [
        f"model.vocab_size={vocab}", "model.tie_embeddings=false", "model.remat=none", "model.attention_impl=xla",
        "model.param_dtype=float32", f"model.compute_dtype={dtype}", f"data.seq_len={SEQ}",
        f"train.global_batch={BATCH}", "train.warmup_steps=0"]
    cfg = load_config("debug", overrides)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = [trainer.init_state()]
    batch = trainer.put(synthetic_batch(BATCH, SEQ, vocab))
    compiled = trainer.lower(state[0], batch).compile()  # one compile: the HLO read is the program traced
    kinds = op_kinds(compiled.as_text())

    def step():
        state[0], metrics = compiled(state[0], batch)
        jax.block_until_ready(metrics)

    step(), step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    step()  # unprofiled: the pages the step touches for the first time, and the kernel's time on them
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults, kernel = after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime
    with tempfile.TemporaryDirectory() as out:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            started = time.perf_counter()
            step()
            wall = time.perf_counter() - started
        trace = json.load(gzip.open(next(pathlib.Path(out).rglob("*.trace.json.gz"))))["traceEvents"]
    seconds, per_kind, per_op = shares(trace, kinds)
    tokens = BATCH * SEQ
    matmul_rate = flops_per_token(cfg.model, SEQ) * tokens / per_kind["matmul"] / 1e9
    cells = "".join(f"{per_kind[k]:8.2f} s {per_kind[k] / seconds:4.0%}" for k in KINDS)
    print(f"{vocab:>7} {dtype:>9} {seconds:7.2f} s {wall:7.2f} s{cells} {matmul_rate:8.0f} GFLOP/s"
          f"{tokens / seconds:8.0f}{tokens / per_kind['matmul']:13.0f}")
    largest = [(name, s) for name, s in per_op.most_common() if kinds[name] != "matmul"][:top]
    print(f"        unprofiled step: {faults:,} page faults, {kernel:.2f} s of kernel CPU time")
    print("        largest others: " + ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in largest))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--top", type=int, default=6, help="how many of the largest non-matmul ops to name")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    import jax
    print(f"# {os.cpu_count()} CPU cores; JAX {jax.__version__} ({jax.default_backend()}); shape {SHAPE}, batch {BATCH} x {SEQ}")
    print(f"{'vocab':>7} {'dtype':>9} {'step':>9} {'wall':>9}" + "".join(f"{k:>16}" for k in KINDS)
          + f"{'matmul rate':>16}{'tok/s':>8}{'matmuls alone':>16}")
    for vocab in args.vocab:
        for dtype in args.dtype:
            profile(vocab, dtype, args.top)


if __name__ == "__main__":
    main()
