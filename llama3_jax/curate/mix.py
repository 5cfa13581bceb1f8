"""The mix helper: the `[[data.sources]]` of a target mix (shares of tokens) over the curated
shards, OUT/<category>/*.jsonl (no datatrove needed)."""

from __future__ import annotations

import json
import pathlib

from llama3_jax.config import ConfigError
from llama3_jax.curate.config import DOMAINS


def parse_target(text: str) -> dict[str, float]:
    target = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not eq or share <= 0:
            raise ConfigError(f"--target entry {item!r} must look like category=share with a share > 0 "
                              f"(e.g. general=50,math=25,code=17,multilingual=8)")
        if name not in DOMAINS:
            raise ConfigError(f"--target category {name!r} is not one of {', '.join(DOMAINS)}")
        target[name] = share
    if not target:
        raise ConfigError("--target is empty; give e.g. general=50,math=25,code=17,multilingual=8")
    return target


def mix_toml(out, target: dict[str, float]) -> tuple[str, list[str]]:
    """The `[[data.sources]]` TOML for `target` (category -> share of tokens; normalised to
    weights that sum to 1) over OUT/<category>/*.jsonl, and lines describing it."""
    out = pathlib.Path(out).expanduser().resolve()
    missing = [c for c in target if not any((out / c).glob("*.jsonl"))]
    if missing:
        raise ConfigError(f"no shards for {', '.join(missing)} in {out} (no {out}/<category>/*.jsonl); "
                          f"drop them from --target or curate data that has them")
    report = out / "report.json"
    available = json.loads(report.read_text())["output"] if report.is_file() else {}
    total = sum(target.values())
    have = sum(available.get(c, {}).get("tokens", 0) for c in target)
    lines = [f"# Data mix over the curated shards of {out}",
             "# (python -m llama3_jax.curate mix). Weights are shares of training tokens: packed rows",
             "# are mixed by weight. A category's epochs = weight x tokens trained / tokens available."]
    notes = []
    for c, share in target.items():
        tokens = available.get(c, {}).get("tokens")
        note = f"{c}: weight {share / total:.4f}"
        if tokens is not None and have:
            note += f", {tokens} tokens available ({tokens / have:.1%} of the mix's categories)"
        notes.append(note)
        lines += ["", "[[data.sources]]", f"path = {json.dumps(str(out / c))}", 'kind = "jsonl"', 'field = "text"',
                  'glob = "*.jsonl"', f"weight = {share / total:.6g}"]
    return "\n".join(lines) + "\n", notes
