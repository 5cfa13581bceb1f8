"""Meta's Llama 3 layout: params.json and consolidated.NN.pth model-parallel shards, read
(`MetaSource`, shards merged) and written (`write_meta`) tensor by tensor.

Meta's model-parallel shards split wq, wk, wv, w1, w3, output and tok_embeddings on dim 0 and
wo, w2 on dim 1; norms are replicated. With more shards than kv heads (--shards 16 for 8 kv
heads), each kv head is repeated on shards // n_kv_heads consecutive shards and params.json
says n_kv_heads = shards, as in Meta's Llama 3.1 405B "MP16" release: Meta's code gives every
shard one kv head, and the model computes exactly the same function. from-meta reads such
directories back as they are (n_kv_heads = shards); when params.json states fewer kv heads than
the shards hold, the repeated heads are checked to be identical and collapsed.

Meta's params.json has no RoPE scaling factor: `use_scaled_rope: true` means factor 8 in Meta's
code, but Llama 3.2 1B and 3B were trained with 32. from-meta therefore uses 32 when the shapes
are those of 3.2 1B / 3B and 8 otherwise, and --rope-scaling-factor overrides both. to-meta adds
`rope_scaling_factor` (and `rope_low_freq_factor`, `rope_high_freq_factor`,
`rope_original_max_position`) to params.json only when they differ from what from-meta would
assume, so exports of the released shapes keep Meta's exact key set.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import pathlib
import re
import shutil

import numpy as np

from llama3_jax.config import ConfigError, ModelConfig, dtype_of, load_config
from llama3_jax.formats.bpe import check_tokenizer_fits, is_tiktoken_file, load_tokenizer
from llama3_jax.formats.source import (REMAP_BYTES, Source, from_torch_layout, kind_hint, need_dir, new_output,
                                       tensor_names, to_torch_layout, torch_shape, torch_to_numpy)
from llama3_jax.model import param_shapes

META_NAMES = {
    "embed": "tok_embeddings.weight",
    "attention_norm": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "norm": "norm.weight",
    "output": "output.weight",
}
# Meta's model-parallel split dimension of each of our parameters (None: replicated).
META_SPLIT_DIM = {"embed": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                  "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None, "norm": None}
# Meta's hard-coded llama3 RoPE scaling constants (besides the factor).
META_ROPE = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_position": 8192}


def meta_rope_defaults(dims: dict) -> dict:
    """The llama3 RoPE settings from-meta assumes for a model of these shapes (see module doc)."""
    factor = 8.0
    for preset in ("llama3.2-1b", "llama3.2-3b"):
        p = load_config(preset).model
        if all(dims.get(k) == getattr(p, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")):
            factor = p.rope_scaling_factor
    return {"rope_scaling_factor": factor, **META_ROPE}


class MetaSource(Source):
    """A Meta directory: params.json + consolidated.NN.pth model-parallel shards (merged here)."""

    def __init__(self, path, rope_scaling_factor: float | None = None, log=print):
        path = need_dir(path)
        self.path = path
        pfile = path / "params.json"
        files = sorted(path.glob("consolidated.*.pth"))
        if not pfile.exists() or not files:
            what = "params.json" if not pfile.exists() else "consolidated.*.pth files"
            raise ConfigError(f"{path} has no {what}: it is {kind_hint(path)}, not a Meta Llama checkpoint")
        idx = []
        for f in files:
            m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
            if not m:
                raise ConfigError(f"{f}: unexpected shard name (expected consolidated.NN.pth)")
            idx.append(int(m.group(1)))
        if sorted(idx) != list(range(len(idx))):
            gaps = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ConfigError(f"{path}: missing shard(s) {', '.join(f'consolidated.{i:02d}.pth' for i in gaps)} "
                              f"(found {len(idx)} of at least {max(idx) + 1})")
        self.files = [f for _, f in sorted(zip(idx, files))]
        try:
            params = json.loads(pfile.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{pfile} is not valid JSON: {e}") from None
        need = ("dim", "n_layers", "n_heads")
        if any(k not in params for k in need):
            raise ConfigError(f"{pfile} lacks {[k for k in need if k not in params]}; not a Llama params.json")
        self.params = params
        shards = self._load()
        first = shards[0]
        n = len(shards)
        emb = META_NAMES["embed"]
        if emb not in first:
            raise ConfigError(f"{self.files[0]} has no {emb}; not a Llama checkpoint")
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            vocab = first[emb].shape[0] * n
        dims = dict(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                    n_kv_heads=params.get("n_kv_heads") or params["n_heads"], vocab_size=vocab)
        defaults = meta_rope_defaults(dims)
        rope = {}
        if params.get("use_scaled_rope") or rope_scaling_factor is not None:
            rope = {k: params.get(k, v) for k, v in defaults.items()}
            if rope_scaling_factor is not None:
                rope["rope_scaling_factor"] = float(rope_scaling_factor)
                if not params.get("use_scaled_rope"):
                    log(f"note: params.json has no use_scaled_rope; scaling RoPE by {rope_scaling_factor} as asked")
            elif "rope_scaling_factor" not in params and defaults["rope_scaling_factor"] != 8.0:
                log(f"note: use_scaled_rope with the shapes of Llama 3.2 1B/3B: using factor "
                    f"{defaults['rope_scaling_factor']:g} (Meta's code says 8; override with --rope-scaling-factor)")
        kv_stored = dims["n_kv_heads"]
        hd = dims["dim"] // dims["n_heads"]
        wk0 = first.get(META_NAMES["wk"].format(i=0))
        if wk0 is not None and wk0.shape[0] * n != kv_stored * hd and wk0.shape[0] == hd and n % kv_stored == 0:
            self.kv_repeat = n // kv_stored  # one (repeated) kv head per shard; params.json gives the true count
        else:
            self.kv_repeat = 1
        self.n_shards = n
        try:
            self.model = ModelConfig(
                **dims, multiple_of=params.get("multiple_of", 256),
                ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                max_seq_len=131072 if rope else 8192,
                **({} if not rope else {k: (int(v) if k == "rope_original_max_position" else float(v))
                                        for k, v in rope.items()}))
            self.model.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{pfile}: {e}") from None
        out_key = META_NAMES["output"]
        tied = out_key not in first
        if not tied:
            tied = (first[out_key].shape == first[emb].shape
                    and all(np.array_equal(torch_to_numpy(s[out_key]), torch_to_numpy(s[emb])) for s in shards))
        self.model = dataclasses.replace(self.model, tie_embeddings=tied)
        self._validate(shards)
        del shards

    def _load(self) -> list[dict]:
        import torch
        out = []
        for f in self.files:
            try:
                out.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise ConfigError(f"{f}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
        return out

    def _validate(self, shards):
        cfg = self.model
        for name, _, key in tensor_names(cfg, META_NAMES):
            missing = [str(f.name) for f, s in zip(self.files, shards) if key not in s]
            if missing:
                raise ConfigError(f"{self.path}: tensor {key} is missing from {missing}; "
                                  "the shards are incomplete or params.json does not match them")
            shapes = [tuple(s[key].shape) for s in shards]
            if len(set(shapes)) != 1:
                raise ConfigError(f"{self.path}: shards disagree on the shape of {key}: {shapes}")
            dim, want = META_SPLIT_DIM[name], torch_shape(name, cfg)
            got = list(shapes[0])
            if dim is not None:
                reps = self.kv_repeat if name in ("wk", "wv") else 1
                got[dim] = got[dim] * len(shards) // reps
            if tuple(got) != want:
                raise ConfigError(f"{self.path}: {key} merged from {len(shards)} shard(s) has shape {tuple(got)} "
                                  f"but params.json implies {want}; params.json does not match the weights "
                                  "(or shards are missing)")

    def _merged(self, shards, name: str, key: str) -> np.ndarray:
        parts = [torch_to_numpy(s[key]) for s in shards]
        dim = META_SPLIT_DIM[name]
        if dim is None:
            if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
                raise ConfigError(f"{self.path}: replicated tensor {key} differs between shards")
            return parts[0]
        if name in ("wk", "wv") and self.kv_repeat > 1:
            r = self.kv_repeat
            for g in range(0, len(parts), r):
                if any(not np.array_equal(parts[g], parts[g + j]) for j in range(1, r)):
                    raise ConfigError(f"{self.path}: {key}: shards {g}..{g + r - 1} should hold the same "
                                      "repeated kv head but differ")
            parts = parts[::r]
        return np.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]

    _shards: list | None = None
    _mapped = 0

    def _tensor(self, name: str, key: str) -> np.ndarray:
        if self._shards is None:
            self._shards = self._load()
        w = self._merged(self._shards, name, key)
        self._mapped += w.nbytes
        if self._mapped > REMAP_BYTES:  # re-map later: the pages read so far leave the process
            self._shards, self._mapped = None, 0
        return w

    def layer(self, name, i):
        return from_torch_layout(name, self._tensor(name, META_NAMES[name].format(i=i)), self.model)

    def whole(self, name):
        return from_torch_layout(name, self._tensor(name, META_NAMES[name]), self.model)

    def tokenizer_file(self) -> pathlib.Path | None:
        f = self.path / "tokenizer.model"
        return f if f.is_file() and is_tiktoken_file(f) else None

    def special_ids(self) -> tuple:
        f = self.tokenizer_file()
        if f is not None:
            tok = load_tokenizer(f)
            return tok.bos_id, tok.eos_id
        return (128000, 128001) if self.model.vocab_size >= 128256 else (None, None)


# ---------------------------------------------------------------- writing

def meta_ffn_params(cfg: ModelConfig) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's formula gives cfg.ffn_dim exactly."""
    want = cfg.ffn_dim

    def gives(mo, mult):
        return dataclasses.replace(cfg, ffn_hidden=None, multiple_of=mo, ffn_dim_multiplier=mult).ffn_dim == want

    if gives(cfg.multiple_of, cfg.ffn_dim_multiplier):
        return cfg.multiple_of, cfg.ffn_dim_multiplier
    base = int(2 * 4 * cfg.dim / 3)
    if base <= 0:
        raise ConfigError(f"dim={cfg.dim} is too small for Meta's FFN formula")
    mos = [cfg.multiple_of] + [2**k for k in range(12, -1, -1) if 2**k != cfg.multiple_of]
    for decimals in range(1, 7):
        mult = round(want / base, decimals)
        for mult_c in (None, cfg.ffn_dim_multiplier, mult):
            for mo in mos:
                if mo <= want and gives(mo, mult_c):
                    return mo, mult_c
    if gives(want, want / base):
        return want, want / base
    raise ConfigError(f"no multiple_of / ffn_dim_multiplier make Meta's FFN formula give {want} for dim={cfg.dim}")


def meta_params(cfg: ModelConfig, n_kv_heads: int | None = None) -> dict:
    """Meta's params.json for `cfg` (see the module doc for the RoPE keys added when needed)."""
    mo, mult = meta_ffn_params(cfg)
    p = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
         "n_kv_heads": n_kv_heads or cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "multiple_of": mo,
         "ffn_dim_multiplier": mult, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
         "use_scaled_rope": cfg.rope_scaling_factor is not None}
    if cfg.rope_scaling_factor is not None:
        defaults = meta_rope_defaults(dataclasses.asdict(cfg))
        for k, v in defaults.items():
            if getattr(cfg, k) != v:
                p[k] = getattr(cfg, k)
    return p


def _meta_order(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """(our name, layer) in the order of Meta's state_dict."""
    order = [("embed", None)]
    for i in range(cfg.n_layers):
        order += [(n, i) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")]
    return order + [("norm", None), ("output", None)]


class _PthFile:
    """A torch checkpoint written tensor by tensor without holding its tensors: a skeleton of
    the whole state dict is saved under `torch.serialization.skip_data` (its never-touched
    `torch.empty` tensors cost no memory and the file is sparse), then loaded memory-mapped
    with MAP_SHARED, so assigning into a tensor writes the file's bytes in place. The map is
    re-opened every REMAP_BYTES, so written pages do not accumulate in this process."""

    def __init__(self, path: pathlib.Path, entries: list[tuple[str, tuple]], dtype: str):
        import torch
        skeleton = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, shape in entries}
        with torch.serialization.skip_data():
            torch.save(skeleton, path)
        self.path, self._tensors, self._written = path, None, 0

    def write(self, key: str, arr: np.ndarray):
        import torch
        if self._tensors is None:
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                self._tensors = torch.load(self.path, mmap=True, weights_only=True)
        torch_to_numpy(self._tensors[key])[...] = arr
        self._written += arr.nbytes
        if self._written > REMAP_BYTES:
            self._tensors, self._written = None, 0


def write_meta(source: Source, out, *, shards: int = 1, dtype: str = "bfloat16",
               tokenizer: pathlib.Path | None = None, log=print):
    """Meta's layout: consolidated.NN.pth (model-parallel shards), params.json, tokenizer.model."""
    cfg, nd = source.model, dtype_of(dtype)
    if shards < 1:
        raise ConfigError("--shards must be at least 1")
    kv = cfg.n_kv_heads
    problems = [f"n_heads={cfg.n_heads}" if cfg.n_heads % shards else "",
                f"vocab_size={cfg.vocab_size}" if cfg.vocab_size % shards else "",
                f"ffn_dim={cfg.ffn_dim}" if cfg.ffn_dim % shards else "",
                f"n_kv_heads={kv}" if kv % shards and shards % kv else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"cannot split into {shards} model-parallel shards: {', '.join(problems)} "
                          f"must divide by {shards} (kv heads may instead divide {shards}, then they are repeated)")
    kv_repeat = shards // kv if shards > kv else 1
    params = meta_params(cfg, n_kv_heads=kv * kv_repeat)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, cfg)
    out = pathlib.Path(out).resolve()
    with new_output(out) as tmp:
        def shard_shape(name):
            shape = list(torch_shape(name, cfg))
            dim = META_SPLIT_DIM[name]
            if dim is not None:
                shape[dim] = shape[dim] * (kv_repeat if name in ("wk", "wv") else 1) // shards
            return tuple(shape)

        entries = [(META_NAMES[n].format(i=i), shard_shape(n)) for n, i in _meta_order(cfg)]
        files = [_PthFile(tmp / f"consolidated.{s:02d}.pth", entries, dtype) for s in range(shards)]
        for name in param_shapes(cfg):
            for i, arr in source.layers(name):
                t = np.ascontiguousarray(to_torch_layout(name, arr, cfg), dtype=nd)
                targets = ["embed", "output"] if name == "embed" and cfg.tie_embeddings else [name]
                for target in targets:
                    key = META_NAMES[target].format(i=i)
                    for f, piece in zip(files, _split_for_meta(target, t, shards, kv_repeat, cfg)):
                        f.write(key, piece)
        del files  # unmaps them: what was written is in the files
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    log(f"wrote {out}: {shards} shard(s), {dtype}" + (f", kv heads repeated x{kv_repeat}" if kv_repeat > 1 else "")
        + (", with tokenizer.model" if tokenizer is not None else ""))
    return out


def _split_for_meta(name: str, t: np.ndarray, shards: int, kv_repeat: int, cfg: ModelConfig) -> list:
    dim = META_SPLIT_DIM[name]
    if dim is None or shards == 1:
        return [t] * shards
    if name in ("wk", "wv") and kv_repeat > 1:
        heads = t.reshape(cfg.n_kv_heads, cfg.head_dim, t.shape[1])
        return [heads[s // kv_repeat] for s in range(shards)]
    return np.split(t, shards, axis=dim)
