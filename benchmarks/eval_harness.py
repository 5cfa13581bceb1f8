"""lm-evaluation-harness throughput: our adapter (`llama3_jax.eval.harness.JaxLM`) against
lm-eval's own `hf` model, same weights, same requests, same run, this machine, float32.

    python benchmarks/eval_harness.py [--requests 128] [--batch-size 16] [--dim 512 --layers 8]

The model is a transformers `LlamaForCausalLM` with random weights and the project's BPE
tokenizer, saved once and loaded by both sides. The requests are multiple-choice style
log-likelihoods: contexts of 64-384 tokens cut from standard-library sources, continuations
of 2-16 tokens. Each side scores them once to warm up (our compiles happen there), then
--repeats times; the table gives the median requests/s, the ratio, and the largest
difference between the two sides' log-likelihoods.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def requests_of(n: int, tok, seed: int = 0):
    """n (context, continuation) string pairs from stdlib sources, in a seeded order; a
    continuation always adds tokens to its context (lm-eval's hf model asserts that)."""
    import random
    rng = random.Random(seed)
    text = "".join(p.read_text(errors="replace") for p in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"])
                                                                   .glob("*.py"))[:40])
    pairs = []
    while len(pairs) < n:
        start = rng.randrange(0, len(text) - 3000)
        ctx_chars, cont_chars = rng.randint(200, 1200), rng.randint(5, 50)
        context, continuation = text[start:start + ctx_chars], text[start + ctx_chars:start + ctx_chars + cont_chars]
        stripped = context.rstrip()
        if stripped and len(tok.encode(context + continuation)) > len(tok.encode(stripped)):
            pairs.append((context, continuation))
    return pairs


def timed(fn, repeats: int) -> tuple[float, list]:
    out = fn()  # warm-up: compiles, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import jax
    import numpy as np
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llama3_jax.eval.harness import JaxLM
    from llama3_jax.formats.bpe import default_tokenizer, write_hf_tokenizer
    from llama3_jax.infer.generate import load_for_inference

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 as torch computes it
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    tok = default_tokenizer()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tok.n_words, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests_of(args.requests, tok))]
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        write_hf_tokenizer(tok.path, pathlib.Path(d), model_max_length=1024)
        params, cfg, tok, mesh = load_for_inference(d, dtype="float32")
        ours = JaxLM(params, cfg, tok, mesh=mesh, batch_size=args.batch_size)
        theirs = HFLM(pretrained=d, dtype="float32", batch_size=args.batch_size, device="cpu")
    t0 = time.perf_counter()
    ours.loglikelihood(instances, disable_tqdm=True)
    warm = time.perf_counter() - t0
    our_s, our_ll = timed(lambda: ours.loglikelihood(instances, disable_tqdm=True), args.repeats)
    their_s, their_ll = timed(lambda: theirs.loglikelihood(instances, disable_tqdm=True), args.repeats)
    diff = float(np.max(np.abs(np.array([x[0] for x in our_ll]) - np.array([x[0] for x in their_ll]))))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; float32")
    print(f"# model: dim {args.dim}, {args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, FFN "
          f"{args.ffn}, vocab {tok.n_words} ({n_params / 1e6:.1f}M parameters); {args.requests} loglikelihood "
          f"requests, batch {args.batch_size}; median of {args.repeats} after a warm-up")
    head = f"{'model':<28}{'requests/s':>12}{'s per pass':>12}"
    print(head)
    print("-" * len(head))
    print(f"{'llama3_jax JaxLM':<28}{args.requests / our_s:>12.1f}{our_s:>12.2f}")
    print(f"{'lm-eval hf (transformers)':<28}{args.requests / their_s:>12.1f}{their_s:>12.2f}")
    print(f"ours/theirs: {their_s / our_s:.2f}x; our first pass (compiles included): {warm:.1f} s; "
          f"max |log-likelihood difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
