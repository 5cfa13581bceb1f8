"""Tokens/s of the data pipeline alone (read + tokenize + pack + batch), in steady state.

    python benchmarks/data_throughput.py [--config CONFIG] [--set data.key=value ...]
        [--batches 20] [--windows 5] [--threads 0 4] [--workers 2]

The data comes from the config's [data] (its sources, or the default corpus), its seq_len
and tokenizer (data.tokenizer, else the project's BPE) and the config's global batch.
Each configuration builds a fresh iterator, then consumes batches until every prefetch
buffer has been emptied twice over (so no timed batch was made during start-up), then
times --windows windows of at least --batches batches and --min-window-s seconds each
(short windows on a shared machine measure its noise). It reports start-up time and the
median, minimum and maximum tokens/s of the windows: the pipeline's sustained rate.

The row shuffle (data.shuffle_rows) fills a window of rows, then serves it at no cost:
a timed window that fell inside one serving would flatter the pipeline many times over.
So the untimed lead-in ends on a shuffle-window boundary and every timed window spans
whole shuffle windows of the source that cycles slowest.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.config import load_config  # noqa: E402
from llama3_jax.data import make_iterator  # noqa: E402

PREFETCH = 2  # make_iterator's default background-thread buffer
WORKER_BUFFER = 2  # batches each worker process prepares ahead


def measure(data, tokenizer, *, global_batch: int, batches: int, windows: int, num_threads: int = 0,
            worker_count: int = 0, min_window_s: float = 1.0, clock=time.perf_counter) -> dict:
    """Start-up seconds and the tokens/s of each timed window, in steady state. A window
    lasts at least `batches` batches and `min_window_s` seconds, in whole shuffle cycles.
    `clock` measures the windows (tests pass time.process_time: CPU seconds of this process,
    which other tenants of a shared machine do not inflate)."""
    t0 = time.perf_counter()
    it = make_iterator(data, tokenizer, global_batch=global_batch, num_threads=num_threads,
                       worker_count=worker_count, prefetch=PREFETCH)
    it.next()
    startup = time.perf_counter() - t0
    cycle = shuffle_cycle(data, global_batch, worker_count)
    buffered = PREFETCH + WORKER_BUFFER * worker_count + 2 * num_threads
    lead_in = -(-(2 * buffered + 1) // cycle) * cycle  # whole cycles: drained, and aligned
    batches = -(-batches // cycle) * cycle
    for _ in range(lead_in - 1):
        it.next()
    rates = []
    for _ in range(windows):
        t0, n = clock(), 0
        while n < batches or clock() - t0 < min_window_s:
            for _ in range(cycle if n >= batches else batches):
                it.next()
            n += cycle if n >= batches else batches
        rates.append(n * global_batch * data.seq_len / (clock() - t0))
    it.close()
    return {"startup_s": startup, "rates": rates, "median": statistics.median(rates), "batches": batches}


def shuffle_cycle(data, global_batch: int, worker_count: int) -> int:
    """Batches per row-shuffle window of the source whose window lasts longest (1 if off)."""
    if data.shuffle_rows <= 1:
        return 1
    weights = [s.weight for s in data.sources] or [1.0]
    share = min(weights) / sum(weights)
    return max(1, round(data.shuffle_rows / (global_batch * share))) * max(1, worker_count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help="preset or .toml whose [data] is measured")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="section.key=value overrides")
    p.add_argument("--batches", type=int, default=20, help="batches per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows per configuration")
    p.add_argument("--min-window-s", type=float, default=1.0, help="shortest timed window, in seconds")
    p.add_argument("--threads", type=int, nargs="*", default=[0, 4], help="num_threads values (tokenizing threads)")
    p.add_argument("--workers", type=int, nargs="*", default=[os.cpu_count() or 1],
                   help="worker_count values (processes); 0 values are skipped")
    args = p.parse_args(argv)

    from llama3_jax.formats.bpe import default_tokenizer, load_tokenizer
    cfg = load_config(args.config, args.overrides)
    tok = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else default_tokenizer(cfg.data.default_vocab_size)
    runs = [{"num_threads": t} for t in args.threads] + [{"worker_count": w} for w in args.workers if w > 0]
    sources = ", ".join(s.path for s in cfg.data.sources) or "the default corpus"
    print(f"# {sources}; tokenizer {tok.path.name}; seq_len {cfg.data.seq_len}, batch {cfg.train.global_batch}, "
          f"shuffle_rows {cfg.data.shuffle_rows}; {args.windows} windows; {os.cpu_count()} CPUs")
    head = (f"{'configuration':<18}{'start-up s':>11}{'batches':>9}{'median tok/s':>14}{'min tok/s':>12}"
            f"{'max tok/s':>12}")
    print(head)
    print("-" * len(head))
    for run in runs:
        r = measure(cfg.data, tok, global_batch=cfg.train.global_batch, batches=args.batches,
                    windows=args.windows, min_window_s=args.min_window_s, **run)
        label = ", ".join(f"{k}={v}" for k, v in run.items())
        print(f"{label:<18}{r['startup_s']:>11.2f}{r['batches']:>9}{r['median']:>14,.0f}{min(r['rates']):>12,.0f}"
              f"{max(r['rates']):>12,.0f}", flush=True)


if __name__ == "__main__":
    main()
