"""Per-step metrics: metrics.jsonl, TensorBoard event files, a loss-curve PNG, and the
device peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import functools
import json
import pathlib
import time


class MetricsWriter:
    """Appends one JSON object per step and never rewrites the file: after a restart or a
    rollback, the rows of steps done again are appended with `"redo": true` (the last row
    of each step is the run as it stands; `read_metrics(run_dir, latest=True)`)."""

    def __init__(self, run_dir, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.high_water = 0  # the highest step with a row so far
        if not enabled:
            return
        text = self.path.read_text() if self.path.exists() else ""
        for rec in read_jsonl(text):
            if "loss" in rec:
                self.high_water = max(self.high_water, rec["step"])
        self.file = open(self.path, "a")
        if text and not text.endswith("\n"):
            self.file.write("\n")  # a line cut short by a kill stays on its own line
        SummaryWriter = _summary_writer()
        self.tb = SummaryWriter(str(run_dir), purge_step=resume_step + 1)

    def write(self, record: dict) -> dict:
        """Append `record`; returns it as written (with `redo` when it is a step done again)."""
        if not self.enabled:
            return record
        if "loss" in record:
            if record["step"] <= self.high_water:
                record = dict(record, redo=True)
            self.high_water = max(self.high_water, record["step"])
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.tb.add_scalar(tag, value, record["step"])
        return record

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch
    when it is installed only to accept its tensors, which we never pass, and that import
    alone costs a restart about 2 s."""
    import sys
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_jsonl(text: str) -> list[dict]:
    """The rows of a JSON-lines text that a writer appends to; a line cut short by a kill is
    left out."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir, latest: bool = False) -> list[dict]:
    """Every row of metrics.jsonl (a line cut short by a kill is left out); `latest`: one
    row per step, the last written, as an uninterrupted run would read (no events)."""
    rows = read_jsonl((pathlib.Path(run_dir) / "metrics.jsonl").read_text())
    if not latest:
        return rows
    last, end = {}, 0
    for r in rows:
        if "loss" in r:
            last[r["step"]], end = r, r["step"]
    return [last[s] for s in sorted(last) if s <= end]  # not the steps a rollback abandoned


def plot_loss(run_dir) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    evals = [r for r in records if r.get("event") == "eval"]
    records = [r for r in records if "loss" in r]  # not the rollback and eval events
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.5, ms=3, label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
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


def _lines(path) -> list[str]:
    try:
        return pathlib.Path(path).read_text().splitlines()
    except OSError:
        return []


@functools.cache
def measure_cpu_flops(n: int = 512, reps: int = 8) -> float:
    """Measured float32 matmul FLOP/s of the host CPU (the CPU 'peak' for MFU): measured once
    per machine (host name, CPU model and core count) and kept in the user cache, so every run of the
    machine divides by the same peak and none spends its start-up measuring it again."""
    import os
    import platform

    import jax
    import jax.numpy as jnp

    from llama3_jax.config import write_atomic
    from llama3_jax.formats.bpe import default_cache_dir
    model = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
                 platform.machine())
    path, key = default_cache_dir() / "cpu_flops.json", f"{platform.node()}/{model}/{os.cpu_count()} cores"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: functools.reduce(lambda x, _: x @ a, range(reps), a))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):  # the best of several, as it is kept: a run compiling meanwhile shares the cores
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    flops = 2 * n ** 3 * reps / best
    try:  # written whole, then renamed: a concurrent run reads the old file or the new one
        write_atomic(path, json.dumps({**known, key: flops}) + "\n")
    except OSError:
        pass
    return flops
