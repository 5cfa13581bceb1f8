"""Tokens/s of the data pipeline (read + tokenize + pack + batch) on the default corpus.

    python benchmarks/data_throughput.py --seq-len 2048 --batch 8 --batches 50

Uses `llama3_jax.formats.bpe.default_tokenizer()` when it can be imported, else a byte-level
stand-in (say which with --tokenizer). Each configuration builds a fresh iterator, takes
one warm-up batch (worker start-up, first reads), then times --batches batches.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.config import DataConfig  # noqa: E402
from llama3_jax.data import make_iterator  # noqa: E402


class ByteTokenizer:
    """Fallback: UTF-8 bytes, BOS 256, EOS 257."""

    bos_id = 256
    eos_id = 257

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos


def load_tokenizer(which: str):
    if which in ("auto", "default"):
        try:
            from llama3_jax.formats.bpe import default_tokenizer
            t0 = time.perf_counter()
            tok = default_tokenizer()
            return tok, f"llama3_jax default_tokenizer ({time.perf_counter() - t0:.1f}s to load)"
        except Exception as e:  # not written yet, or it failed: say so and go on
            if which == "default":
                raise
            print(f"# default_tokenizer unavailable ({type(e).__name__}: {e}); using bytes")
    return ByteTokenizer(), "byte-level fallback"


def measure(tok, *, seq_len, batch, n_batches, seed, **opts):
    t0 = time.perf_counter()
    it = make_iterator(DataConfig(seed=seed), tok, global_batch=batch, seq_len=seq_len, **opts)
    for _ in range(max(1, opts.get("worker_count", 0)) + 1):  # warm-up: every worker started
        it.next()
    setup = time.perf_counter() - t0
    real = 0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        b = it.next()
        real += int((b["segment_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    it.close()
    return setup, n_batches * batch * seq_len / dt, real / (n_batches * batch * seq_len)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows per batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", choices=("auto", "default", "bytes"), default="auto")
    p.add_argument("--threads", type=int, nargs="*", default=[0, 4],
                   help="num_threads values to try (tokenization threads)")
    p.add_argument("--workers", type=int, nargs="*", default=[os.cpu_count() or 1],
                   help="worker_count values to try (processes); 0 values are skipped")
    args = p.parse_args(argv)

    tok, name = load_tokenizer(args.tokenizer)
    configs = [{"num_threads": t} for t in args.threads]
    configs += [{"worker_count": w} for w in args.workers if w > 0]
    print(f"# default corpus, tokenizer: {name}, seq_len={args.seq_len}, batch={args.batch}, "
          f"{args.batches} timed batches, {os.cpu_count()} CPUs")
    print(f"{'configuration':<24} {'setup s':>8} {'tokens/s':>12} {'real frac':>9}")
    for cfg in configs:
        label = ", ".join(f"{k}={v}" for k, v in cfg.items())
        setup, tps, frac = measure(tok, seq_len=args.seq_len, batch=args.batch,
                                   n_batches=args.batches, seed=args.seed, **cfg)
        print(f"{label:<24} {setup:>8.2f} {tps:>12,.0f} {frac:>9.3f}")


if __name__ == "__main__":
    main()
