"""The train step: AdamW with warmup + cosine, gradient accumulation, sharded state.

State is a plain dict {"params", "opt_state", "step"} of float32 master weights; the
forward pass casts weights to the compute dtype. One jitted step with donated state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from llama3_jax import sharding as shd
from llama3_jax.config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig
from llama3_jax.model import PARAM_AXES, Llama, forward, param_shapes

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def lr_schedule(tc: TrainConfig):
    """Linear warmup to the peak, then cosine decay to final_lr_fraction x peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.final_lr_fraction)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    # Weight decay skips the norm gains (1-D parameters), as in Llama's recipe.
    decay_mask = lambda params: {k: v.ndim > 1 for k, v in params.items()}  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                    weight_decay=tc.weight_decay, mask=decay_mask))


def cross_entropy(logits, targets, loss_mask):
    """Summed float32 token losses. The target logit is picked by comparison with an iota,
    so vocab-sharded logits are reduced in place and never gathered onto one device."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
    return jnp.sum((lse - target_logit) * loss_mask)


def loss_sum(params, batch, cfg: ModelConfig):
    logits = forward(params, batch["tokens"], cfg, batch["segment_ids"], batch["positions"])
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


# ---------------------------------------------------------------- state and shardings

def param_shardings(cfg: ModelConfig, mesh):
    return {name: NamedSharding(mesh, shd.logical_to_spec(PARAM_AXES[name], shape, mesh))
            for name, shape in param_shapes(cfg).items()}


def abstract_state(cfg: Config, mesh):
    """ShapeDtypeStructs with shardings for the whole train state (no allocation)."""
    opt = make_optimizer(cfg.train)
    p_sh = param_shardings(cfg.model, mesh)
    params = {k: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.model.param_dtype), sharding=p_sh[k])
              for k, s in param_shapes(cfg.model).items()}
    opt_state = jax.eval_shape(opt.init, params)
    # Moments follow their parameter's sharding; counters are replicated.
    opt_sh = optax.tree_map_params(opt, lambda _, s: s, opt_state, p_sh,
                                   transform_non_params=lambda _: shd.replicated(mesh))
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_state, opt_sh)
    return {"params": params, "opt_state": opt_state,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))}


def state_shardings(abstract):
    return jax.tree.map(lambda a: a.sharding, abstract)


def init_state(cfg: Config, mesh, seed: int | None = None, params=None):
    """A fresh train state, created directly sharded (no full copy on one device)."""
    abstract = abstract_state(cfg, mesh)
    opt = make_optimizer(cfg.train)
    seed = cfg.train.seed if seed is None else seed

    @functools.partial(jax.jit, out_shardings=state_shardings(abstract))
    def init(key, given):
        p = given if given is not None else Llama(cfg.model, rngs=nnx.Rngs(key)).param_arrays()
        return {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32)}

    with shd.use_mesh_rules(mesh):
        return init(jax.random.key(seed), params)


def load_init_params(cfg: Config, mesh, path) -> dict:
    """Weights (only) from a llama3_jax checkpoint, placed directly with this mesh's shardings."""
    from llama3_jax import checkpointing
    src_cfg, _, _ = checkpointing.read_config(path)
    want, got = param_shapes(cfg.model), param_shapes(src_cfg.model)
    if want != got:
        diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        raise ConfigError(f"train.init_from={path}: its shapes differ from this model config "
                          f"(checkpoint vs config: {diff}); use the matching model config")
    _, params = checkpointing.load_params(path, shardings=param_shardings(cfg.model, mesh))
    dtype = jnp.dtype(cfg.model.param_dtype)
    return {k: v.astype(dtype) for k, v in params.items()}


def batch_sharding(mesh):
    return NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), (0, 0), mesh))


# ---------------------------------------------------------------- the step

def make_train_step(cfg: Config, mesh, mesh_cfg: MeshConfig | None = None):
    """Jitted `step(state, batch) -> (state, metrics)` with donated state.

    The global batch splits into `train.micro_batches` micro-batches whose summed losses
    and gradients accumulate in float32; dividing once by the batch's token count makes
    the update identical to one large batch.
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    opt = make_optimizer(cfg.train)
    schedule = lr_schedule(cfg.train)
    abstract = abstract_state(cfg, mesh)
    micro = cfg.train.micro_batches
    if mesh.shape["pp"] > 1:
        from llama3_jax import pipeline
        grad_fn = pipeline.make_grad_fn(cfg, mesh, mesh_cfg)
    else:
        def grad_fn(params, batch):
            return jax.value_and_grad(loss_sum)(params, batch, cfg.model)

    def step(state, batch):
        params = state["params"]
        if micro == 1:
            loss, grads = grad_fn(params, batch)
        else:
            split = jax.tree.map(lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                loss, grads = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            (loss, grads), _ = jax.lax.scan(accumulate, zero, split)
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        grads = jax.tree.map(lambda g: g / n_tokens, grads)
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": loss / n_tokens, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), "tokens": n_tokens}
        return new_state, metrics

    b_sh = batch_sharding(mesh)
    jitted = jax.jit(step, donate_argnums=0,
                     in_shardings=(state_shardings(abstract), {k: b_sh for k in BATCH_KEYS}),
                     out_shardings=(state_shardings(abstract), shd.replicated(mesh)))

    def run(state, batch):
        with shd.use_mesh_rules(mesh):
            return jitted(state, batch)

    run.jitted = jitted
    run.lower = lambda state, batch: _lower(jitted, mesh, state, batch)
    return run


def _lower(jitted, mesh, state, batch):
    with shd.use_mesh_rules(mesh):
        return jitted.lower(state, batch)


# ---------------------------------------------------------------- input validation

def validate(cfg: Config, mesh_cfg: MeshConfig, n_devices: int, process_count: int = 1) -> dict:
    """Clear errors before any compile: mesh, heads, sequence and batch divisibility."""
    sizes = shd.resolve_axis_sizes(mesh_cfg.sizes(), n_devices)
    m, t = cfg.model, cfg.train
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
    if pp > 1:  # pipeline settings first: the batch checks below divide by them
        from llama3_jax import pipeline
        pipeline.validate(m, mesh_cfg, sizes)
    data_ways = sizes["dp"] * sizes["fsdp"]
    if t.global_batch % t.micro_batches:
        raise ConfigError(f"train.global_batch={t.global_batch} does not divide into "
                          f"train.micro_batches={t.micro_batches}")
    per_micro = t.global_batch // t.micro_batches
    if pp > 1:
        per_micro //= max(1, mesh_cfg.pp_microbatches)
        if (t.global_batch // t.micro_batches) % mesh_cfg.pp_microbatches:
            raise ConfigError(f"the batch of {t.global_batch // t.micro_batches} rows does not divide into "
                              f"mesh.pp_microbatches={mesh_cfg.pp_microbatches}")
    if per_micro % data_ways:
        raise ConfigError(f"a micro-batch of {per_micro} rows does not divide over dp*fsdp={data_ways} devices; "
                          "change train.global_batch, train.micro_batches or the mesh")
    if t.global_batch % process_count:
        raise ConfigError(f"train.global_batch={t.global_batch} does not divide over {process_count} processes")
    return sizes


def peak_flops(device, configured: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from its kind (None if unknown)."""
    if configured:
        return configured
    kind = device.device_kind.lower()
    table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "v6": 918e12, "v5p": 459e12,
             "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12}
    for key, value in table.items():
        if key in kind:
            return value
    if device.platform == "cpu":
        return measure_cpu_flops()
    return None


@functools.cache
def measure_cpu_flops(n: int = 512, reps: int = 8) -> float:
    """Measured float32 matmul FLOP/s of the host CPU (the CPU 'peak' for MFU)."""
    import time
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: functools.reduce(lambda x, _: x @ a, range(reps), a))
    f(a).block_until_ready()
    start = time.perf_counter()
    f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def abstract_batch(mesh, batch: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global batch on `mesh` (for ahead-of-time compiles)."""
    sh = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
            for k in BATCH_KEYS}


def synthetic_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Random tokens, one document per row (for benchmarks)."""
    tok = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=np.ones((batch, seq_len), np.int32),
                positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
                loss_mask=np.ones((batch, seq_len), np.float32))


def host_batch_to_global(batch: dict, mesh, cp: int):
    """Place this process's rows onto the mesh, reordering sequences for context parallelism."""
    if cp > 1:
        order = shd.cp_order(batch["tokens"].shape[1], cp)
        batch = {k: v[:, order] for k, v in batch.items()}
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(batch[k])) for k in BATCH_KEYS}
