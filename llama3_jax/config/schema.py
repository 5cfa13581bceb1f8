"""The config dataclasses: [model], [data], [train], [align] of a run, and [mesh].

Imports: the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
    # Held-out data for train.eval_every: sources never trained on (same format as sources),
    # or else this fraction of each source's documents (a fixed choice by index), which
    # training then never reads. The default corpus holds out 2% of its files when this is 0.
    eval_sources: tuple[DataSource, ...] = ()
    eval_fraction: float = 0.0
    # Annealing (Llama 3 paper section 3.1.3): the last anneal_steps steps of train.steps read
    # this mix instead (same format as sources; e.g. the high-quality shards upsampled).
    anneal_sources: tuple[DataSource, ...] = ()
    anneal_steps: int = 0


STAGES = ("pretrain", "sft", "rm", "dpo", "ppo")


@dataclass(frozen=True)
class ContextStage:
    """A stage of long-context training ([[train.context_stages]]): from step `start_step`
    (0-based, the first step it trains) on, rows of `seq_len` tokens, and optionally another
    global batch (so that tokens per batch stay constant), context-parallel size (the mesh's
    -1 axis takes the devices it frees or needs) and RoPE base. 0 = the run's own value."""
    start_step: int
    seq_len: int
    global_batch: int = 0
    cp: int = 0
    rope_theta: float = 0.0


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
    # Save from a copy of the state on the devices, so the next step runs while Orbax takes
    # it to the host: a save then costs about no step time, for one more copy of the train
    # state in device memory (for models far from filling it, like the debug presets).
    checkpoint_copy: bool = False
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
    # Pretraining: loss and perplexity on eval_batches held-out batches (data.eval_sources)
    # every eval_every steps and at the end (0 = off); lm-evaluation-harness tasks (names,
    # comma-separated; benchmark_include: a folder of task YAMLs) every benchmark_every
    # steps and at the end, on at most benchmark_limit examples per task (0 = all).
    eval_every: int = 0
    eval_batches: int = 4
    benchmark_every: int = 0
    benchmark_tasks: str = ""
    benchmark_include: str = ""
    benchmark_limit: int = 0
    # Long-context extension in stages (Llama 3 paper section 3.4.2; train.context): each
    # stage change saves, then resumes on the stage's mesh and sequence length.
    context_stages: tuple[ContextStage, ...] = ()


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

