"""One full training step (forward, backward, AdamW) of llama3_jax against transformers'
LlamaForCausalLM with torch.optim.AdamW, on the same shape, side by side in one run.

    python benchmarks/vs_transformers.py [--vocab 128256 32000] [--dtype float32 bfloat16] [--steps 3]

Shape: dim 512, 8 layers, 8 heads, 2 kv heads, FFN 1536, batch 4 x 512 tokens. Both use
all host cores. bfloat16 means bfloat16 compute over float32 weights: our
model.compute_dtype, torch.autocast for transformers. After a warm-up step each (compile
for JAX), --steps timed steps of the two alternate, so a drift in the machine's speed
(this kind of shared machine drifts by tens of percent) touches both alike; each time is
the median of its steps. The matmul peak of each
framework is measured in the same run (float32 and bfloat16, 2048x512 @ 512x1536), and
each framework's achieved rate (our FLOP formula / step time) is given as a fraction of its
own peak.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHAPE = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_hidden=1536)
BATCH, SEQ = 4, 512


def timed(fn, steps: int) -> float:
    return alternating([fn], steps)[0]


def alternating(fns, steps: int) -> list[float]:
    """Median seconds of each function, after a warm-up call each, its timed calls
    interleaved with the others'."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def jax_peak(dtype: str) -> float:
    """8 different products (a loop, so XLA cannot merge them into one)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((BATCH * SEQ, SHAPE["dim"]), dtype)
    b = jnp.ones((SHAPE["dim"], SHAPE["ffn_hidden"]), dtype)
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, 8, lambda i, acc: acc + (a + i.astype(dtype)) @ b,
                                               jnp.zeros((a.shape[0], b.shape[1]), dtype)))
    return 8 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed(lambda: jax.block_until_ready(f(a, b)), 5)


def torch_peak(dtype: str) -> float:
    import torch
    a = torch.ones((BATCH * SEQ, SHAPE["dim"]), dtype=getattr(torch, dtype))
    b = torch.ones((SHAPE["dim"], SHAPE["ffn_hidden"]), dtype=getattr(torch, dtype))
    return 8 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed(lambda: [(a + i) @ b for i in range(8)], 5)


def ours(vocab: int, dtype: str):
    """One training step of llama3_jax, as a function to time."""
    import jax

    from llama3_jax.config import load_config
    from llama3_jax.train.step import Trainer, synthetic_batch
    overrides = [f"model.{k}={v}" for k, v in SHAPE.items()] + [
        f"model.vocab_size={vocab}", "model.tie_embeddings=false", "model.remat=none", "model.attention_impl=xla",
        "model.param_dtype=float32", f"model.compute_dtype={dtype}", f"data.seq_len={SEQ}",
        f"train.global_batch={BATCH}", "train.warmup_steps=0"]
    trainer = Trainer(load_config("debug", overrides), devices=jax.devices()[:1])
    state = [trainer.init_state()]
    batch = trainer.put(synthetic_batch(BATCH, SEQ, vocab))

    def step():
        state[0], metrics = trainer(state[0], batch)
        jax.block_until_ready(metrics)

    return step


def theirs(vocab: int, dtype: str):
    """One training step of transformers' LlamaForCausalLM with torch.optim.AdamW."""
    import contextlib

    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=SHAPE["dim"], intermediate_size=SHAPE["ffn_hidden"],
        num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
        num_key_value_heads=SHAPE["n_kv_heads"], max_position_embeddings=SEQ, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, vocab, (BATCH, SEQ + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 32000])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
    args = ap.parse_args()
    import jax
    import torch

    from llama3_jax.config import load_config
    from llama3_jax.model import flops_per_token
    peaks = {(fw, dt): f(dt) for dt in args.dtype for fw, f in (("jax", jax_peak), ("torch", torch_peak))}
    print(f"# {os.cpu_count()} CPU cores; JAX {jax.__version__} (XLA:CPU), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); shape {SHAPE}, batch {BATCH} x {SEQ}")
    print("# matmul peak (2048x512 @ 512x1536): "
          + ", ".join(f"{fw} {dt} {p / 1e9:.0f} GFLOP/s" for (fw, dt), p in peaks.items()))
    head = (f"{'vocab':>7} {'dtype':<9}{'ours tok/s':>11}{'theirs tok/s':>13}{'ratio':>7}"
            f"{'ours GFLOP/s':>13}{'of peak':>8}{'theirs GFLOP/s':>15}{'of peak':>8}")
    print(head)
    print("-" * len(head))
    for vocab in args.vocab:
        flops = flops_per_token(load_config("debug", [f"model.{k}={v}" for k, v in SHAPE.items()]
                                            + [f"model.vocab_size={vocab}", "model.tie_embeddings=false"]).model,
                                SEQ) * BATCH * SEQ
        for dtype in args.dtype:
            a, b = alternating([ours(vocab, dtype), theirs(vocab, dtype)], args.steps)
            ga, gb = flops / a / 1e9, flops / b / 1e9
            print(f"{vocab:>7} {dtype:<9}{BATCH * SEQ / a:>11,.0f}{BATCH * SEQ / b:>13,.0f}{b / a:>7.2f}"
                  f"{ga:>13.1f}{ga * 1e9 / peaks['jax', dtype]:>8.0%}{gb:>15.1f}"
                  f"{gb * 1e9 / peaks['torch', dtype]:>8.0%}", flush=True)


if __name__ == "__main__":
    main()
