"""`validate`: the one check of a config against a mesh, a device count and a process count.

Imports: the standard library and `config.schema`.
"""

from __future__ import annotations

from llama3_jax.config.schema import STAGES, Config, ConfigError, MeshConfig, ModelConfig


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
    if t.stage in ("rm", "dpo") and t.global_batch % (2 * max(t.micro_batches, 1)):
        raise ConfigError(f"train.stage={t.stage} trains on pairs of rows: give a train.global_batch divisible by "
                          "2 x train.micro_batches")
    for key in ("eval_every", "benchmark_every", "benchmark_limit"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be 0 (off) or positive")
    if t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches={t.eval_batches} must be at least 1")
    if t.benchmark_every and not t.benchmark_tasks.strip():
        raise ConfigError("train.benchmark_every needs train.benchmark_tasks (lm-eval task names, comma-separated)")
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
