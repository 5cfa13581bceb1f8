"""Per-step metrics: metrics.jsonl, TensorBoard event files, a loss-curve PNG, and the
device peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time


class MetricsWriter:
    """Appends one JSON object per step; on resume, drops records past the restored step so
    the file reads exactly as an uninterrupted run's."""

    def __init__(self, run_dir, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash
                if rec["step"] <= resume_step:
                    kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(run_dir), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(pathlib.Path(run_dir).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = pathlib.Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


# Accelerators by a substring of their device kind, most specific first: peak dense bf16
# FLOP/s and memory of one device (a GPU, a TPU chip).
CHIPS = (
    ("v6 lite", 918e12, 32 * 2**30),   # TPU v6e (Trillium)
    ("v5 lite", 197e12, 16 * 2**30),   # TPU v5e
    ("v5", 459e12, 95 * 2**30),        # TPU v5p
    ("v4", 275e12, 32 * 2**30),        # TPU v4
    ("h200", 989e12, 141 * 10**9),
    ("h100", 989e12, 80 * 2**30),
    ("a100", 312e12, 80 * 2**30),
)


def chip(device) -> tuple[float, int] | None:
    """(peak bf16 FLOP/s, memory bytes) of a device from its kind, or None if unknown."""
    kind = device.device_kind.lower()
    return next(((f, m) for key, f, m in CHIPS if key in kind), None)


def peak_flops(device, configured: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from its kind (None if unknown); on CPU a
    measured float32 matmul rate."""
    if configured:
        return configured
    known = chip(device)
    if known:
        return known[0]
    if device.platform == "cpu":
        return measure_cpu_flops()
    return None


@functools.cache
def measure_cpu_flops(n: int = 512, reps: int = 8) -> float:
    """Measured float32 matmul FLOP/s of the host CPU (the CPU 'peak' for MFU)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: functools.reduce(lambda x, _: x @ a, range(reps), a))
    f(a).block_until_ready()
    start = time.perf_counter()
    f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)
