"""Long-context extension in stages (Llama 3 paper section 3.4.2: six stages from 8K to
128K tokens). `[[train.context_stages]]` gives each stage's first step, sequence length, and
optionally its global batch (tokens per batch constant), context-parallel size and RoPE base.

Stage 0 is the run's own settings, up to the first context stage's `start_step`; stage i is
`context_stages[i - 1]`. The loop trains one stage, saves at its last step, and starts the
next from that checkpoint on the stage's mesh and sequence length (the state reshards on
restore). Each stage reads its own stream of the sources (seed data.seed + stage), so its
rows are packed at its own length; within a stage a resume is exact, data included, and the
batch numbering (train.skip_batches, rollbacks) runs on across stages.
"""

from __future__ import annotations

import dataclasses
import pathlib

from llama3_jax.config import Config, ConfigError, MeshConfig, validate

# A stage's data stream: seed data.seed + stage x this.
STAGE_SEED = 1_000_033


def stage_of(cfg: Config, step: int) -> int:
    """The stage that trains 0-based step `step` (0: before the first context stage)."""
    return sum(s.start_step <= step for s in cfg.train.context_stages)


def apply(cfg: Config, mesh_cfg: MeshConfig, stage: int) -> tuple[Config, MeshConfig]:
    """The run's config and mesh as stage `stage` trains."""
    if stage == 0:
        return cfg, mesh_cfg
    s = cfg.train.context_stages[stage - 1]
    data = dataclasses.replace(cfg.data, seq_len=s.seq_len, seed=cfg.data.seed + stage * STAGE_SEED)
    train = dataclasses.replace(cfg.train, global_batch=s.global_batch or cfg.train.global_batch)
    model = dataclasses.replace(cfg.model, rope_theta=s.rope_theta or cfg.model.rope_theta)
    mesh_cfg = dataclasses.replace(mesh_cfg, cp=s.cp) if s.cp else mesh_cfg
    return dataclasses.replace(cfg, data=data, train=train, model=model), mesh_cfg


def stage_end(cfg: Config, stage: int) -> int:
    """The step count at which stage `stage` ends (train.steps for the last)."""
    later = [s.start_step for s in cfg.train.context_stages[stage:]]
    return min(later + [cfg.train.steps])


def tokens_at(cfg: Config, step: int) -> int:
    """Tokens trained on in the first `step` steps, stage by stage."""
    starts = [0] + [s.start_step for s in cfg.train.context_stages]
    total = 0
    for stage, start in enumerate(starts):
        if start >= step:
            break
        end = min(starts[stage + 1] if stage + 1 < len(starts) else step, step)
        c = apply(cfg, MeshConfig(), stage)[0]
        total += (end - start) * c.train.global_batch * c.data.seq_len
    return total


def check(cfg: Config, mesh_cfg: MeshConfig, n_devices: int, process_count: int = 1) -> None:
    """Every stage's settings against the mesh and devices, before anything is compiled."""
    stages = cfg.train.context_stages
    starts = [s.start_step for s in stages]
    if any(b <= a for a, b in zip(starts, starts[1:])) or (starts and starts[0] < 1):
        raise ConfigError(f"train.context_stages: start_step values {starts} must be positive and increasing "
                          "(stage 0, the run's own settings, trains from step 0)")
    for i, s in enumerate(stages, 1):
        if s.seq_len < 1 or s.global_batch < 0 or s.cp < 0 or s.rope_theta < 0:
            raise ConfigError(f"train.context_stages[{i - 1}]: seq_len must be positive, and global_batch, cp and "
                              "rope_theta 0 (the run's own) or positive")
        stage_cfg, stage_mesh = apply(cfg, mesh_cfg, i)
        try:
            validate(stage_cfg, stage_mesh, n_devices, process_count)
        except ConfigError as e:
            hint = (" (a stage that changes cp needs a mesh with one axis at -1, e.g. fsdp = -1, to take the "
                    "devices it frees or needs)") if s.cp and -1 not in mesh_cfg.sizes().values() else ""
            raise ConfigError(f"train.context_stages[{i - 1}] (from step {s.start_step}, seq_len {s.seq_len}): "
                              f"{e}{hint}") from None


def latest_step(run_dir) -> int | None:
    """The newest checkpoint's step in a run directory (None: no checkpoint), read before
    the run's mesh is chosen."""
    from llama3_jax.formats import run as run_files
    if not run_files.checkpoint_dir(run_dir).is_dir():
        return None
    steps = run_files.manager(pathlib.Path(run_dir), read_only=True).all_steps()
    return max(steps) if steps else None


def describe(cfg: Config, mesh_cfg: MeshConfig, stage: int) -> str:
    """One line: the stage, its steps, sequence, batch and mesh."""
    c, m = apply(cfg, mesh_cfg, stage)
    start = 0 if stage == 0 else cfg.train.context_stages[stage - 1].start_step
    mesh = " ".join(f"{a}={v}" for a, v in m.sizes().items() if v != 1) or "one device"
    return (f"context stage {stage + 1} of {len(cfg.train.context_stages) + 1}: "
            f"steps {start + 1}-{stage_end(cfg, stage)}, "
            f"seq_len {c.data.seq_len}, global batch {c.train.global_batch} "
            f"({c.train.global_batch * c.data.seq_len:,} tokens), rope_theta {c.model.rope_theta:g}, mesh {mesh}")
