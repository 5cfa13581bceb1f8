"""Typed configs loaded from TOML, with `section.key=value` overrides.

A run config has three sections: [model], [data] and [train]. Presets live in
`configs/` (by name, e.g. "llama3-8b", or by path). A preset may name a base preset
with a top-level `base = "name"`; its sections are merged key by key. Unknown keys are
errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
import typing
from dataclasses import dataclass, field

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """Bad user input in a config, mesh file or command line."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # Explicit FFN width (Hugging Face's intermediate_size); None = computed as Meta does.
    ffn_hidden: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 frequency scaling; rope_scaling_factor = None means none (Llama 3.0).
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention_impl: str = "xla"
    # "none" keeps activations; "full" recomputes each block in the backward pass.
    remat: str = "full"
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        # Exactly Meta's reference computation.
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in ("none", "full"):
            raise ConfigError(f"model.remat must be 'none' or 'full', got {self.remat!r}")
        for k in ("param_dtype", "compute_dtype"):
            if getattr(self, k) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{k} must be float32, bfloat16 or float16")


@dataclass(frozen=True)
class DataSource:
    """One weighted source: a text file or folder, a JSONL file (field) or Parquet file (column)."""
    path: str
    weight: float = 1.0
    kind: str = "auto"  # auto | text | jsonl | parquet
    field: str = "text"  # JSONL key or Parquet column
    glob: str = "*"  # files matched inside a folder


@dataclass(frozen=True)
class DataConfig:
    # Empty list = the embedded default corpus (this Python's standard library sources).
    sources: tuple[DataSource, ...] = ()
    # Empty = the project's own small BPE trained on the default corpus (cached); else a
    # Meta tokenizer.model path.
    tokenizer: str = ""
    default_vocab_size: int = 2048
    seq_len: int = 256
    seed: int = 0
    # Independent data streams; global batch row block s comes from shard s. 0 = one per
    # JAX process. Fix it to resume exactly on a different number of processes.
    shards: int = 0
    # Packed rows are shuffled within windows of this many rows (0 or 1 = off).
    shuffle_rows: int = 1024


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    global_batch: int = 16
    micro_batches: int = 1
    lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # An Orbax checkpoint (from `llama3_jax.convert from-hf/from-meta` or a run dir) to
    # take the weights from; the optimizer starts fresh.
    init_from: str = ""
    # Peak FLOP/s of one device for MFU; 0 = look it up from the device kind (CPU: measured).
    peak_flops_per_device: float = 0.0
    sample_tokens: int = 48
    sample_prompt: str = "def "


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _coerce(value, typ, where: str):
    """Turn a TOML value (or a command-line string) into the dataclass field's type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple:  # tuple[DataSource, ...]
        if isinstance(value, str):
            raise ConfigError(f"{where} is a list of tables; set it in a TOML file")
        return tuple(_coerce(v, args[0], where) for v in value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    raise TypeError(typ)


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + '.' + u for u in unknown)}; "
                          f"valid keys in [{where}]: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def resolve_preset(name_or_path: str, directory: pathlib.Path = CONFIG_DIR, kind: str = "config") -> pathlib.Path:
    p = pathlib.Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    cand = directory / f"{name_or_path}.toml"
    if cand.exists():
        return cand
    known = sorted(x.stem for x in directory.glob("*.toml"))
    raise ConfigError(f"{kind} {name_or_path!r} not found: give a .toml path or one of {', '.join(known)}")


def _read_toml(path: pathlib.Path, seen=()) -> dict:
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    base = raw.pop("base", None)
    merged: dict = {}
    if base is not None:
        bpath = resolve_preset(base, path.parent)
        if bpath in seen:
            raise ConfigError(f"{path}: circular base {base!r}")
        merged = _read_toml(bpath, seen + (path,))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
        merged.setdefault(section, {}).update(values)
    return merged


def parse_override(text: str) -> tuple[str, str, str]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-3)")
    key, value = text.split("=", 1)
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    return section, name, value


def load_config(name_or_path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset (or the defaults) and apply `section.key=value` overrides."""
    raw = _read_toml(resolve_preset(name_or_path)) if name_or_path else {}
    for text in overrides:
        section, name, value = parse_override(text)
        raw.setdefault(section, {})[name] = value
    cfg = Config(**{s: _build(cls, raw.get(s, {}), s) for s, cls in SECTIONS.items()})
    cfg.model.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    return Config(**{s: _build(cls, d.get(s, {}), s) for s, cls in SECTIONS.items()})


def param_count(cfg: ModelConfig) -> int:
    """Parameter count from the config's shapes (no allocation)."""
    d, hd, L = cfg.dim, cfg.head_dim, cfg.n_layers
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    ffn = 3 * d * cfg.ffn_dim
    per_layer = attn + ffn + 2 * d
    emb = cfg.vocab_size * d
    return L * per_layer + emb * (1 if cfg.tie_embeddings else 2) + d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) plus causal attention.

    The embedding lookup is no matmul, so it is left out of N (the output head is in).
    Attention: QK^T and AV are 2 matmuls of 2*seq*head_dim*heads FLOPs per token forward;
    causal masking halves the useful work; x3 for forward+backward.
    """
    n_matmul = param_count(cfg) - cfg.vocab_size * cfg.dim * (0 if cfg.tie_embeddings else 1)
    n_matmul -= (2 * cfg.n_layers + 1) * cfg.dim  # norms
    attn = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # 3 * 2 * 2 * s * h * hd / 2
    return 6.0 * n_matmul + attn


def dtype_of(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes (one may be -1 = the remaining devices) and pipeline settings."""
    dp: int = 1
    fsdp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    # Pipeline: micro-batches per step, virtual stages per pp rank (interleaved schedule),
    # and whether the first and last stages hold one layer fewer (embedding / output+loss).
    pp_microbatches: int = 1
    pp_virtual_stages: int = 1
    pp_light_ends: bool = False

    def sizes(self) -> dict:
        return dict(dp=self.dp, fsdp=self.fsdp, pp=self.pp, cp=self.cp, tp=self.tp)

    def fixed_device_count(self) -> int | None:
        """Devices this mesh needs, or None when an axis is -1."""
        sizes = self.sizes().values()
        return None if -1 in sizes else math.prod(sizes)


MESH_DIR = CONFIG_DIR.parent / "meshes"


def load_mesh(name_or_path: str | None = None) -> MeshConfig:
    """A mesh file from `meshes/` (by name or path); None = one device."""
    if not name_or_path:
        return MeshConfig()
    path = resolve_preset(name_or_path, MESH_DIR, kind="mesh")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(raw) - {"mesh"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a mesh file has only [mesh]")
    return _build(MeshConfig, raw.get("mesh", {}), "mesh")
