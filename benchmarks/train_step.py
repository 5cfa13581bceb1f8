"""Train-step speed and memory on a set of meshes: prints a table.

    python benchmarks/train_step.py --config debug-tiny --devices 8 \
        --meshes "dp=2" "fsdp=8" "tp=2" "tp=4" "cp=2" "cp=4" "dp=2,fsdp=2,tp=2" "fsdp=2,cp=2,tp=2"
    python benchmarks/train_step.py --config llama3-8b --devices 8 --meshes fsdp=8 --abstract --set train.global_batch=8

On CPU the devices are fake host devices (XLA_FLAGS is set here). --abstract compiles on
abstract shapes only (nothing allocated) and reports the compiled per-device memory.
Columns: compile time, median step time, tokens/s, TFLOP/s per device and MFU (against
the device's peak; on CPU a measured float32 matmul rate), and per-device bytes of the
arguments (parameters + optimizer state + batch) and XLA temporaries.
"""

import argparse
import os
import statistics
import sys
import time


def parse_mesh(text):
    if text in ("single", "1"):
        return {}
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug-tiny")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--meshes", nargs="+", default=["single", "fsdp=8"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--abstract", action="store_true", help="compile only; report memory")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="section.key=value overrides")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np

    from llama3_jax.config import MeshConfig, load_config
    from llama3_jax.model import flops_per_token
    from llama3_jax.train.metrics import peak_flops
    from llama3_jax.train.step import Trainer, synthetic_batch

    cfg = load_config(args.config, args.overrides)
    B, S = cfg.train.global_batch, cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, S)
    peak = peak_flops(jax.devices()[0], cfg.train.peak_flops_per_device)
    print(f"{args.config}: batch {B} x seq {S}, {jax.devices()[0].device_kind} "
          f"(peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s per device)")
    head = (f"{'mesh':<22}{'devices':>8}{'compile s':>11}{'step s':>9}{'tokens/s':>11}"
            f"{'TFLOP/s/dev':>13}{'MFU':>8}{'args GiB/dev':>14}{'temp GiB/dev':>14}")
    print(head)
    print("-" * len(head))
    for text in args.meshes:
        sizes = parse_mesh(text)
        n = int(np.prod(list(sizes.values()))) if sizes else 1
        trainer = Trainer(cfg, MeshConfig(**sizes), devices=jax.devices()[:n])
        t0 = time.perf_counter()
        compiled = trainer.lower(trainer.abstract_state(), trainer.abstract_batch()).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        args_gib = mem.argument_size_in_bytes / 2**30 if mem else float("nan")
        temp_gib = mem.temp_size_in_bytes / 2**30 if mem else float("nan")
        step_s = tps = tflops = mfu = float("nan")
        if not args.abstract:
            state = trainer.init_state()
            gb = trainer.put(synthetic_batch(B, S, cfg.model.vocab_size))
            times = []
            for _ in range(args.steps + 1):
                t0 = time.perf_counter()
                state, m = compiled(state, gb)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times[1:])
            tps = B * S / step_s
            tflops = flops_tok * tps / n / 1e12
            mfu = tflops * 1e12 / peak if peak else float("nan")
        print(f"{text:<22}{n:>8}{compile_s:>11.2f}{step_s:>9.3f}{tps:>11,.0f}{tflops:>13.4f}"
              f"{mfu:>8.1%}{args_gib:>14.3f}{temp_gib:>14.3f}")


if __name__ == "__main__":
    main()
