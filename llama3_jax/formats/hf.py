"""Hugging Face LlamaForCausalLM directories: names, the q/k rotary permutation, config.json,
reading (`HFSource`) and writing (`write_hf`) safetensors tensor by tensor.

Ours keeps Meta's rotary layout (adjacent feature pairs); Hugging Face stores wq and wk
permuted for its rotate-half rotary. `hf_to_meta_qk` and `meta_to_hf_qk` are the one
function pair that converts between them; everything else is Meta's torch layout
(`llama3_jax.formats.source`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys

import numpy as np

from llama3_jax.config import ConfigError, ModelConfig, dtype_of
from llama3_jax.formats.bpe import (check_tokenizer_fits, is_tiktoken_file, ranks_from_tokenizer_json,
                                    write_hf_tokenizer)
from llama3_jax.formats.source import (REMAP_BYTES, Source, from_torch_layout, kind_hint, need_dir, new_output,
                                       pwrite, tensor_names, to_torch_layout, torch_shape, torch_to_numpy)
from llama3_jax.formats.tokenizer import write_tiktoken_file
from llama3_jax.model import LAYER_PARAMS, param_shapes

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attention_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "output": "lm_head.weight",
}


def meta_to_hf_qk(w, n_heads: int):
    """Meta wq/wk [n*hd, dim] (adjacent-pair rotary) -> Hugging Face (rotate-half) layout."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, dim).swapaxes(1, 2).reshape(out_dim, dim)


def hf_to_meta_qk(w, n_heads: int):
    """Inverse of `meta_to_hf_qk`."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, 2, hd // 2, dim).swapaxes(1, 2).reshape(out_dim, dim)


def qk_heads(name: str, cfg: ModelConfig) -> int | None:
    return {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(name)


def hf_tensor_to_ours(name: str, w, cfg: ModelConfig):
    n = qk_heads(name, cfg)
    if n is not None:
        w = hf_to_meta_qk(w, n)
    return from_torch_layout(name, w, cfg)


def ours_to_hf_tensor(name: str, w, cfg: ModelConfig):
    w = to_torch_layout(name, w, cfg)
    n = qk_heads(name, cfg)
    return meta_to_hf_qk(w, n) if n is not None else w


# ---------------------------------------------------------------- config.json

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face LlamaForCausalLM config.json (either rope spelling)."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ConfigError(f"config.json is not a Llama model (model_type={hf.get('model_type')!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"unsupported rope_type {rope_type!r}: only 'default' and 'llama3' are Llama 3")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise ConfigError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("Llama 3 has no biases; this checkpoint uses attention_bias/mlp_bias")
    kw = dict(
        dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if rope_type == "llama3":
        kw.update(rope_scaling_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_position=int(rope["original_max_position_embeddings"]))
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def config_to_hf(cfg: ModelConfig, bos_id: int = 128000, eos_id: int | list = 128001,
                 torch_dtype: str = "bfloat16") -> dict:
    """A Hugging Face LlamaForCausalLM config.json for `cfg`.

    The rotary settings are written in both spellings: transformers >= 5 reads
    `rope_parameters` (with rope_theta inside), older versions `rope_theta` + `rope_scaling`.
    """
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "use_cache": True, "pretraining_tp": 1,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }
    if cfg.rope_scaling_factor is not None:
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
        }
        hf["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": cfg.rope_theta}
    return hf


# ---------------------------------------------------------------- reading

class SafetensorsDir:
    """Tensor-by-tensor reader of a Hugging Face directory (single file or sharded index)."""

    def __init__(self, path):
        from safetensors import safe_open
        self.path = pathlib.Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors files (and no index)")
            weight_map = {}
            for f in files:
                with safe_open(f, "numpy") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise FileNotFoundError(f"{self.path}: missing shard(s) {', '.join(missing)} named in the index")
        self.weight_map = weight_map
        self._open = {}
        self._safe_open = safe_open

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name!r} not found")
        f = self.weight_map[name]
        if f not in self._open:
            self._open[f] = self._safe_open(self.path / f, "pt")  # "pt" reads bfloat16 too
        return self._open[f]

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy (bfloat16 through ml_dtypes)."""
        return torch_to_numpy(self._handle(name).get_tensor(name))

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header, without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self):
        """Drop the open (memory-mapped) files, so pages read so far leave this process."""
        self._open.clear()


class HFSource(Source):
    """A Hugging Face LlamaForCausalLM directory (config.json + safetensors), tensor by tensor."""

    def __init__(self, path):
        path = need_dir(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ConfigError(f"{path} has no config.json: it is {kind_hint(path)}, not a Hugging Face model")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        try:
            self.model = config_from_hf(hf)
        except KeyError as e:
            raise ConfigError(f"{cfg_file} lacks {e} and so is not a Llama config") from None
        self.path = path
        self.hf_config = hf
        self.reader = SafetensorsDir(path)
        self._validate()

    def _validate(self):
        cfg, names = self.model, tensor_names(self.model, HF_NAMES)
        have = set(self.reader.weight_map)
        expected = {hf for _, _, hf in names}
        missing = [hf for _, _, hf in names if hf not in have]
        if missing:
            raise ConfigError(f"{self.path}: {len(missing)} tensor(s) that config.json implies are missing, "
                              f"e.g. {missing[:3]}; the config does not match the weights or a shard is incomplete")
        ignorable = re.compile(r".*rotary_emb\.inv_freq$" + (r"|lm_head\.weight$" if cfg.tie_embeddings else ""))
        extra = sorted(n for n in have - expected if not ignorable.match(n))
        if extra:
            raise ConfigError(f"{self.path}: {len(extra)} tensor(s) a Llama 3 model does not have, "
                              f"e.g. {extra[:3]}; the config does not match the weights")
        for name, _, hf in names:
            got, want = self.reader.shape(hf), torch_shape(name, cfg)
            if got != want:
                raise ConfigError(f"{self.path}: tensor {hf} has shape {got} but config.json implies {want}; "
                                  "the config does not match the weights")
        self.reader.close()

    def _get(self, hf_name: str) -> np.ndarray:
        w = self.reader.get(hf_name)
        self._mapped += w.nbytes
        if self._mapped > REMAP_BYTES:  # drop the memory maps: the pages read leave the process
            self.reader.close()
            self._mapped = 0
        return w

    _mapped = 0

    def layer(self, name, i):
        return hf_tensor_to_ours(name, self._get(HF_NAMES[name].format(i=i)), self.model)

    def whole(self, name):
        return hf_tensor_to_ours(name, self._get(HF_NAMES[name]), self.model)

    def special_ids(self) -> tuple:
        return self.hf_config.get("bos_token_id"), self.hf_config.get("eos_token_id")

    def tokenizer_file(self, scratch: pathlib.Path) -> pathlib.Path | None:
        """A tiktoken tokenizer.model for this model: the one shipped (original/), else one
        derived from a byte-level BPE tokenizer.json, else None."""
        for cand in (self.path / "original" / "tokenizer.model", self.path / "tokenizer.model"):
            if cand.is_file() and is_tiktoken_file(cand):
                return cand
        tj = self.path / "tokenizer.json"
        if tj.is_file():
            try:
                ranks = ranks_from_tokenizer_json(tj)
            except ConfigError as e:
                print(f"note: {tj} not converted to tokenizer.model ({e})", file=sys.stderr)
                return None
            out = scratch / "tokenizer.model"
            write_tiktoken_file(ranks, out)
            return out
        return None


# ---------------------------------------------------------------- writing

class SafetensorsWriter:
    """One .safetensors file whose header is planned up front; tensors are written at their offsets.

    Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}} padded with spaces to a multiple of 8, then the tensors' bytes.
    """

    def __init__(self, path, entries: list[tuple[str, tuple, str, int]], metadata: dict | None = None):
        header, offsets, pos = {}, {}, 0
        for name, shape, st_dtype, nbytes in entries:
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            offsets[name] = pos
            pos += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.offsets, self.base = pathlib.Path(path), offsets, 8 + len(raw)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, len(raw).to_bytes(8, "little") + raw)
        os.ftruncate(self.fd, self.base + pos)

    def write(self, name: str, arr: np.ndarray):
        pwrite(self.fd, arr, self.base + self.offsets[name])

    def close(self):
        os.close(self.fd)


def write_hf(source: Source, out, *, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9,
             bos_id: int | None = 128000, eos_id: int | None = 128001, tokenizer: pathlib.Path | None = None,
             log=print):
    """A Hugging Face LlamaForCausalLM directory from `source`, written tensor by tensor."""
    cfg, nd = source.model, dtype_of(dtype)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, cfg)
    out = pathlib.Path(out).resolve()
    with new_output(out) as tmp:
        entries = []  # (our name, layer, hf name, shape, nbytes), in the order the source yields
        for name in param_shapes(cfg):
            shape = torch_shape(name, cfg)
            nbytes = math.prod(shape) * nd.itemsize
            layers = range(cfg.n_layers) if name in LAYER_PARAMS else [None]
            entries += [(name, i, HF_NAMES[name].format(i=i), shape, nbytes) for i in layers]
        groups, size = [[]], 0
        for e in entries:
            if groups[-1] and size + e[4] > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e[4]
        n = len(groups)
        files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        writers, where = [], {}
        for fname, group in zip(files, groups):
            planned = [(e[2], e[3], SAFETENSORS_DTYPES[dtype], e[4]) for e in group]
            writers.append(SafetensorsWriter(tmp / fname, planned, {"format": "pt"}))
            where.update({e[2]: len(writers) - 1 for e in group})
        try:
            for name in param_shapes(cfg):
                for i, arr in source.layers(name):
                    hf_name = HF_NAMES[name].format(i=i)
                    w = ours_to_hf_tensor(name, arr, cfg)
                    writers[where[hf_name]].write(hf_name, np.ascontiguousarray(w, dtype=nd))
        finally:
            for w in writers:
                w.close()
        if n > 1:
            index = {"metadata": {"total_size": sum(e[4] for e in entries)},
                     "weight_map": {e[2]: files[where[e[2]]] for e in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, bos_id, eos_id, dtype), indent=2))
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                               indent=2))
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.max_seq_len)
    log(f"wrote {out}: {len(entries)} tensors in {n} safetensors file(s), {dtype}"
        + (", with tokenizer" if tokenizer is not None else ""))
    return out
