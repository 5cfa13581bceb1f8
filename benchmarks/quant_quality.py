"""Held-out perplexity of one trained run in float32, bfloat16, float16 and int8 weight-only
(matmul weights; then the embedding/head too), and the parameter memory of each.

    python train.py --out runs/debug                   # the default run, a few minutes on CPU
    python benchmarks/quant_quality.py runs/debug

Held-out text: this repository's own Python files, which the default run (trained on the
standard library) never saw, cut into rows of --seq tokens. Each precision is loaded as
`python -m llama3_jax.generate` loads it (weights and compute in that dtype), and scored
through the inference path (`infer.decode.score`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a train.py run directory")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama3_jax.infer.decode import score
    from llama3_jax.infer.generate import load_for_inference
    from llama3_jax.infer.quant import param_bytes, prepare_params

    variants = [("float32", "float32", None, False), ("bfloat16", "bfloat16", None, False),
                ("float16", "float16", None, False), ("int8 (bf16 compute)", "bfloat16", "int8", False),
                ("int8 + embedding", "bfloat16", "int8", True)]
    text = "\n".join(p.read_text() for p in sorted((REPO / "llama3_jax").rglob("*.py")))
    rows = None
    print(f"{'weights':<22}{'MiB':>9}{'perplexity':>12}{'vs fp32':>10}{'vs bf16':>10}")
    print("-" * 63)
    ppl = {}
    for name, dtype, quantize, embeddings in variants:
        params, cfg, tok, _ = load_for_inference(args.run, dtype=dtype)
        params = prepare_params(params, quantize, embeddings)
        if rows is None:
            ids = np.asarray(tok.encode(text)[:args.rows * args.seq], np.int32)
            rows = ids[:len(ids) // args.seq * args.seq].reshape(-1, args.seq)

        @jax.jit
        def nll(params, tokens):
            logp = jax.nn.log_softmax(score(params, tokens, cfg)[:, :-1], axis=-1)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()

        total = sum(float(nll(params, rows[i:i + 8])) for i in range(0, len(rows), 8))
        ppl[name] = float(np.exp(total / (rows.shape[0] * (rows.shape[1] - 1))))
        print(f"{name:<22}{param_bytes(params) / 2**20:>9.2f}{ppl[name]:>12.4f}"
              f"{ppl[name] / ppl['float32'] - 1:>+10.3%}"
              f"{(ppl[name] / ppl['bfloat16'] - 1) if 'bfloat16' in ppl else float('nan'):>+10.3%}", flush=True)
    print(f"# {args.run}: {rows.shape[0]} held-out rows of {args.seq} tokens ({rows.size:,} tokens)")


if __name__ == "__main__":
    main()
