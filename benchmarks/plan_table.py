"""The README's pod-planning table: the real train step of the Llama 3.1 presets, compiled
ahead of time for TPU slices on this (CPU-only) machine, beside MaxText's published MFU.

    pip install -e '.[tpu]'
    JAX_PLATFORMS=cpu python benchmarks/plan_table.py [--only 8b] [--set model.remat=save_dots]

Each row is `llama3-train --config C --mesh M --compile-only --topology T` (llama3_jax.train.plan)
with a global batch of 0.5 to 2 sequences of 8192 tokens per chip (2 x 256 chips = 4M
tokens, the paper's first-stage batch). A slice the compiler refuses is reported as not
fitting, with the memory it asked for. MaxText's figures are from its docs/reference/models/tiering.md
(BF16, sequence 8192, 256 chips); it publishes no Llama 3 figure on v5p.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.config import load_config, load_mesh  # noqa: E402
from llama3_jax.train import plan  # noqa: E402

# (config, mesh preset, topology, chips, sequences per chip, MaxText's published MFU or None)
ROWS = [
    ("llama3.1-8b", "tpu-v5p-64", "v5p:2x4x4", 32, 2, None),
    ("llama3.1-8b", "tpu-v6e-256", "v6e:16x16", 256, 2, "45.5% (v6e-256)"),
    ("llama3.1-70b", "tpu-v5p-256", "v5p:4x4x8", 128, 2, None),
    ("llama3.1-70b", "tpu-v6e-256", "v6e:16x16", 256, 1, "50.3% (v6e-256)"),
    ("llama3.1-405b", "tpu-v5p-1024", "v5p:8x8x8", 512, 0.5, None),
    ("llama3.1-405b", "tpu-v6e-256", "v6e:16x16", 256, 1, "38.6% (v6e-256)"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="keep rows whose config or topology contains this")
    p.add_argument("--per-chip", type=float, default=0, help="sequences per chip (default: each row's)")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="section.key=value for every row")
    args = p.parse_args(argv)

    def gib(b):
        return f"{b / 2**30:.1f}"

    print("| config | mesh | topology | batch | args GiB | temps GiB | total / HBM GiB | fits | compile s "
          "| est. step s | tokens/s/chip | est. MFU | MaxText MFU |")
    print("|" + "---|" * 13)
    for config, mesh, topology, chips, per_chip, maxtext in ROWS:
        if args.only not in f"{config} {mesh} {topology}":
            continue
        cfg = load_config(config, [f"train.global_batch={round((args.per_chip or per_chip) * chips)}", *args.overrides])
        mesh_cfg = load_mesh(mesh)
        r = plan.plan(cfg, mesh_cfg, plan.topology_devices(topology))
        axes = " ".join(f"{a}={s}" for a, s in r["sizes"].items() if s > 1)
        if r.get("refused"):
            print(f"| {config} | {mesh} ({axes}) | {topology} | {cfg.train.global_batch} | | | | NO: "
                  f"{r['refused'].splitlines()[0][:120]} | {r['compile_s']:.0f} | | | | {maxtext or '-'} |", flush=True)
            continue
        est = ("-", "-", "no estimate") if r["step_s"] is None else (
            f"{r['step_s']:.2f}", f"{r['tokens_per_s_per_device']:,.0f}", f"{r['mfu']:.1%}")
        print(f"| {config} | {mesh} ({axes}) | {topology} | {cfg.train.global_batch} | {gib(r['arguments'])} "
              f"| {gib(r['temporaries'])} | {gib(r['total'])} / {gib(r['capacity'])} | "
              f"{'yes' if r['fits'] else 'NO'} | {r['compile_s']:.0f} | {est[0]} | {est[1]} | {est[2]} "
              f"| {maxtext or '-'} |", flush=True)


if __name__ == "__main__":
    main()
