"""OUT/report.json (every stage's documents and tokens in and out, what each filter removed,
duplicate clusters, time) and the summary table."""

from __future__ import annotations

import json
import pathlib

from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from llama3_jax.curate import kl
from llama3_jax.curate.config import lsh_summary, to_dict

COUNTS = ("docs_in", "docs_out", "tokens_in", "tokens_out", "bytes_in", "bytes_out", "clustered")


def merge_parts(parts_folder) -> dict:
    """{stage: {job: summed record}} over every task's part files."""
    folder = get_datafolder(parts_folder)
    out: dict = {}
    for name in folder.list_files(glob_pattern="*/*/*.json"):
        stage, job, _ = name.split("/")[-3:]
        with folder.open(name, "r") as f:
            rec = json.load(f)
        empty = {k: 0 for k in COUNTS} | {"seconds": 0.0, "cpu_seconds": 0.0, "tasks": 0, "labels": {}, "stats": {}}
        acc = out.setdefault(stage, {}).setdefault(job, empty)
        for k in COUNTS + ("seconds", "cpu_seconds"):
            acc[k] += rec[k]
        acc["tasks"] += 1
        for label, v in rec["labels"].items():
            a = acc["labels"].setdefault(label, {"docs": 0, "tokens": 0})
            a["docs"] += v["docs"]
            a["tokens"] += v["tokens"]
        for key, v in rec["stats"].items():
            a = acc["stats"].setdefault(key, {"total": 0, "n": 0})
            a["total"] += v["total"]
            a["n"] += v["n"]
    return out


def stage_record(name: str, jobs: dict) -> dict:
    s = jobs["stream"]
    rec = {"stage": name, "docs_in": s["docs_in"], "docs_out": s["docs_out"],
           "docs_removed": s["docs_in"] - s["docs_out"], "tokens_in": s["tokens_in"], "tokens_out": s["tokens_out"],
           "tokens_removed": s["tokens_in"] - s["tokens_out"],
           "bytes_in": s["bytes_in"], "seconds": round(sum(j["seconds"] for j in jobs.values()), 4),
           "cpu_seconds": round(sum(j["cpu_seconds"] for j in jobs.values()), 4),
           "seconds_by_job": {job: round(j["seconds"], 4) for job, j in jobs.items()}}
    stats = s["stats"]
    # what the filters themselves counted (datatrove's dropped_<reason>), not in - out
    reasons = {k.removeprefix("dropped_"): int(v["total"]) for k, v in stats.items() if k.startswith("dropped_")}
    rest = int(stats.get("dropped", {}).get("total", 0)) - sum(reasons.values())
    if rest:
        reasons[name] = rest
    rec["removed_by"] = reasons
    if s["labels"]:
        rec["labels"] = dict(sorted(s["labels"].items()))
    if name in ("url_dedup", "exact_dedup"):
        rec["clusters"] = {"clusters": s["clustered"], "documents": s["clustered"] + sum(reasons.values())}
    if name == "url_dedup":
        sig = jobs.get("signature", {}).get("stats", {})
        rec["without_url"] = int(sig.get("no_url", {}).get("total", 0))
        rec["undated"] = int(sig.get("undated", {}).get("total", 0))
    if name == "minhash_dedup" and "cluster" in jobs:
        c = jobs["cluster"]["stats"].get("cluster_size", {"total": 0, "n": 0})
        rec["clusters"] = {"clusters": int(c["n"]), "documents": int(c["total"])}
    if name == "line_dedup":
        rec["lines_removed"] = int(stats.get("lines_removed", {}).get("total", 0))
        merge = jobs.get("merge", {}).get("stats", {})
        rec["repeated_lines"] = int(merge.get("repeated_lines", {}).get("total", 0))
    return rec


def build_report(out, parts_folder, stages: list[str], cfg, tokenizer: str, tasks: int, kl_folder: str = "") -> dict:
    parts = merge_parts(parts_folder)
    records = [stage_record(s, parts[s]) for s in stages]
    for r in records:
        if r["stage"] == "kl":
            r["kl"] = kl.summary(kl_folder, cfg.kl)
    out = pathlib.Path(out)
    output = {}
    for label, v in records[-1].get("labels", {}).items():
        files = sorted(p.relative_to(out).as_posix() for p in (out / label).glob("*.jsonl"))
        output[label] = dict(v, files=files)
    first, last = records[0], records[-1]
    io = parts.get("io", {})
    return {
        "stages": records,
        "output": output,
        "totals": {"docs_in": first["docs_in"], "docs_out": last["docs_out"], "tokens_in": first["tokens_in"],
                   "tokens_out": last["tokens_out"], "bytes_in": first["bytes_in"],
                   "seconds": round(sum(r["seconds"] for r in records) + sum(j["seconds"] for j in io.values()), 4),
                   "cpu_seconds": round(sum(r["cpu_seconds"] for r in records)
                                        + sum(j["cpu_seconds"] for j in io.values()), 4),
                   "io_seconds": round(sum(j["seconds"] for j in io.values()), 4),
                   "io_cpu_seconds": round(sum(j["cpu_seconds"] for j in io.values()), 4)},
        "disabled": [s for s in ("url_dedup", "exact_dedup", "minhash_dedup", "domain", "language", "line_dedup",
                                 "length", "repetition", "symbols", "dirty_words", "kl", "quality") if s not in stages],
        "minhash": lsh_summary(cfg.minhash) if "minhash_dedup" in stages else None,
        "tokenizer": tokenizer,
        "executor": {"kind": cfg.executor.kind, "tasks": tasks},
        "config": to_dict(cfg),
    }


class WriteReport(PipelineStep):
    """The last job (one task): merges the parts every task wrote and writes OUT/report.json."""

    type = "📋 - REPORT"
    name = "report"

    def __init__(self, out: str, parts: str, stages: list[str], cfg, tokenizer: str, tasks: int, kl_folder: str = ""):
        super().__init__()
        self.out, self.parts, self.stages, self.cfg = out, parts, stages, cfg
        self.tokenizer, self.tasks, self.kl_folder = tokenizer, tasks, kl_folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        report = build_report(self.out, self.parts, self.stages, self.cfg, self.tokenizer, self.tasks, self.kl_folder)
        with get_datafolder(self.out).open("report.json", "w") as f:
            json.dump(report, f, indent=2)
        return
        yield  # a generator, like every step


def summary(report: dict) -> str:
    """The report as a table: one row a stage."""
    rows = [f"{'stage':<14}{'docs in':>10}{'out':>10}{'removed':>9}{'tokens in':>13}{'out':>13}{'s':>8}"]
    for r in report["stages"]:
        rows.append(f"{r['stage']:<14}{r['docs_in']:>10}{r['docs_out']:>10}{r['docs_removed']:>9}"
                    f"{r['tokens_in']:>13}{r['tokens_out']:>13}{r['seconds']:>8.2f}")
    for label, v in report["output"].items():
        rows.append(f"  {label:<12}{v['docs']:>10} documents {v['tokens']:>12} tokens  {len(v['files'])} file(s)")
    return "\n".join(rows)
