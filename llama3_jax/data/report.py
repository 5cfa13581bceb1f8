"""What each data source holds and what the run takes from it, measured before training.

For every source: files, documents, an estimate of its tokens (the mean of up to `sample`
documents spread evenly over it, times the documents; exact when the source is that
small), its share of the mix (sources are mixed by weight at the row level and rows are
full, so the weights are shares of tokens) and how many epochs of it the run reads. Empty
documents and bytes that are not UTF-8 (read as U+FFFD) are counted in the same sample and
reported; a source whose documents are all empty is an error, since it cannot supply its
share.
"""

from __future__ import annotations

import numpy as np

from llama3_jax.config import ConfigError
from llama3_jax.data.sources import BadRow

REPLACEMENT = "\ufffd"


def describe_sources(opened, tokenizer, *, run_tokens: int, sample: int = 256) -> list[dict]:
    """One dict per (name, documents, weight) of `open_sources`; raises ConfigError for a
    source with no text."""
    total_weight = sum(w for _, _, w in opened)
    rows = []
    for name, docs, weight in opened:
        n = len(docs)
        picks = sorted(set(np.linspace(0, n - 1, min(n, sample)).round().astype(int).tolist()))
        texts = [docs[i] for i in picks]
        bad = [t for t in texts if isinstance(t, BadRow)]
        texts = [t for t in texts if not isinstance(t, BadRow)]
        where = "all of its" if len(picks) == n else f"all {len(picks)} sampled of its"
        if not texts:  # the pipeline would skip document after document and never yield a row
            raise ConfigError(f"data source {name!r} cannot be read: {where} {n} document(s) are bad rows "
                              f"(first: {bad[0].where}: {bad[0].why}); fix the files or drop the source")
        empty = sum(not t.strip() for t in texts)
        if empty == len(texts):
            raise ConfigError(f"data source {name!r} has no text: {where} {n} document(s) are empty; "
                              "fill it or drop it from [data] sources")
        # Bad rows are skipped: they count as documents without tokens.
        tokens = sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in texts) / len(picks) * n
        share = weight / total_weight
        rows.append(dict(name=name, files=len(getattr(docs, "paths", [name])), documents=n,
                         tokens=tokens, exact=len(picks) == n, share=share, epochs=run_tokens * share / tokens,
                         sampled=len(picks), empty=empty, replaced=sum(REPLACEMENT in t for t in texts),
                         bad=len(bad), first_bad=bad[0] if bad else None))
    return rows


def format_report(rows: list[dict]) -> list[str]:
    """A table of `describe_sources`, then one warning line per source with empty or
    undecodable documents."""
    head = f"{'data source':<40}{'files':>8}{'documents':>11}{'tokens':>14}{'share':>8}{'epochs':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r["name"] if len(r["name"]) < 40 else "..." + r["name"][-36:]
        tokens = f"{'' if r['exact'] else '~'}{r['tokens']:,.0f}"
        lines.append(f"{name:<40}{r['files']:>8,}{r['documents']:>11,}{tokens:>14}{r['share']:>8.1%}"
                     f"{r['epochs']:>9.2f}")
    for r in rows:
        of = f"of {r['sampled']} sampled documents" if not r["exact"] else f"of its {r['documents']} documents"
        if r["empty"]:
            lines.append(f"warning: data source {r['name']!r}: {r['empty']} {of} are empty")
        if r.get("bad"):
            b = r["first_bad"]
            lines.append(f"warning: data source {r['name']!r}: {r['bad']} {of} cannot be read and will be skipped "
                         f"(first: {b.where}: {b.why})")
        if r["replaced"]:
            lines.append(f"warning: data source {r['name']!r}: {r['replaced']} {of} have bytes that are not UTF-8 "
                         "(read as U+FFFD); re-encode the files as UTF-8")
    return lines
