"""Pipeline bubble: measured step time vs the schedule's theory, on fake CPU devices.

    python benchmarks/pipeline_bubble.py [--devices 4] [--steps 3] [--quick]

For pp in {1, 2, 4} and several micro-batch counts M and virtual stages V it compiles one
training step (llama3_jax.train.step with llama3_jax.train.pipeline), reports the compiled
per-device memory (`compiled.memory_analysis()`) and times a few steps.

On fake CPU devices all "devices" share the host's cores, so the measured time is the
total work of all ranks, not the critical path of a real pipeline. Every rank runs every
iteration of the schedule (idle iterations compute on stale data, see
llama3_jax.train.pipeline), so the total work is proportional to (V*M + pp - 1) / (V*M) =
1 + bubble: the measured time relative to pp=1 tracks the bubble (plus the extra
collectives), which is what a real pipeline loses to idle time. `ms/(1+idle)` divides
that out; it stays flat where the schedule model explains the time. Timings on a shared
2-core host are noisy; memory is exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4, help="fake CPU devices (>= the largest pp)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    ap.add_argument("--grid", default=None, help="configurations pp/V/M, comma-separated (e.g. 1/1/1,2/2/4)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    # Before JAX starts: fake devices, and one XLA:CPU thread pool per process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    import jax
    import numpy as np

    from llama3_jax.config import ConfigError, MeshConfig, load_config
    from llama3_jax.train import pipeline
    from llama3_jax.train.step import Trainer, synthetic_batch

    cfg = load_config("debug-tiny", [
        f"model.n_layers={args.layers}", f"model.dim={args.dim}", "model.n_heads=8", "model.n_kv_heads=4",
        "model.tie_embeddings=false", "model.compute_dtype=float32", "model.remat=none",
        f"data.seq_len={args.seq}", f"train.global_batch={args.batch}", "train.warmup_steps=0"])

    if args.grid:
        grid = [tuple(int(x) for x in item.split("/")) for item in args.grid.split(",")]
    elif args.quick:
        grid = [(1, 1, 1), (2, 1, 1), (2, 1, 4), (2, 2, 4), (4, 1, 4), (4, 2, 4)]
    else:
        grid = [(1, 1, 1),
                (2, 1, 1), (2, 1, 2), (2, 1, 4), (2, 1, 8), (2, 2, 2), (2, 2, 4), (2, 2, 8),
                (4, 1, 1), (4, 1, 4), (4, 1, 8), (4, 2, 4), (4, 2, 8)]

    B, S = args.batch, args.seq
    host = synthetic_batch(B, S, cfg.model.vocab_size)

    print(f"# {jax.devices()[0].platform} x{len(jax.devices())} fake devices on {os.cpu_count()} host cores; "
          f"model: {args.layers} layers, dim {args.dim}, seq {S}, batch {B}, float32, remat none")
    header = (f"{'pp':>2} {'V':>2} {'M':>2} {'iters':>5} {'bubble (pp-1)/(VM)':>18} {'sched idle':>10} "
              f"{'step ms':>8} {'vs pp=1':>7} {'ms/(1+idle)':>11} {'compile s':>9} {'temp MiB':>8} {'args MiB':>8}")
    print(header)
    print("-" * len(header))
    base_ms = None
    for pp, v, m in grid:
        mesh_cfg = MeshConfig(pp=pp, pp_microbatches=m, pp_virtual_stages=v)
        try:
            trainer = Trainer(cfg, mesh_cfg, devices=jax.devices()[:pp])
        except ConfigError as e:  # e.g. --layers that pp * V stages cannot divide
            print(f"{pp:>2} {v:>2} {m:>2} skipped: {e}", flush=True)
            continue
        state = trainer.init_state()
        batch = trainer.put(host)
        t0 = time.perf_counter()
        compiled = trainer.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        ms = 1e3 * float(np.median(times))
        base_ms = base_ms or ms
        if pp > 1:
            plan = pipeline.make_plan(cfg.model, mesh_cfg, pp)
            iters, bubble, idle = plan.iterations, f"{plan.bubble_fraction:.3f}", f"{plan.schedule_idle_fraction:.3f}"
            per_useful = ms / (1 + plan.schedule_idle_fraction)
        else:
            iters, bubble, idle, per_useful = "-", "0 (no pipeline)", "-", ms
        temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else float("nan")
        arg = getattr(mem, "argument_size_in_bytes", 0) / 2**20 if mem else float("nan")
        print(f"{pp:>2} {v:>2} {m:>2} {iters:>5} {bubble:>18} {idle:>10} {ms:>8.1f} {ms / base_ms:>7.2f} "
              f"{per_useful:>11.1f} "
              f"{compile_s:>9.1f} {temp:>8.2f} {arg:>8.2f}", flush=True)
        del state, compiled


if __name__ == "__main__":
    main()
