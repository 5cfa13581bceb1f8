"""KV-cache generation against transformers' `generate` (with its cache), same model, same
run, this machine's CPU, float32, greedy: prefill and decode tokens/s and our/their ratio.

    python benchmarks/generate.py [--batches 1 8] [--prompt-len 128] [--new-tokens 128]

The model is a transformers `LlamaForCausalLM` with random weights, saved and loaded by both
sides (dim 512, 8 layers, 8 heads, 2 kv heads, FFN 1536, vocab 32000 by default). Prefill is
the time to the first new token; decode is the rest, per new token. Each figure is the
median of --repeats runs after a warm-up (our compiles are reported apart).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import torch
    import transformers

    from llama3_jax.infer.quant import prepare_params
    from llama3_jax.infer.generate import Sampling, generate, load_for_inference

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d, safe_serialization=True)
        params, cfg, _, mesh = load_for_inference(d, dtype="float32")
    with jax.set_mesh(mesh):
        params = prepare_params(params)
    n_params = sum(p.numel() for p in theirs.parameters())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; float32, greedy")
    print(f"# model: dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, FFN "
          f"{args.ffn}, vocab {args.vocab} ({n_params / 1e6:.1f}M parameters); prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens")
    rows = []
    for b in args.batches:
        prompts = np.random.default_rng(b).integers(0, args.vocab, (b, args.prompt_len))
        ids = torch.tensor(prompts)

        def ours(n):
            return lambda: generate(params, cfg, prompts.tolist(), Sampling(max_new_tokens=n))

        def hf(n):
            def run():
                with torch.inference_mode():
                    theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=0, eos_token_id=None)
            return run

        t0 = time.perf_counter()
        ours(args.new_tokens)()
        compile_s = time.perf_counter() - t0
        hf(args.new_tokens)()
        result = {}
        for side, make in (("ours", ours), ("transformers", hf)):
            first = median_time(make(1), args.repeats)
            whole = median_time(make(args.new_tokens), args.repeats)
            result[side] = (b * args.prompt_len / first, b * (args.new_tokens - 1) / (whole - first))
        rows.append((b, compile_s, result))
    head = (f"{'batch':>5}{'prefill ours':>14}{'theirs':>10}{'ratio':>7}{'decode ours':>13}{'theirs':>10}"
            f"{'ratio':>7}{'our compile s':>15}")
    print("\ntokens/s")
    print(head)
    print("-" * len(head))
    for b, compile_s, r in rows:
        (po, do), (pt, dt) = r["ours"], r["transformers"]
        print(f"{b:>5}{po:>14,.0f}{pt:>10,.0f}{po / pt:>6.2f}x{do:>13,.1f}{dt:>10,.1f}{do / dt:>6.2f}x{compile_s:>15.1f}")


if __name__ == "__main__":
    main()
