"""The data schedule: which mix each step reads. Annealing (Llama 3 paper section 3.1.3)
reads `[[data.anneal_sources]]` for the last `data.anneal_steps` steps of the run.

Each mix is its own `ShardedBatches` stream; the checkpoint holds both positions, so a run
resumed inside or across the switch reads what an uninterrupted run reads. A rollback to a
step before the switch goes back to the main mix (the caller `select`s the step it draws for).
"""

from __future__ import annotations

import dataclasses

from llama3_jax.config import DataConfig
from llama3_jax.data.packing import ShardedBatches

# Annealing sources get their own shuffle seeds, unrelated to the main mix's.
_ANNEAL_SEED = 7_777_777


def make_batches(data: DataConfig, tokenizer, *, global_batch: int, seq_len: int, steps: int, **kw):
    """The run's batches: one `ShardedBatches`, or a `ScheduledBatches` with annealing."""
    main = ShardedBatches(data, tokenizer, global_batch=global_batch, seq_len=seq_len, **kw)
    if not data.anneal_steps:
        return main
    anneal_data = dataclasses.replace(data, sources=data.anneal_sources, path="", seed=data.seed + _ANNEAL_SEED)
    anneal = ShardedBatches(anneal_data, tokenizer, global_batch=global_batch, seq_len=seq_len, **kw)
    return ScheduledBatches(main, anneal, max(steps - data.anneal_steps, 0))


class ScheduledBatches:
    """The main mix before step `switch` (0-based), the annealing mix from it on."""

    def __init__(self, main: ShardedBatches, anneal: ShardedBatches, switch: int):
        self.main, self.anneal, self.switch = main, anneal, switch
        self.current = main
        self.sources = main.sources + anneal.sources  # rows_read numbers them in this order

    def select(self, step: int) -> None:
        self.current = self.main if step < self.switch else self.anneal

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.current)

    def bad_rows(self) -> tuple[int, int, int]:
        a, b = self.main.bad_rows(), self.anneal.bad_rows()
        return tuple(x + y for x, y in zip(a, b))

    def rows_read(self, state: dict | None = None) -> dict[int, int]:
        main = self.main.rows_read(None if state is None else state["main"])
        anneal = self.anneal.rows_read(None if state is None else state["anneal"])
        return {**main, **{len(self.main.sources) + i: n for i, n in anneal.items()}}

    def get_state(self) -> dict:
        return {"main": self.main.get_state(), "anneal": self.anneal.get_state()}

    def set_state(self, state: dict) -> None:
        from llama3_jax.config import ConfigError
        if set(state) != {"main", "anneal"}:
            raise ConfigError("the checkpoint's data position is of a run without annealing; resume without "
                              "data.anneal_steps, or start a new --out")
        self.main.set_state(state["main"])
        self.anneal.set_state(state["anneal"])

    def gather_state(self, local: dict | None = None) -> dict:
        local = self.get_state() if local is None else local
        return {"main": self.main.gather_state(local["main"]), "anneal": self.anneal.gather_state(local["anneal"])}


def mix_read(batches, state: dict | None = None) -> list[dict]:
    """[{name, weight, rows, share}] of every source the run read from (`state`: a
    `gather_state`, for all processes; default: this process's rows)."""
    rows = batches.rows_read(state)
    total = sum(rows.values()) or 1
    return [dict(name=name, weight=weight, rows=rows.get(i, 0), share=rows.get(i, 0) / total)
            for i, (name, _, weight) in enumerate(batches.sources)]


def describe_schedule(batches, tokenizer, cfg) -> list[str]:
    """The data report of the run's mix (and of the annealing mix, for its steps)."""
    from llama3_jax.data.report import describe_sources, format_report
    tokens = cfg.train.global_batch * cfg.data.seq_len
    if not isinstance(batches, ScheduledBatches):
        return format_report(describe_sources(batches.sources, tokenizer, run_tokens=cfg.train.steps * tokens))
    anneal = min(cfg.data.anneal_steps, cfg.train.steps)
    return (format_report(describe_sources(batches.main.sources, tokenizer, run_tokens=batches.switch * tokens))
            + [f"annealing: the last {anneal} steps (from step {batches.switch + 1}) read this mix:"]
            + format_report(describe_sources(batches.anneal.sources, tokenizer, run_tokens=anneal * tokens)))
