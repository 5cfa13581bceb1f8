"""Plan a run on hardware you do not have: compile the real train step ahead of time and
report what each device would hold and do.

    llama3-train --config llama3.1-8b --mesh tpu-v5p-64 --compile-only --topology v5p:4x4x4
    llama3-train --config debug --mesh cpu-8 --compile-only          (fake CPU devices)

A TPU topology is compiled for with libtpu (`pip install 'llama3_jax[tpu]'`), which runs on
a CPU-only machine. The report: per-device memory (arguments: parameters, optimizer state
and batch; XLA temporaries; outputs not aliased to the donated state; the total against
the device's memory), FLOPs per step and device from XLA's cost analysis and from our
formula, XLA's estimated step time, and the MFU and tokens/s per device that estimate
implies. XLA's cost analysis and time estimate count a loop body (the scanned layers) once,
so the estimate is scaled by formula FLOPs / XLA FLOPs, which assumes the layers' share of
the time equals their share of the FLOPs.
"""

from __future__ import annotations

import os
import time

import jax

from llama3_jax.config import Config, ConfigError, MeshConfig
from llama3_jax.model import flops_per_token
from llama3_jax.train.metrics import chip
from llama3_jax.train.step import Trainer


def topology_devices(name: str) -> list:
    """Compile-only devices of a TPU topology such as "v5p:4x4x4" or "v6e:16x16"."""
    # Off a TPU VM, libtpu asks a metadata server for the pod's hosts; compiling needs none.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(name, platform="tpu").devices)
    except (ImportError, RuntimeError, ValueError) as e:  # no libtpu, or an unknown topology
        raise ConfigError(f"cannot describe TPU topology {name!r} ({str(e).splitlines()[0][:200]}); install "
                          "libtpu (pip install 'llama3_jax[tpu]') and name a topology like v5p:4x4x4 or "
                          "v6e:16x16") from None


def plan(cfg: Config, mesh_cfg: MeshConfig, devices=None) -> dict:
    """Compile the train step for `devices` (default: this process's) and measure it."""
    devices = list(devices or jax.devices())
    hosts = len({d.process_index for d in devices})
    trainer = Trainer(cfg, mesh_cfg, devices=devices, process_count=hosts)
    where = dict(devices=len(devices), hosts=hosts, kind=devices[0].device_kind, sizes=trainer.sizes)
    t0 = time.perf_counter()
    lowered = trainer.lower(trainer.abstract_state(), trainer.abstract_batch())
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit; that is the plan's answer.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(where, compile_s=time.perf_counter() - t0, fits=False,
                    refused=str(e).split("RESOURCE_EXHAUSTED: ")[-1])
    compile_s = time.perf_counter() - t0
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    n = len(devices)
    tokens = cfg.train.global_batch * cfg.data.seq_len
    formula = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / n
    peak, capacity = chip(devices[0]) or (None, None)
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    out = dict(where, compile_s=compile_s,
               arguments=mem.argument_size_in_bytes, temporaries=mem.temp_size_in_bytes,
               outputs=mem.output_size_in_bytes - mem.alias_size_in_bytes, total=total, capacity=capacity,
               fits=None if capacity is None else total <= capacity, xla_flops=cost.get("flops"),
               formula_flops=formula, peak=peak, step_s=None, mfu=None, tokens_per_s_per_device=None)
    # libtpu answers some topologies (v6e) with a negative "optimal" time: no estimate.
    if (cost.get("optimal_seconds") or 0) > 0 and cost.get("flops"):
        step = cost["optimal_seconds"] * formula / cost["flops"]
        out.update(step_s=step, tokens_per_s_per_device=tokens / step / n, mfu=formula / step / peak if peak else None)
    return out


def report(p: dict) -> list[str]:
    def size(b):
        return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"

    def flops(f):
        return f"{f / 1e12:.2f} TFLOP" if f >= 1e12 else f"{f / 1e9:.3f} GFLOP"

    head = (f"{p['devices']} x {p['kind']} ({p['hosts']} host(s)), mesh "
            + " ".join(f"{a}={s}" for a, s in p["sizes"].items() if s > 1) + f"; compiled in {p['compile_s']:.1f} s")
    if p.get("refused"):
        return [head, f"  DOES NOT FIT: {p['refused'].splitlines()[0]}"]
    lines = [head,
             "per device:",
             f"  arguments (parameters, optimizer state, batch)  {size(p['arguments'])}",
             f"  XLA temporaries                                  {size(p['temporaries'])}",
             f"  outputs not aliased to the donated state         {size(p['outputs'])}",
             f"  total                                            {size(p['total'])} of {size(p['capacity'])}"
             + ("" if p["fits"] is None else ("  fits" if p["fits"] else "  DOES NOT FIT")),
             f"  FLOPs per step: {flops(p['formula_flops'])} (formula), "
             + (f"{flops(p['xla_flops'])} (XLA, loop bodies once)" if p["xla_flops"] else "none from XLA")]
    if p["step_s"] is None:
        lines.append("  XLA gives no time estimate for these devices: memory and FLOPs only")
    else:
        mfu = f", MFU {p['mfu']:.1%} of {p['peak'] / 1e12:.0f} TFLOP/s" if p["mfu"] else ""
        step = f"{p['step_s']:.3g} s" if p["step_s"] >= 1 else f"{p['step_s'] * 1e3:.3g} ms"
        lines.append(f"  estimated step {step} (XLA, scaled to the formula's FLOPs): "
                     f"{p['tokens_per_s_per_device']:,.0f} tokens/s per device{mfu}")
    return lines
