"""`python -m llama3_jax.generate SRC` (`llama3-generate`): text from a run, a converted
checkpoint, or a Hugging Face or Meta directory.

    python -m llama3_jax.generate runs/debug --prompt "def fib(n):" --max-new-tokens 64
    python -m llama3_jax.generate HF_DIR --chat --system "You are terse." --dtype bfloat16 --quantize int8
    python -m llama3_jax.generate runs/debug --prompts-file prompts.jsonl --out completions.jsonl

Text streams to the terminal as it is produced. A prompts file has one JSON object per line
with "prompt": a string, or a list of {role, content} messages (formatted with the Llama 3
chat template); each output line repeats the input row and adds "completion", "tokens",
"logprobs" and "finish".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from llama3_jax.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama3_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p, dtype="bfloat16")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    what.add_argument("--prompts-file", type=pathlib.Path, help="JSONL of prompts; completions go to --out")
    what.add_argument("--chat", action="store_true", help="an interactive chat (Llama 3 chat format)")
    p.add_argument("--system", default=None, help="the system message of --chat or of message prompts")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSONL of completions (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch for --prompts-file")
    p.add_argument("--quantize", default=None, help="int8: weight-only int8, per output channel")
    p.add_argument("--quantize-embeddings", action="store_true", help="with --quantize: the embedding/head too")
    p.add_argument("--kv-cache", default=None, help="the KV cache's dtype: float32 | bfloat16 | float16 | int8 "
                   "(one float32 scale per key/value vector; default: --dtype)")
    return p


def add_source_args(p: argparse.ArgumentParser, dtype: str) -> None:
    """SRC, --step, --dtype, --mesh and --tokenizer: what `load_for_inference` takes."""
    p.add_argument("src", help="a train.py run directory, a converted checkpoint, or a Hugging Face/Meta directory")
    p.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: the latest)")
    p.add_argument("--dtype", default=dtype, help=f"float32 | bfloat16 | float16 (default {dtype})")
    p.add_argument("--mesh", default=None, help="mesh name in meshes/ or a .toml path (dp, fsdp, tp)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the checkpoint's)")


class Stream:
    """Prints one row's new text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tok, file=sys.stdout):
        self.tok, self.file, self.ids, self.shown = tok, file, [], 0

    def __call__(self, tokens, live):
        if not live[0] or tokens[0] in self.tok.stop_ids:
            return
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True, file=self.file)
            self.shown = len(text)


def read_prompts(path: pathlib.Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
            raise ConfigError(f'{path}:{n}: needs "prompt": a string or a list of messages')
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} has no prompts")
    return rows


def encode(tok, prompt, system=None) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt, bos=True)
    messages = ([{"role": "system", "content": system}] if system else []) + list(prompt)
    try:
        return tok.encode_dialog(messages)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"bad messages ({e}): each needs a role (system, user, assistant, ipython) "
                          "and string content") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from llama3_jax.infer.generate import (Sampling, allowed_ids, cache_bytes, cache_length, check_cache_dtype,
                                           completion, generate, load_for_inference)
    from llama3_jax.infer.quant import param_bytes, prepare_params

    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        sampling.check()
        if args.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize {args.quantize!r} unknown; the one quantization is int8")
        check_cache_dtype(args.kv_cache)
        params, cfg, tok, mesh = load_for_inference(args.src, step=args.step, dtype=args.dtype, mesh=args.mesh,
                                                    tokenizer=args.tokenizer)
        if tok is None:
            raise ConfigError(f"{args.src} comes with no tokenizer; pass --tokenizer PATH/tokenizer.model")
        with jax.set_mesh(mesh):  # once, rather than in every generate call
            params = prepare_params(params, args.quantize, args.quantize_embeddings)
        print(f"# {args.src}: {cfg.n_layers} layers, dim {cfg.dim}, {args.dtype}"
              f"{' + int8 weights' if args.quantize else ''}: {param_bytes(params) / 2**20:,.1f} MiB of parameters"
              f" on {mesh.devices.size} device(s)", file=sys.stderr)
        kv = args.kv_cache or args.dtype
        print(f"# KV cache: {kv}, {cache_bytes(cfg, 1, cfg.max_seq_len, kv) / 2**20:,.1f} MiB per sequence of "
              f"model.max_seq_len={cfg.max_seq_len} tokens", file=sys.stderr)
        stops = sorted(tok.stop_ids)
        allowed = allowed_ids(cfg.vocab_size, tok, stops)
        run = dict(stop_ids=stops, allowed=allowed, mesh=mesh, cache_dtype=args.kv_cache)

        if args.prompts_file:
            rows = read_prompts(args.prompts_file)
            ids = [encode(tok, r["prompt"], args.system) for r in rows]
            cache_length(cfg, max(map(len, ids)), sampling.max_new_tokens)  # fail before compiling
            out = open(args.out, "w") if args.out else sys.stdout
            for i in range(0, len(rows), args.batch_size):
                g = generate(params, cfg, ids[i:i + args.batch_size], sampling, **run)
                for row, t, lp, fin in zip(rows[i:i + args.batch_size], g.tokens, g.logprobs, g.finish):
                    out.write(json.dumps({**row, "completion": completion(tok, t), "tokens": t, "logprobs": lp,
                                          "finish": fin}) + "\n")
                out.flush()
            if args.out:
                out.close()
                print(f"# {len(rows)} completions -> {args.out}", file=sys.stderr)
            return 0

        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            print("# chat: an empty line or Ctrl-D ends it", file=sys.stderr)
            while True:
                try:
                    line = input("you> ")
                except EOFError:
                    break
                if not line.strip():
                    break
                messages.append({"role": "user", "content": line})
                print("assistant> ", end="", flush=True)
                g = generate(params, cfg, [tok.encode_dialog(messages)], sampling, on_tokens=Stream(tok), **run)
                print()
                messages.append({"role": "assistant", "content": completion(tok, g.tokens[0])})
            return 0

        prompts = args.prompt or [""]
        ids = [tok.encode(p, bos=True) for p in prompts]
        cache_length(cfg, max(map(len, ids)), sampling.max_new_tokens)  # fail before compiling
        if len(ids) == 1:
            print(prompts[0], end="", flush=True)
            generate(params, cfg, ids, sampling, on_tokens=Stream(tok), **run)
            print()
        else:
            g = generate(params, cfg, ids, sampling, **run)
            for p, t in zip(prompts, g.tokens):
                print(p + completion(tok, t))
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
