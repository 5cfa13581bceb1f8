"""bf16 (and int8 weight-only) KV-cache decode of an 8B-shaped Llama 3 on one GPU: decode
tokens/s and memory-bandwidth utilisation.

    python3 benchmarks/gpu_decode.py            (on a lent H100/H200; random weights, no download)
    python benchmarks/gpu_decode.py --tiny      (the same path on CPU)

Utilisation = bytes a decode step must read (every weight but the embedding table, whose
one row per token is negligible, plus the keys and values of the positions so far) / step
time / the card's peak HBM bandwidth (H200 4.8 TB/s, H100 3.35 TB/s, datasheets). "device"
times the jitted decode steps back to back; "generate" is `generate()`, which also reads
each token on the host (stop tokens, streaming).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PEAK_BYTES = {"h200": 4.8e12, "h100": 3.35e12}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama3_jax.config import load_config
    from llama3_jax.infer.decode import decode_step, prefill
    from llama3_jax.infer.generate import Sampling, cache_length, generate
    from llama3_jax.infer.quant import param_bytes, prepare_params
    from llama3_jax.model import param_shapes

    over = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
            "model.multiple_of=32"] if args.tiny else []
    cfg = load_config("llama3-8b", over + ["model.param_dtype=bfloat16", "model.compute_dtype=bfloat16",
                                           "model.max_seq_len=1024"]).model
    cfg = dataclasses.replace(cfg, attention_impl="xla", remat="none")
    device = jax.devices()[0]
    peak = next((b for k, b in PEAK_BYTES.items() if k in device.device_kind.lower()), None)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(param_shapes(cfg)))
        return {n: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16)
                for k, (n, s) in zip(keys, param_shapes(cfg).items())}

    base = init(jax.random.key(0))
    print(f"# {device.device_kind}, JAX {jax.__version__}; llama3-8b shape{' (tiny)' if args.tiny else ''}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, peak HBM "
          f"{peak / 1e12 if peak else float('nan'):.2f} TB/s", flush=True)
    head = f"{'weights':<8}{'batch':>6}{'GiB':>7}{'device tok/s':>14}{'ms/step':>9}{'HBM util':>10}{'generate tok/s':>16}"
    print(head)
    print("-" * len(head))
    knobs = (np.float32(0), np.int32(0), np.float32(1))
    allowed = np.ones(cfg.vocab_size, bool)
    for name in ("bf16", "int8"):
        params = prepare_params(base, None if name == "bf16" else "int8")
        weight_bytes = param_bytes(params) - (params["embed"].nbytes if "output" in base else 0)
        for b in args.batches:
            bucket, length = cache_length(cfg, args.prompt_len, args.new_tokens)
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, bucket)).astype(np.int32)
            pad = np.zeros(b, np.int32)
            key = jax.random.key(0)
            tok, _, cache = prefill(params, tokens, pad, knobs, allowed, key, cfg=cfg, length=length,
                                    cache_dtype="bfloat16")
            for warm in (True, False):
                tok.block_until_ready()
                t0 = time.perf_counter()
                for i in range(args.new_tokens - 1):
                    tok, _, cache = decode_step(params, cache, tok, np.int32(bucket + i), pad, knobs, allowed, key,
                                                cfg=cfg)
                tok.block_until_ready()
                step = (time.perf_counter() - t0) / (args.new_tokens - 1)
            kv = 2 * cfg.n_layers * b * (bucket + args.new_tokens / 2) * cfg.n_kv_heads * cfg.head_dim * 2
            util = (weight_bytes + kv) / step / peak if peak else float("nan")
            prompts = [list(r) for r in tokens[:, :args.prompt_len]]
            generate(params, cfg, prompts, Sampling(args.new_tokens))
            t0 = time.perf_counter()
            generate(params, cfg, prompts, Sampling(args.new_tokens))
            gen = b * args.new_tokens / (time.perf_counter() - t0)
            print(f"{name:<8}{b:>6}{param_bytes(params) / 2**30:>7.2f}{b / step:>14,.1f}{step * 1e3:>9.2f}"
                  f"{util:>10.1%}{gen:>16,.1f}", flush=True)
        del params


if __name__ == "__main__":
    main()
