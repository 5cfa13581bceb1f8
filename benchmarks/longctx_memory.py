"""Per-device memory of Llama 3.1 8B's long-context stages (32K, 64K and 128K tokens) on
context-parallel meshes: the real train step compiled ahead of time on abstract shapes, for
fake CPU devices and for a TPU v5p topology (libtpu; no TPU needed).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/longctx_memory.py [--targets cpu,tpu,tpu16] [--lengths 32768,65536,131072]

On 8 devices every device is in one context- and tensor-parallel group (cp 4 x tp 2); on 16
TPU chips (`tpu16`) two such groups hold the state in FSDP. One sequence per host (the
planner's batch must split over the topology's hosts), the preset's model
settings (xla_chunked attention, loss_chunk 4096, full remat), and for comparison the same
step without the chunked loss. Each row is `train.py --config llama3.1-8b-longctx
--compile-only` for one stage (llama3_jax.train.plan).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.config import MeshConfig, load_config  # noqa: E402

# target -> (topology or None for this machine's devices, devices, fsdp, tp); cp takes the rest
TARGETS = {"cpu": (None, 8, 1, 2), "tpu": ("v5p:2x2x2", 8, 1, 2), "tpu16": ("v5p:2x2x4", 16, 2, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="cpu,tpu")
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--no-baseline", action="store_true", help="skip the rows without the chunked loss")
    args = p.parse_args(argv)
    import jax
    from llama3_jax.train import plan

    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    print("| target | seq_len | mesh | rows | loss | args GiB | temps GiB | total GiB | capacity GiB | fits | compile s |")
    print("|" + "---|" * 11)
    for target in args.targets.split(","):
        topology, n, fsdp, tp = TARGETS[target]
        devices = plan.topology_devices(topology) if topology else jax.devices()[:n]
        if len(devices) < n:
            raise SystemExit(f"{target}: needs {n} devices, found {len(devices)}; set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={n}")
        for seq in map(int, args.lengths.split(",")):
            cp = n // (fsdp * tp)  # a row spans a whole cp x tp group
            rows = max(len({d.process_index for d in devices}), fsdp)
            for chunk in ([4096] if args.no_baseline else [4096, 0]):
                cfg = load_config("llama3.1-8b-longctx", [f"data.seq_len={seq}", f"train.global_batch={rows}",
                                                          f"model.loss_chunk={chunk}"])
                r = plan.plan(cfg, MeshConfig(fsdp=fsdp, cp=cp, tp=tp), devices)
                mesh = (f"fsdp={fsdp} " if fsdp > 1 else "") + f"cp={cp} tp={tp}"
                loss = f"chunk {chunk}" if chunk else "whole"
                if r.get("refused"):
                    print(f"| {target} ({r['kind']}) | {seq} | {mesh} | {rows} | {loss} | | | | | NO: "
                          f"{r['refused'].splitlines()[0][:100]} | {r['compile_s']:.0f} |", flush=True)
                    continue
                cap = gib(r["capacity"]) if r["capacity"] else "-"
                fits = "-" if r["fits"] is None else "yes" if r["fits"] else "NO"
                print(f"| {target} ({r['kind']}) | {seq} | {mesh} | {rows} | {loss} | {gib(r['arguments'])} | "
                      f"{gib(r['temporaries'])} | {gib(r['total'])} | {cap} | {fits} | {r['compile_s']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
