"""Generation: `generate(params, cfg, prompts, sampling)` -> token ids and log-probs, and
`load_for_inference` (a run, a converted checkpoint or a Hugging Face/Meta directory,
in a dtype, optionally int8, on a mesh).

Call `generate` under no mesh or pass `mesh=`: the activations, the cache and the batch then
follow the training rule table. Compiles: one prefill per (batch, prompt bucket, cache
length) and one decode step per (batch, cache length); prompts are padded up to a multiple
of `BUCKET` tokens so that prompts of similar length share them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama3_jax.config import ConfigError, ModelConfig
from llama3_jax.infer.decode import decode_step, prefill
from llama3_jax.infer.quant import prepare_params

BUCKET = 64
DTYPES = ("float32", "bfloat16", "float16")
CACHE_DTYPES = DTYPES + ("int8",)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 1.0: off."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: "
                              "need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]      # new tokens of each prompt, its stop token included
    logprobs: list[list[float]]  # the model's log-probability of each of them
    finish: list[str]            # "stop" (a stop token) or "length" (max_new_tokens)


def allowed_ids(vocab_size: int, tokenizer=None, stop_ids=()) -> np.ndarray:
    """Ids sampling may produce: the tokenizer's ordinary tokens and the stop tokens; never
    the other special tokens (reserved ones included) or ids past the tokenizer."""
    allowed = np.ones(vocab_size, bool)
    if tokenizer is not None:
        allowed[tokenizer.n_words:] = False
        for i in tokenizer.special_tokens.values():
            allowed[i] = False
        for i in stop_ids:
            allowed[i] = True
    return allowed


def completion(tok, ids) -> str:
    """The text of generated ids, without the stop token that ended them."""
    return tok.decode([i for i in ids if i not in tok.stop_ids])


def check_cache_dtype(name: str | None) -> None:
    if name is not None and name not in CACHE_DTYPES:
        raise ConfigError(f"KV cache dtype {name!r} unknown; choose one of {', '.join(CACHE_DTYPES)}")


def cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype: str) -> int:
    """Bytes of a KV cache (keys and values, every layer; an int8 cache's scales included)."""
    vectors = 2 * cfg.n_layers * batch * cfg.n_kv_heads * length
    per_vector = cfg.head_dim + 4 if dtype == "int8" else cfg.head_dim * np.dtype(jnp.dtype(dtype)).itemsize
    return vectors * per_vector


def cache_length(cfg: ModelConfig, longest_prompt: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache length), or a ConfigError before anything compiles."""
    need = longest_prompt + max_new_tokens
    if longest_prompt < 1:
        raise ConfigError("every prompt needs at least one token")
    if need > cfg.max_seq_len:
        raise ConfigError(f"a prompt of {longest_prompt} tokens + max_new_tokens {max_new_tokens} = {need} "
                          f"does not fit the cache of model.max_seq_len={cfg.max_seq_len}; shorten the prompt "
                          "or lower max_new_tokens")
    bucket = min(-(-longest_prompt // BUCKET) * BUCKET, cfg.max_seq_len - max_new_tokens)
    return bucket, min(-(-(bucket + max_new_tokens) // BUCKET) * BUCKET, cfg.max_seq_len)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(), *,
             stop_ids=(), allowed=None, mesh=None, cache_dtype: str | None = None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """Continue each prompt (token ids) until one of `stop_ids` or `sampling.max_new_tokens`.

    `allowed`: bool [vocab] of the ids that may be drawn (see `allowed_ids`; default all).
    `on_tokens(tokens [b], live [b])` is called with each step's tokens, for streaming.
    Reproducible for a given seed and batch: each step's keys come from (seed, step).
    `cache_dtype`: the KV cache's (`CACHE_DTYPES`; default the model's compute dtype).
    """
    sampling.check()
    check_cache_dtype(cache_dtype)
    b = len(prompts)
    bucket, length = cache_length(cfg, max(len(p) for p in prompts), sampling.max_new_tokens)
    rows = b
    if mesh is not None:  # the batch is sharded over dp x fsdp: pad it with copies of row 0
        ways = mesh.shape.get("dp", 1) * mesh.shape.get("fsdp", 1)
        rows = -(-b // ways) * ways
    tokens = np.zeros((rows, bucket), np.int32)
    pad = np.zeros(rows, np.int32)
    for i in range(rows):
        p = list(prompts[i if i < b else 0])
        tokens[i, bucket - len(p):] = p
        pad[i] = bucket - len(p)
    allowed = np.ones(cfg.vocab_size, bool) if allowed is None else np.asarray(allowed, bool)
    knobs = (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p))
    base = jax.random.key(sampling.seed)
    cache_dtype = cache_dtype or cfg.compute_dtype
    stops = np.asarray(sorted(set(stop_ids)) or [-1])
    out = [[] for _ in range(b)]
    logps = [[] for _ in range(b)]
    live = np.ones(b, bool)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if "layers" not in params:  # the training layout: prepare_params once yourself to reuse it
            params = prepare_params(params)
        tok, logp, cache = prefill(params, tokens, pad, knobs, allowed, jax.random.fold_in(base, 0),
                                   cfg=cfg, length=length, cache_dtype=cache_dtype)
        for step in range(sampling.max_new_tokens):
            host_tok, host_logp = np.asarray(tok)[:b], np.asarray(logp)[:b]
            if step + 1 < sampling.max_new_tokens and live.any():
                # Dispatch the next step before reading this one's results on the host.
                tok, logp, cache = decode_step(params, cache, tok, np.int32(bucket + step), pad, knobs, allowed,
                                               jax.random.fold_in(base, step + 1), cfg=cfg)
            for i in np.flatnonzero(live):
                out[i].append(int(host_tok[i]))
                logps[i].append(float(host_logp[i]))
            if on_tokens is not None:
                on_tokens(host_tok, live.copy())
            live &= ~np.isin(host_tok, stops)
            if not live.any():
                break
    finish = ["stop" if t and t[-1] in set(stop_ids) else "length" for t in out]
    return Generation(out, logps, finish)


def source_tokenizer(source, src, step: int | None = None, tokenizer=None):
    """`tokenizer` (a tokenizer.model) if given, else the source's own: a run's, a converted
    checkpoint's, or a Hugging Face directory's original/ (Meta's repos ship one); or None."""
    from llama3_jax.formats.bpe import load_tokenizer
    from llama3_jax.formats.run import RunSource, read_config, run_tokenizer
    if tokenizer:
        return load_tokenizer(tokenizer)
    if isinstance(source, RunSource):
        return run_tokenizer(read_config(src, step)[0], src)
    found = [c for c in ("tokenizer.model", "original/tokenizer.model") if (pathlib.Path(src) / c).is_file()]
    return load_tokenizer(pathlib.Path(src) / found[0]) if found else None


def open_inference_source(src, step: int | None = None):
    """The checkpoint source of a run directory (latest or `step`) or any other directory."""
    from llama3_jax.formats.run import RunSource
    from llama3_jax.formats.weights import open_source
    return RunSource(src, step=step) if step is not None else open_source(src)


def load_for_inference(src, *, step: int | None = None, dtype: str = "bfloat16", mesh=None, tokenizer=None):
    """(params in the training layout, model config, tokenizer or None, mesh) from a run
    directory (latest or `step`), a converted checkpoint, or a Hugging Face or Meta
    directory. `mesh`: a Mesh, a mesh name in meshes/ or a .toml path, or None (one device).
    Errors come before any compile. `prepare_params` gives the inference layout (and int8)."""
    from llama3_jax.config import load_mesh
    from llama3_jax.formats.bpe import check_fits
    from llama3_jax.formats.weights import load_params
    from llama3_jax.model import PARAM_AXES, param_shapes
    from llama3_jax.parallel.sharding import make_mesh, param_shardings

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} unknown; choose one of {', '.join(DTYPES)}")
    source = open_inference_source(src, step)
    cfg = dataclasses.replace(source.model, param_dtype=dtype, compute_dtype=dtype, remat="none",
                              attention_impl="xla")
    cfg.validate()
    tok = source_tokenizer(source, src, step, tokenizer)
    if tok is not None:
        check_fits(tok, cfg, ": it belongs to another model; pass the model's own with --tokenizer")
    if isinstance(mesh, str):
        m = load_mesh(mesh)
        mesh = make_mesh(dp=m.dp, fsdp=m.fsdp, pp=m.pp, cp=m.cp, tp=m.tp)
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    if mesh.shape.get("pp", 1) > 1 or mesh.shape.get("cp", 1) > 1:
        raise ConfigError("inference runs on dp, fsdp and tp meshes; this mesh has pp or cp > 1: pick a mesh "
                          "without them (for example --mesh with tp only)")
    return load_params(source, param_shardings(PARAM_AXES, param_shapes(cfg), mesh), dtype), cfg, tok, mesh


def as_dtype(params: dict, dtype: str) -> dict:
    """Parameters cast to `dtype` (for a model trained in another)."""
    return jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
