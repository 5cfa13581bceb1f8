"""Per-device memory and step FLOPs of each remat policy (model.remat), from the compiled
train step: llama3-8b (seq 8192), FSDP over 8 devices, 1 sequence per device.

    pip install -e '.[tpu]'
    JAX_PLATFORMS=cpu python benchmarks/remat_memory.py [--config llama3-8b] [--topology v5p:2x2x2 | --cpu]

By default it compiles for a TPU topology with libtpu on this machine (no TPU needed);
--cpu compiles for 8 fake CPU devices instead (no host offload there, so "offload" is left
out). Step FLOPs: our formula plus the recomputation. XLA's cost analysis counts the scanned
layer's body once, so the recomputed FLOPs of a policy are n_layers x (XLA's FLOPs with that
policy - XLA's FLOPs with remat none).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.config import REMAT_POLICIES, MeshConfig, load_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3-8b")
    p.add_argument("--topology", default="v5p:2x2x2", help="TPU topology of 8 chips (libtpu)")
    p.add_argument("--cpu", action="store_true", help="8 fake CPU devices instead of a TPU topology")
    p.add_argument("--policies", nargs="*", default=list(REMAT_POLICIES))
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax

    from llama3_jax.train import plan

    devices = jax.devices("cpu")[:8] if args.cpu else plan.topology_devices(args.topology)
    policies = [q for q in args.policies if not (args.cpu and q == "offload")]
    if "none" not in policies:
        policies = ["none", *policies]
    mesh = MeshConfig(fsdp=len(devices))
    rows = {}
    for policy in policies:
        cfg = load_config(args.config, [f"model.remat={policy}", f"train.global_batch={len(devices)}"])
        rows[policy] = plan.plan(cfg, mesh, devices)
    n_layers = cfg.model.n_layers
    first = rows[policies[0]]
    hbm = f" (HBM {first['capacity'] / 2**30:.0f} GiB)" if first.get("capacity") else ""
    print(f"# {args.config}, seq {cfg.data.seq_len}, batch {cfg.train.global_batch}, fsdp={len(devices)} on "
          f"{len(devices)} x {first['kind']}{hbm}")
    print("| remat | arguments GiB | temporaries GiB | total GiB | fits | step TFLOP/device | recomputed |")
    print("|---|---|---|---|---|---|---|")
    base = rows["none"].get("xla_flops")
    for policy in policies:
        r = rows[policy]
        if r.get("refused") or base is None:
            print(f"| {policy} | | | | NO: {r.get('refused', 'remat none was refused').splitlines()[0][:100]} | | |")
            continue
        recompute = n_layers * (r["xla_flops"] - base)
        step = r["formula_flops"] + recompute
        fits = "-" if r["fits"] is None else "yes" if r["fits"] else "NO"
        print(f"| {policy} | {r['arguments'] / 2**30:.2f} | {r['temporaries'] / 2**30:.2f} | "
              f"{r['total'] / 2**30:.2f} | {fits} | {step / 1e12:.1f} | {recompute / r['formula_flops']:+.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
