"""lm-evaluation-harness on our model, with no export: `JaxLM` is an `lm_eval` LM.

- `loglikelihood` (lm_eval's TemplateLM: the context/continuation split of its `hf` model)
  and `loglikelihood_rolling` score right-padded batches in one jitted, sharded forward per
  length bucket (rows sorted by length, so a batch pads little).
- `generate_until` decodes with the KV-cache generator (`infer.generate`), greedy unless the
  task asks to sample, and cuts the text at the task's stop strings.
- `run_tasks` runs named tasks (lm-eval's registry, or YAML tasks in `include_path`) through
  `lm_eval.simple_evaluate`; `Benchmark` does it inside a training run.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama3_jax.config import ConfigError, ModelConfig
from llama3_jax.infer.generate import Sampling, allowed_ids, generate
from llama3_jax.infer.quant import prepare_params
from llama3_jax.model.model import hidden_states, output_logits
from llama3_jax.parallel import sharding as shd

BUCKET = 64  # padded lengths are multiples of this (powers of two above 512): few compiles


def _bucket(n: int, cap: int) -> int:
    size = -(-n // BUCKET) * BUCKET if n <= 512 else 1 << (n - 1).bit_length()
    return min(size, cap)


def _score(params, tokens, targets, valid, scored, cfg: ModelConfig):
    """Per row: the summed log-probability of the scored targets, and whether each of them
    is the model's argmax (float32 softmax)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    h = hidden_states(params, tokens, valid.astype(jnp.int32), positions, cfg)
    logits = output_logits(h, params, cfg).astype(jnp.float32)
    # The target's logit by comparison with an iota, so vocab-sharded logits stay put.
    picked = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None], logits, 0.0),
                     axis=-1)
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(logp * scored, axis=1), jnp.all(greedy | (scored == 0), axis=1)


class JaxLM(TemplateLM):
    """An lm_eval model backed by llama3_jax parameters (the training layout) on `mesh`."""

    def __init__(self, params, cfg: ModelConfig, tokenizer, *, mesh, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = 256):
        super().__init__()
        ways = mesh.shape.get("dp", 1) * mesh.shape.get("fsdp", 1)
        if batch_size < 1 or batch_size % ways:
            raise ConfigError(f"--batch-size {batch_size} must be a positive multiple of dp x fsdp = {ways}")
        if mesh.shape.get("pp", 1) > 1 or mesh.shape.get("cp", 1) > 1:
            raise ConfigError("evaluation runs on dp, fsdp and tp meshes; pick a mesh without pp or cp")
        self.params, self.cfg, self.tok, self.mesh = params, cfg, tokenizer, mesh
        self.batch_size, self._max_length = batch_size, min(max_length or cfg.max_seq_len, cfg.max_seq_len)
        self.max_gen_toks, self._prepared = max_gen_toks, None
        rows = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), (0, 0), mesh))
        self._scorer = jax.jit(lambda p, *a: _score(p, *a, cfg=cfg), in_shardings=(None, rows, rows, rows, rows),
                               out_shardings=shd.replicated(mesh))

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As Hugging Face's Llama 3 tokenizer: <|begin_of_text|> first unless the text has it
        (or add_special_tokens is False)."""
        bos_text = self.tok.decode([self.tok.bos_id])
        bos = add_special_tokens if add_special_tokens is not None else not string.startswith(bos_text)
        return self.tok.encode(string, bos=bos, allowed_special="all")

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) of (strings, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = _bucket(len(rows[chunk[0]][0]), self.max_length)
            arrays = np.zeros((4, self.batch_size, length), np.int32)  # tokens, targets, valid, scored
            for r, i in enumerate(chunk):
                inp, tgt, n_cont = rows[i]
                arrays[0, r, :len(inp)], arrays[1, r, :len(tgt)] = inp, tgt
                arrays[2, r, :len(inp)] = 1
                arrays[3, r, len(inp) - n_cont:len(inp)] = 1
            with jax.set_mesh(self.mesh):
                logp, greedy = jax.device_get(self._scorer(self.params, *arrays))
            for r, i in enumerate(chunk):
                out[i] = (float(logp[r]), bool(greedy[r]))
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts in windows of max_length, every token predicted once,
        the first from <|begin_of_text|> (the text itself is encoded without it)."""
        windows, owners = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, scores):
            totals[k] += logp
        return totals

    # ------------------------------------------------------------------ generation

    def _inference_params(self):
        """The generator's layout of the parameters, made once."""
        if self._prepared is None:
            with jax.set_mesh(self.mesh):
                self._prepared = prepare_params(self.params)
        return self._prepared

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        stops = sorted(self.tok.stop_ids)
        allowed = allowed_ids(self.cfg.vocab_size, self.tok, stops)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            sampling = Sampling(new, temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0)),
                                top_k=int(kwargs.pop("top_k", 0) or 0), seed=int(kwargs.pop("seed", 0) or 0))
            keep = self.max_length - new
            if keep < 1:
                raise ConfigError(f"max_gen_toks={new} leaves no room for the prompt in max_length={self.max_length}")
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in chunk]
                gen = generate(self._inference_params(), self.cfg, prompts, sampling, stop_ids=stops,
                               allowed=allowed, mesh=self.mesh)
                for i, ids in zip(chunk, gen.tokens):
                    text = self.tok.decode([t for t in ids if t not in self.tok.stop_ids])
                    for s in until:
                        if s and s in text:
                            text = text[:text.index(s)]
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out


# ---------------------------------------------------------------------- running tasks

@functools.cache
def _manager(include_path: str | None):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path)  # indexes lm-eval's ~15k task YAMLs: seconds


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's TaskManager with our include path; an unknown task is a ConfigError."""
    if include_path and not pathlib.Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder of lm-eval task YAMLs")
    manager = _manager(str(pathlib.Path(include_path).resolve()) if include_path else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown) or '(none given)'}: give registered names "
                          "(`lm-eval ls tasks` lists them) or YAML tasks in a folder passed as --include-path")
    return manager


def run_tasks(lm: JaxLM, tasks: list[str], manager, *, limit: int | None = None, num_fewshot: int | None = None,
              bootstrap_iters: int = 100000, log_samples: bool = False, seed: int = 0) -> dict:
    """`lm_eval.simple_evaluate` on our model; its results dict."""
    import lm_eval
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                                   num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                   log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                   fewshot_random_seed=seed)


def flat_scores(results: dict) -> dict[str, float]:
    """{"task/metric": value} of the metrics ("metric,filter" keys) in lm_eval's results, stderrs left out."""
    return {f"{task}/{name.split(',')[0]}": float(v) for task, metrics in results["results"].items()
            for name, v in metrics.items()
            if "," in name and "stderr" not in name and isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_results(results: dict, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples", "config")
            if k in results}
    if "samples" in results:
        keep["samples"] = results["samples"]
    path.write_text(json.dumps(keep, indent=1, default=str))
    return path


class Benchmark:
    """train.benchmark_tasks on the training parameters, inside train.py: tasks are checked
    when the run starts; results go to metrics.jsonl and RUN/eval/benchmark-step<N>.json."""

    def __init__(self, cfg, tokenizer, mesh, out):
        self.tasks = [t.strip() for t in cfg.train.benchmark_tasks.split(",") if t.strip()]
        self.manager = task_manager(self.tasks, cfg.train.benchmark_include)
        if mesh.shape.get("pp", 1) > 1 or mesh.shape.get("cp", 1) > 1:
            raise ConfigError("train.benchmark_every runs lm-eval on the training mesh, which must have no pp or cp")
        self.cfg, self.tok, self.mesh, self.out = cfg, tokenizer, mesh, pathlib.Path(out)

    def __call__(self, params, step: int, log=print) -> dict[str, float]:
        from lm_eval.utils import make_table
        ways = self.mesh.shape.get("dp", 1) * self.mesh.shape.get("fsdp", 1)
        lm = JaxLM(params, self.cfg.model, self.tok, mesh=self.mesh, batch_size=max(16 // ways, 1) * ways)
        results = run_tasks(lm, self.tasks, self.manager, limit=self.cfg.train.benchmark_limit, bootstrap_iters=0,
                            seed=self.cfg.train.seed)
        if jax.process_index() == 0:
            save_results(results, self.out / "eval" / f"benchmark-step{step}.json")
            log(make_table(results))
        return {f"benchmark/{k}": v for k, v in flat_scores(results).items()}
