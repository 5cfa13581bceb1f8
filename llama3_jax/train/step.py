"""The train step: AdamW with warmup + cosine, gradient accumulation, sharded state, and
`Trainer`, the one set-up of a run on a mesh (validate, mesh, state, jitted step, batches).

State is a plain dict {"params", "opt_state", "step", "guard"}; parameters are stored in
`model.param_dtype` and the forward pass casts them to `model.compute_dtype`. One jitted
step with donated state. A bad step (train.recovery.judge: a non-finite loss or gradient,
or a loss spike) applies no update, decided on the device; "step" counts the updates
applied and metrics["skipped"] gives the reason code (0 = none).
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from llama3_jax import config as config_lib
from llama3_jax.config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig
from llama3_jax.data.sources import check_data
from llama3_jax.model import PARAM_AXES, Llama, loss_sum, param_shapes
from llama3_jax.parallel import sharding as shd
from llama3_jax.train import recovery

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


# ---------------------------------------------------------------- state and shardings

def param_shardings(cfg: ModelConfig, mesh) -> dict:
    return shd.param_shardings(PARAM_AXES, param_shapes(cfg), mesh)


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
    scalars = {"step": jnp.zeros((), jnp.int32), "guard": recovery.init_guard()}
    scalars = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd.replicated(mesh)), scalars)
    return {"params": params, "opt_state": opt_state, **scalars}


def state_shardings(abstract):
    return jax.tree.map(lambda a: a.sharding, abstract)


def batch_sharding(mesh):
    return NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), (0, 0), mesh))


def synthetic_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Random tokens, one document per row (for benchmarks)."""
    tok = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=np.ones((batch, seq_len), np.int32),
                positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
                loss_mask=np.ones((batch, seq_len), np.float32))


# ---------------------------------------------------------------- the step

def pretrain_objective(cfg: Config, ordered: bool, hidden_fn=None):
    """`objective(params, batch) -> (summed loss, {"count": tokens, ...sums})`: the next-token
    loss over the batch's loss mask. Post-training stages bring their own (llama3_jax.align),
    which take `hidden_fn(params, batch)` (final hidden states; the pipeline's under pp)."""
    def objective(params, batch):
        return loss_sum(params, batch, cfg.model, ordered), {"count": jnp.sum(batch["loss_mask"])}
    return objective


def make_step(cfg: Config, mesh, mesh_cfg: MeshConfig, objective=pretrain_objective):
    """Un-jitted `step(state, batch) -> (state, metrics)`; trace it under `jax.set_mesh`.

    `objective(cfg, ordered)` gives the summed loss and a dict of sums: "count" (what the
    loss is averaged over: tokens, pairs) and any metrics to average over it. The global
    batch splits into `train.micro_batches` micro-batches whose sums and gradients
    accumulate in float32; dividing once by the batch's count makes the update identical
    to one large batch.
    """
    opt = make_optimizer(cfg.train)
    schedule = lr_schedule(cfg.train)
    micro = cfg.train.micro_batches
    if mesh.shape["pp"] > 1 and objective is pretrain_objective:
        from llama3_jax.train import pipeline
        pipe_grad = pipeline.make_grad_fn(cfg, mesh, mesh_cfg)

        def grad_fn(params, batch):
            loss, grads = pipe_grad(params, batch)
            return (loss, {"count": jnp.sum(batch["loss_mask"])}), grads
    elif mesh.shape["pp"] > 1:  # a post-training objective's head on the pipeline's hidden states
        from llama3_jax.train import pipeline
        grad_fn = jax.value_and_grad(objective(cfg, ordered=mesh.shape["cp"] == 1,
                                               hidden_fn=pipeline.make_hidden_fn(cfg, mesh, mesh_cfg)), has_aux=True)
    else:
        # Context parallelism reorders the tokens (parallel.sharding.cp_order).
        grad_fn = jax.value_and_grad(objective(cfg, ordered=mesh.shape["cp"] == 1), has_aux=True)

    def step(state, batch):
        params = state["params"]
        if micro == 1:
            (loss, sums), grads = grad_fn(params, batch)
        else:
            split = jax.tree.map(lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)

            def accumulate(carry, mb):
                return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                                jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split)))
            ((loss, sums), grads), _ = jax.lax.scan(accumulate, zero, split)
        count = jnp.maximum(sums.pop("count"), 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, grad_norm = loss / count, optax.tree.norm(grads)
        ok, reason, guard = recovery.judge(loss, grad_norm, state["guard"], cfg.train)
        def update():
            updates, opt_state = opt.update(grads, state["opt_state"], params)
            return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                    "step": state["step"] + 1}

        # A branch, not a select: a good step then reads the parameters and moments once, where
        # an element-wise select over them cost about 6% of the step (bench shape, CPU).
        new_state = jax.lax.cond(ok, update, lambda: {k: state[k] for k in ("params", "opt_state", "step")})
        new_state["guard"] = guard
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count,
                   "skipped": reason, **{k: v / count for k, v in sums.items()}}
        return new_state, metrics

    return step


class Trainer:
    """A config set up on a mesh: the one entry point of train.py, the tests and benchmarks.

    `Trainer(cfg, mesh_cfg)` validates everything (`config.validate`) before anything is
    compiled, builds the mesh (over `devices`, default all) and the jitted step. Then:
    `init_state()` or `abstract_state()`, `put(host_batch)` (this process's rows onto the
    mesh), `trainer(state, batch) -> (state, metrics)`, `lower(state, batch)` and `copy(state)`.
    """

    def __init__(self, cfg: Config, mesh_cfg: MeshConfig | None = None, devices=None,
                 process_count: int | None = None, objective=pretrain_objective, batch_axes=None):
        self.cfg = cfg
        self.mesh_cfg = mesh_cfg or MeshConfig()
        devices = list(jax.devices() if devices is None else devices)
        if cfg.model.remat == "offload" and devices[0].platform == "cpu":
            raise ConfigError("model.remat=offload moves activations to pinned host memory, which CPU devices do "
                              "not have; on CPU use save_dots, save_attn_out or full")
        process_count = jax.process_count() if process_count is None else process_count
        self.sizes = config_lib.validate(cfg, self.mesh_cfg, len(devices), process_count)
        check_data(cfg.data, cfg.train.global_batch, process_count)
        recovery.check(cfg.train)
        self.mesh = shd.make_mesh(**self.sizes, devices=devices)
        self._abstract = abstract_state(cfg, self.mesh)
        shardings = state_shardings(self._abstract)
        # {key: logical axes} of a batch; a stage may add per-row values (e.g. reference log-probs).
        self.batch_axes = batch_axes or {k: ("batch", "seq") for k in BATCH_KEYS}
        self._jitted = jax.jit(make_step(cfg, self.mesh, self.mesh_cfg, objective), donate_argnums=0,
                               in_shardings=(shardings, self.batch_shardings()),
                               out_shardings=(shardings, shd.replicated(self.mesh)))
        self._copy = jax.jit(lambda state: jax.tree.map(jnp.copy, state), in_shardings=(shardings,),
                             out_shardings=shardings)
        self._ahead, self._ahead_thread = None, None  # compile_ahead's executable, and its thread

    def copy(self, state):
        """A copy of the state on the devices (dispatched, not waited for), which the next
        step's donation leaves alone: train.checkpoint_copy saves it while that step runs."""
        with jax.set_mesh(self.mesh):
            return self._copy(state)

    def batch_shardings(self) -> dict:
        return {k: NamedSharding(self.mesh, shd.logical_to_spec(axes, (0,) * len(axes), self.mesh))
                for k, axes in self.batch_axes.items()}

    def abstract_state(self):
        """ShapeDtypeStructs with shardings for the train state (no allocation)."""
        return self._abstract

    def init_state(self, params: dict | None = None, seed: int | None = None):
        """A fresh train state created directly sharded; `params` (already on the mesh,
        e.g. from `load_params`) replace the random initialisation."""
        cfg, opt = self.cfg, make_optimizer(self.cfg.train)
        seed = cfg.train.seed if seed is None else seed

        # A program run once: on CPU, LLVM's optimisations took 2.4 of its 2.5 s compile (debug
        # preset, a new job's first start), and running it unoptimised takes milliseconds.
        fast_compile = {"xla_backend_optimization_level": 0} if self.mesh.devices.flat[0].platform == "cpu" else None

        @functools.partial(jax.jit, out_shardings=state_shardings(self._abstract), compiler_options=fast_compile)
        def init(key, given):
            # Given weights replace the random ones (a new value head keeps its initialisation).
            p = Llama(cfg.model, rngs=nnx.Rngs(key)).param_arrays() | (given or {})
            return {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32),
                    "guard": recovery.init_guard()}

        with jax.set_mesh(self.mesh):
            return init(jax.random.key(seed), params)

    def put(self, batch: dict) -> dict:
        """This process's rows onto the mesh, sequences reordered for context parallelism."""
        cp = self.sizes["cp"]
        if cp > 1:
            order = shd.cp_order(batch["tokens"].shape[1], cp)
            batch = {k: v[:, order] for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(batch[k]))
                for k, sh in self.batch_shardings().items() if k in batch}

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs of the global batch (for ahead-of-time compiles)."""
        shape, sh = (self.cfg.train.global_batch, self.cfg.data.seq_len), batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
                for k in BATCH_KEYS}

    def __call__(self, state, batch):
        if self._ahead_thread is not None:  # the first step waits for the compile in flight, not a second one
            self._ahead_thread.join()
            self._ahead_thread = None
        with jax.set_mesh(self.mesh):
            if self._ahead is not None and batch.keys() == set(BATCH_KEYS):
                return self._ahead(state, batch)
            return self._jitted(state, batch)

    def lower(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(state, batch)

    def compile_ahead(self) -> None:
        """Compile the step (from the persistent cache, usually) in a background thread, while
        the caller restores the state and the data position. Steps then run that executable:
        the first waits for it rather than tracing and compiling the step a second time.
        Only for the pretraining batch (a stage's extra batch keys differ)."""
        def work():
            try:
                self._ahead = self.lower(self._abstract, self.abstract_batch()).compile()
            except Exception:  # noqa: BLE001 - the jitted step compiles it, and reports any error
                pass
        # Not a daemon: an exit meanwhile waits for it (a thread killed inside XLA aborts the process).
        self._ahead_thread = threading.Thread(target=work, name="llama3-compile-ahead")
        self._ahead_thread.start()
