"""Weight layouts and names: ours <-> Meta <-> Hugging Face, and `load`.

Ours keeps Meta's rotary layout, so Meta tensors only need a transpose/reshape. Hugging
Face stores wq and wk permuted for its rotate-half rotary; `hf_to_meta_qk` and
`meta_to_hf_qk` are the one function pair that converts between them (used by `load`
and by `llama3_jax.convert`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from llama3_jax.config import ConfigError, ModelConfig
from llama3_jax.model import LAYER_PARAMS, param_shapes

# Meta name of each of our parameters ({i} = layer index for stacked ones).
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


def to_torch_layout(name: str, w, cfg: ModelConfig):
    """One layer's (or a global) parameter of ours -> Meta's torch tensor layout (out, in)."""
    if name in ("wq", "wk", "wv"):  # [dim, heads, hd] -> [heads*hd, dim]
        return w.reshape(w.shape[0], -1).T
    if name == "wo":  # [heads, hd, dim] -> [dim, heads*hd]
        return w.reshape(-1, w.shape[-1]).T
    if name in ("w1", "w3", "w2", "output"):
        return w.T
    return w  # embed [vocab, dim] and norms are stored alike


def from_torch_layout(name: str, w, cfg: ModelConfig):
    """Inverse of `to_torch_layout`."""
    hd = cfg.head_dim
    if name in ("wq", "wk", "wv"):
        return w.T.reshape(w.shape[1], -1, hd)
    if name == "wo":
        return w.T.reshape(-1, hd, w.shape[0])
    if name in ("w1", "w3", "w2", "output"):
        return w.T
    return w


def torch_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one layer's (or a global) tensor in Meta's / Hugging Face's torch layout."""
    d, hd, f, V = cfg.dim, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    return {
        "embed": (V, d), "output": (V, d), "norm": (d,), "attention_norm": (d,), "ffn_norm": (d,),
        "wq": (cfg.n_heads * hd, d), "wk": (cfg.n_kv_heads * hd, d), "wv": (cfg.n_kv_heads * hd, d),
        "wo": (d, cfg.n_heads * hd), "w1": (f, d), "w3": (f, d), "w2": (d, f),
    }[name]


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


def tensor_names(cfg: ModelConfig, table: dict) -> list[tuple[str, int | None, str]]:
    """(our name, layer index or None, checkpoint name) for every tensor of a model."""
    out = []
    for name in param_shapes(cfg):
        if name in LAYER_PARAMS:
            out += [(name, i, table[name].format(i=i)) for i in range(cfg.n_layers)]
        else:
            out.append((name, None, table[name]))
    return out


# ---------------------------------------------------------------- Hugging Face config

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


# ---------------------------------------------------------------- reading safetensors

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
        """The tensor as numpy (bfloat16 is widened to float32, exactly)."""
        t = self._handle(name).get_tensor(name)
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header, without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def close(self):
        """Drop the open (memory-mapped) files, so pages read so far leave this process."""
        self._open.clear()


def read_hf_params(path, cfg: ModelConfig, dtype=np.float32, put=None) -> dict:
    """Our parameter dict from a Hugging Face directory, one tensor at a time.

    `put(name, array)` places each finished parameter (e.g. onto devices); default numpy.
    """
    reader = SafetensorsDir(path)
    params = {}
    names = tensor_names(cfg, HF_NAMES)
    if cfg.tie_embeddings and "lm_head.weight" in reader.weight_map:
        pass  # tied checkpoints may still store a copy; we use the embedding
    for name, shape in param_shapes(cfg).items():
        entries = [(i, hf) for n, i, hf in names if n == name]
        if name in LAYER_PARAMS:
            arr = np.empty(shape, dtype)
            for i, hf_name in entries:
                w = hf_tensor_to_ours(name, reader.get(hf_name), cfg)
                _check_shape(hf_name, w.shape, shape[1:], path)
                arr[i] = w
        else:
            arr = hf_tensor_to_ours(name, reader.get(entries[0][1]), cfg).astype(dtype)
            _check_shape(entries[0][1], arr.shape, shape, path)
        params[name] = put(name, arr) if put else arr
    return params


def _check_shape(name, got, want, path):
    if tuple(got) != tuple(want):
        raise ConfigError(f"{path}: tensor {name} has shape {tuple(got)} but config.json implies "
                          f"{tuple(want)}; the config does not match the weights")


def load(path, dtype="float32", compute_dtype=None):
    """An NNX `Llama` from a Hugging Face directory or a llama3_jax checkpoint / run directory.

    `model(tokens)` returns float32 logits [batch, seq, vocab]. `dtype` is the parameter
    dtype; compute runs in `compute_dtype` (default: the same as `dtype`).
    """
    import jax.numpy as jnp
    from flax import nnx

    from llama3_jax.model import Llama

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    dtype = jnp.dtype(dtype).name
    compute = jnp.dtype(compute_dtype).name if compute_dtype else dtype
    if (path / "config.json").exists():
        cfg = config_from_hf(json.loads((path / "config.json").read_text()),
                             param_dtype=dtype, compute_dtype=compute)
        params = read_hf_params(path, cfg, dtype=np.float32)
    else:
        from llama3_jax import checkpointing
        cfg, params = checkpointing.load_params(path)
        import dataclasses
        cfg = dataclasses.replace(cfg, param_dtype=dtype, compute_dtype=compute)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    for name, arr in params.items():
        getattr(model, name).set_value(jnp.asarray(arr, dtype))
    return model
