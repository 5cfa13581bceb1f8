"""`python -m llama3_jax.eval.needle RUN --lengths ...`: a synthetic needle-in-a-haystack
evaluation. Retrieval accuracy by context length and needle depth, with greedy decoding on
the KV-cache generator, as a table, `needle.json` and a heatmap `needle.png`.

    python -m llama3_jax.eval.needle runs/needle --lengths 128,256 --depths 0,0.25,0.5,0.75,1 --trials 10
    python -m llama3_jax.eval.needle HF_DIR --lengths 1024,4096,8192 --dtype bfloat16 --mesh gpu-8-fsdp
    python -m llama3_jax.eval.needle make-data --length 128 --docs 4000 --out needle.jsonl

Each trial hides "The special magic number is 45. Say it again: 45, 45, ..." at a depth of
repetitive filler and ends with "What is the special magic number? The special magic number
is"; it succeeds when the greedy continuation starts with the number (no other digit in the
prompt; see `eval.haystack` for the task and why the needle repeats its value).
A length is the whole context: the prompt, the answer and end-of-text. The trials of a
length are decoded together, in batches of --batch-size.

Output: RUN/eval/needle-step<N>/ for a run (else eval_results/needle-<name>/, or --out).
`make-data` writes the same task, answered, as a JSONL training corpus (field "text"),
documents of exactly --length tokens with BOS and EOS: train on it with
`data.path=FILE.jsonl data.seq_len=LENGTH` (one document per row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import numpy as np

from llama3_jax.config import ConfigError
from llama3_jax.infer.cli import add_source_args
from llama3_jax.eval.haystack import EVAL_STREAM, Task, task_for, trial_rng, write_corpus

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama3_jax.eval.needle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p, dtype="float32")
    p.add_argument("--lengths", required=True, help="context lengths in tokens, comma-separated (e.g. 256,512)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"needle depths in [0, 1] (default {DEFAULT_DEPTHS})")
    p.add_argument("--trials", type=int, default=10, help="trials (numbers) per length and depth")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default: under the run)")
    return p


def build_data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama3_jax.eval.needle make-data",
                                description="Write the needle task as a JSONL training corpus (field \"text\").")
    p.add_argument("--tokenizer", default="default",
                   help="a tokenizer.model, a run or checkpoint directory, or 'default': the project's BPE "
                        "(what the debug configs train with)")
    p.add_argument("--length", type=int, required=True, help="tokens per document, BOS and EOS included "
                   "(= data.seq_len for one document per row)")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, required=True, help="the JSONL file to write")
    return p


# ---------------------------------------------------------------------------- settings

def parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated {kind.__name__}s, e.g. "
                          f"{'256,512' if kind is int else DEFAULT_DEPTHS}") from None
    if not values:
        raise ConfigError(f"{flag} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {text!r} repeats a value; give each once")
    return values


def parse_depths(text: str) -> list[float]:
    depths = parse_list(text, float, "--depths")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"--depths {text!r}: {bad[0]} is outside [0, 1]; depths are fractions of the haystack "
                          "(0 = its start, 1 = just before the question)")
    return depths


def model_and_tokenizer(src: str, step: int | None, tokenizer: str | None):
    """(model config, tokenizer or None) of a source, without reading its weights."""
    from llama3_jax.infer.generate import open_inference_source, source_tokenizer
    source = open_inference_source(src, step)
    return source.model, source_tokenizer(source, src, step, tokenizer)


def data_tokenizer(spec: str):
    """make-data's --tokenizer: 'default', a tokenizer.model file, or a directory that has one."""
    from llama3_jax.formats.bpe import default_tokenizer, load_tokenizer
    if spec == "default":
        return default_tokenizer()
    path = pathlib.Path(spec)
    if path.is_file():
        return load_tokenizer(path)
    if not path.exists():
        raise ConfigError(f"--tokenizer {spec} does not exist; give a tokenizer.model, a run directory or 'default'")
    _, tok = model_and_tokenizer(spec, None, None)
    if tok is None:
        raise ConfigError(f"{spec} comes with no tokenizer; give --tokenizer PATH/tokenizer.model")
    return tok


def run_step(src: str, step: int | None) -> int | None:
    """The checkpoint step a run directory is evaluated at (None for other sources)."""
    from llama3_jax.formats.run import read_config
    path = pathlib.Path(src)
    return read_config(path, step)[1] if (path / "checkpoints").is_dir() else step


def default_out(src: str, step: int | None) -> pathlib.Path:
    path = pathlib.Path(src)
    if (path / "checkpoints").is_dir():
        return path / "eval" / f"needle-step{run_step(src, step)}"
    return pathlib.Path("eval_results") / f"needle-{path.resolve().name}"


# ---------------------------------------------------------------------------- evaluation

def correct(completion: str, value: str) -> bool:
    """The continuation starts with the number (and does not go on with more digits)."""
    text = completion.lstrip()
    return text.startswith(value) and not text[len(value):len(value) + 1].isdigit()


def evaluate(params, cfg, tok, lengths, depths, trials: int, *, seed: int = 0, batch_size: int = 64,
             mesh=None, log=print) -> dict:
    """{"cells": [{length, depth, accuracy, trials: [...]}], "by_length": {length: mean}}:
    `trials` prompts per (length, depth), decoded greedily, those of a length together."""
    import jax

    from llama3_jax.infer.generate import Sampling, allowed_ids, completion, generate
    from llama3_jax.infer.quant import prepare_params
    task = task_for(tok)
    stops = sorted(tok.stop_ids)
    allowed = allowed_ids(cfg.vocab_size, tok, stops)
    if "layers" not in params:
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            params = prepare_params(params)
    sampling = Sampling(max_new_tokens=task.answer_tokens + 1, temperature=0.0)
    cells, by_length = [], {}
    for length in lengths:
        runs = [(d, i, task.trial(length, depth, trial_rng(seed, EVAL_STREAM, length, d, i)))
                for d, depth in enumerate(depths) for i in range(trials)]
        results = []
        rows = min(batch_size, len(runs))
        for k in range(0, len(runs), rows):
            prompts = [t.prompt for _, _, t in runs[k:k + rows]]
            n = len(prompts)  # a short last batch is filled with copies: one compile per length
            g = generate(params, cfg, prompts + prompts[:1] * (rows - n), sampling, stop_ids=stops, allowed=allowed,
                         mesh=mesh)
            results += [completion(tok, ids) for ids in g.tokens[:n]]
        for d, depth in enumerate(depths):
            rows = [{"value": t.value, "completion": c, "correct": correct(c, t.value),
                     "needle_token": t.needle[0], "actual_depth": round(t.actual_depth, 4)}
                    for (dd, _, t), c in zip(runs, results) if dd == d]
            cells.append({"length": length, "depth": depth, "prompt_tokens": len(runs[0][2].prompt),
                          "accuracy": float(np.mean([r["correct"] for r in rows])), "trials": rows})
        by_length[length] = float(np.mean([c["accuracy"] for c in cells if c["length"] == length]))
        log(f"length {length}: {by_length[length]:.0%}")
    return {"cells": cells, "by_length": by_length, "mean": float(np.mean(list(by_length.values())))}


def table(results: dict, lengths, depths) -> str:
    """Rows: depths; columns: lengths; a last row of each length's mean."""
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]}
    w = max(7, *(len(str(n)) + 1 for n in lengths))
    lines = ["depth \\ length" + "".join(f"{n:>{w}}" for n in lengths)]
    lines += [f"{d:<14g}" + "".join(f"{acc[n, d]:>{w}.0%}" for n in lengths) for d in depths]
    lines.append(f"{'mean':<14}" + "".join(f"{results['by_length'][n]:>{w}.0%}" for n in lengths))
    return "\n".join(lines)


def heatmap(results: dict, lengths, depths, path: pathlib.Path, title: str) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]}
    grid = np.array([[acc[n, d] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.4 + 0.55 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- commands

def make_data(argv) -> int:
    args = build_data_parser().parse_args(argv)
    try:
        path = write_corpus(data_tokenizer(args.tokenizer), args.length, args.docs, args.out, seed=args.seed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.docs} documents of {args.length} tokens -> {path}\n"
          f"train on them with: data.path={path} data.seq_len={args.length}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["make-data"]:
        return make_data(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        lengths = parse_list(args.lengths, int, "--lengths")
        depths = parse_depths(args.depths)
        if args.trials < 1 or args.batch_size < 1:
            raise ConfigError(f"--trials {args.trials} and --batch-size {args.batch_size} must be at least 1")
        model, tok = model_and_tokenizer(args.src, args.step, args.tokenizer)  # no weights read yet
        if tok is None:
            raise ConfigError(f"{args.src} comes with no tokenizer; pass --tokenizer PATH/tokenizer.model")
        task: Task = task_for(tok)
        for n in lengths:
            task.check_length(n, model.max_seq_len, what="--lengths")
        out = args.out or default_out(args.src, args.step)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder")
        from llama3_jax.infer.generate import load_for_inference
        params, cfg, tok, mesh = load_for_inference(args.src, step=args.step, dtype=args.dtype, mesh=args.mesh,
                                                    tokenizer=args.tokenizer)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.src}: {len(lengths)} length(s) x {len(depths)} depth(s) x {args.trials} trial(s), "
          f"{args.dtype}, greedy", file=sys.stderr)
    results = evaluate(params, cfg, tok, lengths, depths, args.trials, seed=args.seed, batch_size=args.batch_size,
                       mesh=mesh, log=lambda line: print(f"# {line}", file=sys.stderr))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"src": str(args.src), "step": run_step(args.src, args.step), "lengths": lengths, "depths": depths,
                "trials": args.trials, "seed": args.seed, "dtype": args.dtype, "answer_tokens": task.answer_tokens,
                "values": len(task.values)}
    (out / "needle.json").write_text(json.dumps({"settings": settings, **results,
                                                 "by_length": {str(k): v for k, v in results["by_length"].items()}},
                                                indent=1) + "\n")
    name = pathlib.Path(args.src).resolve().name + (f", step {settings['step']}" if settings["step"] else "")
    heatmap(results, lengths, depths, out / "needle.png", f"needle in a haystack: {name}")
    print(table(results, lengths, depths))
    print(f"results: {out / 'needle.json'}\nheatmap: {out / 'needle.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
