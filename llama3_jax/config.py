"""Typed configs loaded from TOML, with `section.key=value` overrides, and `validate`.

A run config has three sections: [model], [data] and [train]; a mesh file has [mesh].
Presets are the top-level `configs/` and `meshes/` folders of a checkout, which a wheel
carries inside the package (`llama3_jax/configs`, `llama3_jax/meshes`). A config may start
from another with a top-level `base = "name"` (a preset) or `base = "file.toml"` (a path
relative to the config's own folder); sections are merged key by key. Unknown keys are
errors that list the valid ones.

`validate` is the one check of a config against a mesh, a device count and a process
count; it runs before anything is compiled or written and raises `ConfigError` with a
one-line message that names the fix.

Imports: the standard library only (this is the bottom of the package).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
import typing
from dataclasses import dataclass, field

_PACKAGE = pathlib.Path(__file__).resolve().parent


def preset_dir(kind: str) -> pathlib.Path:
    """The folder of presets of `kind` ("configs" or "meshes"): inside an installed wheel,
    else the checkout's top-level folder (a checkout, or an editable install)."""
    for cand in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"no {kind}/ folder next to {_PACKAGE}; reinstall llama3_jax")



class ConfigError(ValueError):
    """Bad user input in a config, mesh file, command line or data source."""


# The dtypes a config may name (parameters, compute, exports).
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "xla_chunked", "jax_nn")
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_attn_out", "offload")


def dtype_of(name: str):
    """The numpy dtype of a DTYPES name (bfloat16 from ml_dtypes, as JAX uses)."""
    import jax.numpy as jnp
    return jnp.dtype(name)


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
    value_head: bool = False  # a scalar head on the final hidden state (reward model; set by train.stage=rm)
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    attention_impl: str = "xla"  # xla | xla_chunked | jax_nn (see model/attention.py)
    # What the backward pass keeps of each block (the rest is recomputed): none (everything),
    # full (only the block input), save_dots, save_qkv_proj, save_attn_out, offload (to host).
    remat: str = "full"
    # Positions per chunk of the loss: the output projection and cross-entropy run over
    # chunks of the sequence, recomputed in the backward pass, so [batch, seq, vocab] float32
    # logits never exist whole. 0 = the whole sequence at once.
    loss_chunk: int = 0
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
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk={self.loss_chunk} must be 0 (off) or a chunk of positions")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention_impl={self.attention_impl!r} unknown; choose one of "
                              f"{', '.join(ATTENTION_IMPLS)}")
        for k in ("param_dtype", "compute_dtype"):
            if getattr(self, k) not in DTYPES:
                raise ConfigError(f"model.{k} must be one of {', '.join(DTYPES)}, got {getattr(self, k)!r}")


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
    # One source by path (instead of [[data.sources]]); for post-training, the JSONL or
    # Parquet rows of the stage ("" = the synthetic arithmetic task).
    path: str = ""
    # Post-training rows that are bad (an unknown role, a missing field, longer than
    # seq_len): an error naming the file and line, or counted and skipped when true.
    skip_bad_rows: bool = False
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
    # Unreadable documents (bad JSON, a missing field, text that is not UTF-8) are skipped,
    # logged once and counted. The run stops (with a checkpoint) once more than 10 different
    # rows were bad and the bad reads exceed this fraction of all documents read so far.
    max_bad_row_fraction: float = 0.01


STAGES = ("pretrain", "sft", "rm", "dpo", "ppo")


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "pretrain"  # pretrain | sft | rm | dpo | ppo (llama3_jax.align)
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
    # JAX's persistent compilation cache, so a restart does not compile again: a folder,
    # "" for $LLAMA3_JAX_CACHE/xla (default ~/.cache/llama3_jax/xla), or "off".
    compile_cache: str = ""
    # A bad step applies no update: a non-finite loss or gradient, or (after spike_warmup
    # good steps; spike_k = 0 turns it off) a loss above mean + spike_k x std of an
    # exponential average over about spike_window good steps.
    spike_k: float = 6.0
    spike_window: int = 128
    spike_warmup: int = 100
    # rollback_after consecutive bad steps (0 = never) reload the last checkpoint from before
    # them and skip their batches; more than max_rollbacks rollbacks stop the run.
    rollback_after: int = 3
    max_rollbacks: int = 3
    # Batches never trained on: inclusive ranges of 0-based batch indices, e.g. "120-135,400-400".
    skip_batches: str = ""
    # The watchdog dumps every thread's stack and exits (code 75) when a step takes longer
    # than this; the first step, which compiles, gets compile_timeout_s. 0 = off.
    step_timeout_s: float = 600.0
    compile_timeout_s: float = 3600.0


@dataclass(frozen=True)
class AlignConfig:
    """Post-training (Llama 3 paper section 4): DPO, the synthetic task, PPO and GRPO."""
    # DPO: beta, and an NLL term on the chosen answers (per token) with this coefficient.
    dpo_beta: float = 0.1
    dpo_nll_coef: float = 0.2
    # Formatting tokens (headers, <|eot_id|>) are left out of the DPO log-ratios.
    dpo_mask_formatting: bool = True
    # The frozen reference: a run or converted checkpoint; "" = train.init_from.
    reference: str = ""
    # Rows of the synthetic arithmetic task when data.path is empty, and its operands' range.
    task_rows: int = 2000
    task_max_operand: int = 20
    # PPO (train.stage=ppo): each rollout samples train.global_batch x ppo_minibatches answers
    # (group_size per prompt) from the policy, scored by `reward` (a reward-model run or
    # python:module.fn; "" = the task's verifier), then ppo_epochs passes of updates.
    reward: str = ""
    group_size: int = 1
    grpo: bool = False  # group-relative advantages and no value loss (needs group_size > 1)
    max_new_tokens: int = 8
    temperature: float = 1.0
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    kl_coef: float = 0.05  # the per-token KL penalty to the reference (GRPO: a loss term)
    gamma: float = 1.0
    gae_lambda: float = 0.95


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "align": AlignConfig}


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


def resolve_preset(name_or_path: str, kind: str = "configs", relative_to: pathlib.Path | None = None
                   ) -> pathlib.Path:
    """A .toml path (relative to `relative_to` if given, else the working directory), else
    the preset of that name in the `kind` folder."""
    p = pathlib.Path(name_or_path).expanduser()
    if p.suffix == ".toml":
        p = (relative_to / p) if relative_to is not None and not p.is_absolute() else p
        if p.is_file():
            return p
    directory = preset_dir(kind)
    cand = directory / f"{name_or_path}.toml"
    if cand.is_file():
        return cand
    known = sorted(x.stem for x in directory.glob("*.toml"))
    what = {"configs": "config", "meshes": "mesh"}[kind]
    raise ConfigError(f"{what} {name_or_path!r} not found: give a .toml path or one of {', '.join(known)}")


def _read_toml(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None


def _read_config(path: pathlib.Path, seen=()) -> dict:
    raw = _read_toml(path)
    base = raw.pop("base", None)
    merged: dict = {}
    if base is not None:
        bpath = resolve_preset(str(base), relative_to=path.parent).resolve()
        if bpath in seen or bpath == path.resolve():
            raise ConfigError(f"{path}: circular base {base!r}")
        merged = _read_config(bpath, seen + (path.resolve(),))
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
    raw = _read_config(resolve_preset(name_or_path)) if name_or_path else {}
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



MESH_AXES = ("dp", "fsdp", "pp", "cp", "tp")  # outermost first: TP innermost, as in the paper
FAKE_DEVICES_HINT = " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N fake devices)"


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
        return {a: getattr(self, a) for a in MESH_AXES}

    def fixed_device_count(self) -> int | None:
        """Devices this mesh needs, or None when an axis is -1."""
        sizes = self.sizes().values()
        return None if -1 in sizes else math.prod(sizes)

    def resolve(self, n_devices: int) -> dict:
        """{axis: size} over `n_devices`, the -1 axis (if any) taking the remaining devices."""
        sizes = self.sizes()
        wild = [a for a, s in sizes.items() if s == -1]
        if len(wild) > 1:
            raise ConfigError(f"only one mesh axis may be -1, got {', '.join(wild)}")
        for a, s in sizes.items():
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{a}={s} must be a positive size (or -1 for the rest)")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if wild:
            if n_devices % fixed:
                raise ConfigError(f"the mesh's fixed axes multiply to {fixed}, which does not divide the "
                                  f"{n_devices} devices; change the mesh file's sizes{FAKE_DEVICES_HINT}")
            return {**sizes, wild[0]: n_devices // fixed}
        if fixed != n_devices:
            raise ConfigError(
                f"mesh {' x '.join(f'{a}={s}' for a, s in sizes.items())} needs {fixed} devices but "
                f"{n_devices} are available; change the mesh file (or set one axis to -1){FAKE_DEVICES_HINT}")
        return sizes


def load_mesh(name_or_path: str | None = None) -> MeshConfig:
    """A mesh file from `meshes/` (by name or path); None = one device."""
    if not name_or_path:
        return MeshConfig()
    path = resolve_preset(name_or_path, kind="meshes")
    raw = _read_toml(path)
    unknown = sorted(set(raw) - {"mesh"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a mesh file has only [mesh]")
    return _build(MeshConfig, raw.get("mesh", {}), "mesh")


# ---------------------------------------------------------------- validation

def validate(cfg: Config, mesh_cfg: MeshConfig, n_devices: int, process_count: int = 1) -> dict:
    """Every check of a run's settings that needs no data read and no compile: the model,
    the mesh against the devices, heads, sequence and batch divisibility, the pipeline, the
    processes (the data sources: `data.check_data`). Returns the mesh's {axis: size}."""
    m, t = cfg.model, cfg.train
    m.validate()
    sizes = mesh_cfg.resolve(n_devices)
    tp, cp, pp = sizes["tp"], sizes["cp"], sizes["pp"]
    if m.n_heads % tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh tp={tp}; choose tp dividing it")
    if m.n_kv_heads % tp and tp % m.n_kv_heads:
        raise ConfigError(f"mesh tp={tp} must divide model.n_kv_heads={m.n_kv_heads} or be a multiple of it "
                          "(KV heads are then replicated)")
    seq = cfg.data.seq_len
    if seq > m.max_seq_len:
        raise ConfigError(f"data.seq_len={seq} exceeds model.max_seq_len={m.max_seq_len}")
    if seq % (2 * cp) and cp > 1:
        raise ConfigError(f"data.seq_len={seq} must be divisible by 2*cp={2 * cp} for context parallelism")
    if seq % (cp * tp):
        raise ConfigError(f"data.seq_len={seq} must be divisible by cp*tp={cp * tp} (sequence parallelism)")
    if m.loss_chunk and (seq % m.loss_chunk or m.loss_chunk % cp):
        raise ConfigError(f"model.loss_chunk={m.loss_chunk} must divide data.seq_len={seq} and be divisible by "
                          f"cp={cp}")
    if pp > 1:  # pipeline settings first: the batch checks below divide by them
        _check_pipeline(m, mesh_cfg, pp)
    if t.stage not in STAGES:
        raise ConfigError(f"train.stage={t.stage!r} unknown; choose one of {', '.join(STAGES)}")
    if t.stage == "ppo" and pp > 1:
        raise ConfigError("train.stage=ppo samples its rollouts with the generator, which runs on meshes without pp")
    if t.stage in ("rm", "dpo") and t.global_batch % (2 * max(t.micro_batches, 1)):
        raise ConfigError(f"train.stage={t.stage} trains on pairs of rows: give a train.global_batch divisible by "
                          "2 x train.micro_batches")
    if t.global_batch < 1 or t.micro_batches < 1:
        raise ConfigError("train.global_batch and train.micro_batches must be positive")
    if t.global_batch % t.micro_batches:
        raise ConfigError(f"train.global_batch={t.global_batch} does not divide into "
                          f"train.micro_batches={t.micro_batches}")
    per_micro = t.global_batch // t.micro_batches
    if pp > 1:
        if per_micro % mesh_cfg.pp_microbatches:
            raise ConfigError(f"the batch of {per_micro} rows does not divide into "
                              f"mesh.pp_microbatches={mesh_cfg.pp_microbatches}")
        per_micro //= mesh_cfg.pp_microbatches
    data_ways = sizes["dp"] * sizes["fsdp"]
    if per_micro % data_ways:
        raise ConfigError(f"a micro-batch of {per_micro} rows does not divide over dp*fsdp={data_ways} devices; "
                          "change train.global_batch, train.micro_batches or the mesh")
    return sizes


def _check_pipeline(m: ModelConfig, mesh_cfg: MeshConfig, pp: int) -> None:
    M, V, L = mesh_cfg.pp_microbatches, mesh_cfg.pp_virtual_stages, m.n_layers
    if M < 1:
        raise ConfigError(f"mesh.pp_microbatches={M} must be at least 1")
    if V < 1:
        raise ConfigError(f"mesh.pp_virtual_stages={V} must be at least 1")
    n = pp * V
    if mesh_cfg.pp_light_ends:
        if n < 2:
            raise ConfigError("mesh.pp_light_ends needs at least two stages (pp * pp_virtual_stages >= 2)")
        if (L + 2) % n:
            raise ConfigError(
                f"mesh.pp_light_ends: model.n_layers={L} plus the 2 lighter ends ({L + 2}) is not divisible "
                f"into pp*pp_virtual_stages={pp}*{V}={n} stages; choose n_layers = k*{n} - 2 or drop light ends")
        if (L + 2) // n < 2:
            raise ConfigError(
                f"mesh.pp_light_ends with model.n_layers={L} over {n} stages would leave the first and last "
                "stage without layers; use fewer stages")
    elif L % n:
        raise ConfigError(f"model.n_layers={L} is not divisible into pp*pp_virtual_stages={pp}*{V}={n} stages")
