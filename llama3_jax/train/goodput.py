"""Goodput: productive step time over wall time, across every restart of a run.

Each session (one process lifetime) appends events to RUN/goodput/events.jsonl as it goes,
so a session that is SIGKILLed loses only what it had not yet written. The categories mirror
Google's ml-goodput-measurement: productive steps, and time lost to startup, compile,
checkpoint save, restore, data wait, evaluation, steps re-done after a restart or rollback, skipped
(bad) steps, watchdog kills, and the rest ("disruption": a killed session's last moments and the gap
before the restart).
The summary is RUN/goodput.json; `summarize` recomputes it from the events at any time.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from llama3_jax.config import write_atomic
from llama3_jax.train.metrics import read_jsonl

KINDS = ("productive", "startup", "compile", "save", "restore", "data", "eval", "redo", "skipped", "watchdog")


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc), else now."""
    try:
        ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class Goodput:
    """The event log of this session; inert when not `enabled` (processes other than 0)."""

    def __init__(self, run_dir, enabled: bool = True, session_start: float | None = None):
        self.enabled = enabled
        self.dir = pathlib.Path(run_dir) / "goodput"
        self.summary_path = pathlib.Path(run_dir) / "goodput.json"
        self.start = process_start_time() if session_start is None else session_start
        self._first = None  # (step, seconds, kind) of the session's first step, until the next one
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "events.jsonl"
        self.file = open(self.path, "a")
        self.event("session", 0.0, t=self.start)

    def event(self, kind: str, seconds: float, step: int | None = None, t: float | None = None) -> None:
        if not self.enabled or (seconds <= 0 and kind != "session"):
            return
        rec = {"kind": kind, "s": round(seconds, 6), "t": round(time.time() if t is None else t, 6)}
        if step is not None:
            rec["step"] = step
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def step(self, step: int, seconds: float, skipped: bool, first: bool, redo: bool) -> None:
        """One step's time: skipped, re-done (a step done before, in this session or an
        earlier one: metrics.jsonl's `redo`) or productive. The session's first step also
        compiles (or loads the compiled step): what it took beyond the next step's time is
        `compile`, and the rest is its own kind."""
        kind = "skipped" if skipped else "redo" if redo else "productive"
        if first:
            self._first = (step, seconds, kind)
            return
        if self._first is not None:
            first_step, first_seconds, first_kind = self._first
            self._first = None
            self.event("compile", max(first_seconds - seconds, 0.0), step=first_step)
            self.event(first_kind, min(first_seconds, seconds), step=first_step)
        self.event(kind, seconds, step=step)

    def finish(self) -> dict | None:
        if not self.enabled:
            return None
        if self._first is not None:  # a session of one step: no ordinary step to compare with
            self.event("compile", self._first[1], step=self._first[0])
        self.file.write(json.dumps({"kind": "end", "s": 0.0, "t": round(time.time(), 6)}) + "\n")
        self.file.close()
        summary = summarize(self.path)
        write_atomic(self.summary_path, json.dumps(summary, indent=1) + "\n")
        return summary


def read_events(path) -> list[dict]:
    path = pathlib.Path(path)
    return read_jsonl(path.read_text()) if path.exists() else []


def summarize(path) -> dict:
    """Wall time from the first session's start to the last event, split by kind; what no
    event accounts for (a killed session's last moments, the gap before a restart) is
    `disruption`."""
    events = read_events(path)
    if not events:
        return {}
    first = min(e["t"] for e in events if e["kind"] == "session")
    wall = max(e["t"] for e in events) - first
    lost = {k: 0.0 for k in KINDS}
    for e in events:
        if e["kind"] in lost:
            lost[e["kind"]] += e["s"]
    productive = lost.pop("productive")
    lost["disruption"] = max(wall - productive - sum(lost.values()), 0.0)
    return {"goodput": productive / wall if wall > 0 else None, "wall_s": wall, "productive_s": productive,
            "sessions": sum(e["kind"] == "session" for e in events),
            "productive_steps": sum(e["kind"] == "productive" for e in events),
            "lost_s": {k: round(v, 3) for k, v in lost.items()}}


def format_summary(s: dict) -> list[str]:
    if not s:
        return []
    lines = [f"goodput {100 * s['goodput']:.1f}%: {s['productive_s']:.1f} s of productive steps in "
             f"{s['wall_s']:.1f} s over {s['sessions']} session(s); lost:"]
    lines += [f"  {k:<10} {v:9.2f} s" for k, v in s["lost_s"].items() if v]
    return lines
