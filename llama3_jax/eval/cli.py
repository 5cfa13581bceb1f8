"""`python -m llama3_jax.evaluate SRC --tasks ...` (`llama3-evaluate`): lm-evaluation-harness
tasks on a run, a converted checkpoint, or a Hugging Face or Meta directory, in JAX.

    python -m llama3_jax.evaluate runs/debug --tasks my_task --include-path tasks/ --limit 100
    python -m llama3_jax.evaluate HF_DIR --tasks hellaswag,arc_easy,mmlu,gsm8k --mesh gpu-8-tp --dtype bfloat16

Progress bars while it runs, lm-eval's results table at the end; the results (and with
--log-samples every request's scores) go to JSON: RUN/eval/results-step<N>.json for a run,
else --output.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from llama3_jax.config import ConfigError
from llama3_jax.infer.cli import add_source_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llama3_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p, dtype="float32")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    p.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs (local tasks)")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (a multiple of dp x fsdp)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: model.max_seq_len)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generate_until's default new-token limit")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's bootstrap for stderrs (0 = off)")
    p.add_argument("--log-samples", action="store_true", help="keep every request's inputs and scores in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=pathlib.Path, default=None, help="results JSON (default: under the run)")
    return p


def require_lm_eval() -> None:
    """A one-line error, not a traceback, when the optional lm-eval is missing."""
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'llama3_jax[eval]' (or lm-eval)")


def default_output(src: str, step: int | None) -> pathlib.Path:
    from llama3_jax.formats.run import RunSource
    path = pathlib.Path(src)
    if (path / "checkpoints").is_dir():
        return path / "eval" / f"results-step{RunSource(path, step=step).step}.json"
    return pathlib.Path("eval_results") / f"{path.resolve().name}.json"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        require_lm_eval()
        from llama3_jax.eval.harness import JaxLM, run_tasks, save_results, task_manager
        manager = task_manager(tasks, args.include_path)  # an unknown task fails before any weights load
        from llama3_jax.infer.generate import load_for_inference
        params, cfg, tok, mesh = load_for_inference(args.src, step=args.step, dtype=args.dtype, mesh=args.mesh,
                                                    tokenizer=args.tokenizer)
        if tok is None:
            raise ConfigError(f"{args.src} comes with no tokenizer; pass --tokenizer PATH/tokenizer.model")
        output = args.output or default_output(args.src, args.step)
        lm = JaxLM(params, cfg, tok, mesh=mesh, batch_size=args.batch_size, max_length=args.max_length,
                   max_gen_toks=args.max_gen_toks)
        results = run_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, seed=args.seed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table
    print(make_table(results))
    print(f"results: {save_results(results, output)}")
    return 0
