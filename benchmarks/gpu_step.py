"""A bf16 train step of llama3-8b-shaped layers on one accelerator: tokens/s, TFLOP/s, MFU.

    bash benchmarks/gpu.sh            (on a lent H100/H200; this file does the work)
    python benchmarks/gpu_step.py --tiny   (the same path on CPU, tiny shape: for tests)

Layers of Llama 3 8B (dim 4096, 32 heads, 8 kv heads, FFN 14336, vocab 128256), parameters in
float32 with bfloat16 compute, attention through jax.nn.dot_product_attention (cuDNN's
fused kernel on the GPU). For each remat policy it compiles 2 and 4 layers ahead of time,
fits per-device memory as a + b * layers, takes as many layers as fit in 90% of the card's
memory (at most 32), compiles that and times --steps steps. The best policy is printed last.
Policies not started by --deadline-s are skipped, so one device call always ends with a
table. If cuDNN's kernel does not compile, the remaining policies use XLA's attention.
MFU is against the card's dense bf16 peak (H100/H200 989 TFLOP/s); on CPU, against a
measured float32 matmul rate.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

LAYER_8B = dict(dim=4096, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
TINY = dict(dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=512)
POLICIES = ("none", "save_dots", "save_qkv_proj", "full")


EXTRA: list[str] = []  # --set overrides


def config(shape: dict, layers: int, remat: str, batch: int, seq: int, attention: str):
    from llama3_jax.config import load_config
    return load_config("debug", [f"model.{k}={v}" for k, v in shape.items()] + EXTRA + [
        f"model.n_layers={layers}", f"model.remat={remat}", f"model.attention_impl={attention}",
        "model.param_dtype=float32", "model.compute_dtype=bfloat16", "model.tie_embeddings=false",
        f"model.max_seq_len={seq}", f"data.seq_len={seq}", f"train.global_batch={batch}", "train.warmup_steps=0"])


def device_bytes(cfg) -> int:
    from llama3_jax.train.plan import plan
    return plan(cfg, _mesh(), [_device()])["total"]


def _device():
    import jax
    return jax.devices()[0]


def _mesh():
    from llama3_jax.config import MeshConfig
    return MeshConfig()


def run(cfg, steps: int) -> float:
    """Median seconds per step after a compile and a warm-up step."""
    import statistics

    import jax

    from llama3_jax.train.step import Trainer, synthetic_batch
    trainer = Trainer(cfg, devices=[_device()])
    state = trainer.init_state()
    batch = trainer.put(synthetic_batch(cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size))
    step = trainer.lower(state, batch).compile()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (CPU check of this script)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, the best measured on an H200; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 8192; tiny 64)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-layers", type=int, default=32)
    ap.add_argument("--memory-gib", type=float, default=None, help="device memory (default: the card's)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--deadline-s", type=float, default=330, help="start no policy after this many seconds")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = ap.parse_args()
    EXTRA.extend(args.set)
    import jax

    from llama3_jax.model import flops_per_token
    from llama3_jax.train.metrics import chip, peak_flops
    shape = TINY if args.tiny else LAYER_8B
    batch, seq = args.batch or (2 if args.tiny else 4), args.seq or (64 if args.tiny else 8192)
    device = _device()
    attention = "jax_nn"  # cuDNN flash attention on a GPU in bf16 (model/attention.py)
    started = time.perf_counter()
    capacity = args.memory_gib * 2**30 if args.memory_gib else (chip(device) or (None, 2 * 2**30))[1]
    peak = peak_flops(device)
    print(f"# {device.device_kind} ({device.platform}), JAX {jax.__version__}; {capacity / 2**30:.0f} GiB, peak "
          f"{peak / 1e12:.1f} TFLOP/s; layers {shape}; batch {batch} x {seq}; attention {attention}", flush=True)
    head = (f"{'remat':<15}{'layers':>7}{'GiB/layer':>10}{'est GiB':>9}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>9}"
            f"{'MFU':>7}")
    print(head)
    print("-" * len(head))
    best = None
    for remat in args.policies:
        if time.perf_counter() - started > args.deadline_s:
            print(f"{remat:<15} skipped: past --deadline-s {args.deadline_s:.0f}", flush=True)
            continue
        small, large = (1, 2) if args.tiny else (2, 4)
        try:
            m1, m2 = (device_bytes(config(shape, n, remat, batch, seq, attention)) for n in (small, large))
        except Exception as e:  # noqa: BLE001 - a kernel the card refuses: say so, go on with XLA's
            if attention == "xla_chunked":
                raise
            print(f"# attention {attention} failed to compile ({type(e).__name__}: {str(e)[:300]}); "
                  f"using xla_chunked", flush=True)
            attention = "xla_chunked"
            m1, m2 = (device_bytes(config(shape, n, remat, batch, seq, attention)) for n in (small, large))
        per_layer = (m2 - m1) / (large - small)
        layers = int(min(args.max_layers, (0.9 * capacity - (m1 - small * per_layer)) // max(per_layer, 1)))
        if layers < 1:
            print(f"{remat:<15}{'-':>7}{per_layer / 2**30:>10.2f}   not even one layer fits", flush=True)
            continue
        try:
            cfg = config(shape, layers, remat, batch, seq, attention)
            seconds = run(cfg, args.steps)
        except Exception as e:  # noqa: BLE001 - the estimate was short (out of memory): fewer layers once
            print(f"# {remat} with {layers} layers failed ({type(e).__name__}: {str(e)[:200]}); "
                  f"retrying with {layers * 3 // 4}", flush=True)
            layers = layers * 3 // 4
            cfg = config(shape, layers, remat, batch, seq, attention)
            seconds = run(cfg, args.steps)
        tflops = flops_per_token(cfg.model, seq) * batch * seq / seconds / 1e12
        row = (f"{remat} ({attention})", layers, tflops * 1e12 / peak)
        print(f"{remat:<15}{layers:>7}{per_layer / 2**30:>10.2f}{(m1 + (layers - small) * per_layer) / 2**30:>9.1f}"
              f"{seconds:>9.3f}{batch * seq / seconds:>11,.0f}{tflops:>9.1f}{row[2]:>7.1%}", flush=True)
        best = max(best or row, row, key=lambda r: r[2])
    if best:
        print(f"best: remat={best[0]} with {best[1]} layers, {best[2]:.1%} MFU; "
              f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
