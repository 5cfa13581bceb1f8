"""Pipeline parallelism: the layers split into stages over the `pp` mesh axis.

`make_grad_fn` returns `grad_fn(params, batch) -> (loss_sum, grads)` with exactly the
meaning of `jax.value_and_grad(model.loss_sum)`, computed as a pipeline:

- Layout. With P = pp ranks and V virtual stages per rank there are N = P*V logical
  stages; logical stage s = v*P + p lives on rank p (the interleaved, "circular"
  assignment: a micro-batch passes ranks 0..P-1 V times). Each stage has k layer slots.
  The stored parameters keep their mesh-independent [n_layers, ...] layout; inside the
  step they are rearranged to [P, V, k, ...] with the P dimension sharded over `pp` (the
  "stage" rule of `llama3_jax.parallel.sharding`), so every rank only touches its own stages.
- Schedule. The batch is split into M micro-batches (micro-batch m = rows m, m+M, ...);
  micro-batch m runs virtual stage v on rank p at iteration t = m + v*Mp + p, where
  Mp = max(M, P) when V > 1 (else M). All ranks step together for
  T = (V-1)*Mp + M + P - 1 iterations; after each one every rank hands its activation to
  rank p+1 (rank P-1 wraps round to rank 0 for the next virtual stage) with
  `lax.ppermute`, which compiles to one collective-permute. Rank 0 keeps wrapped
  activations in a ring buffer of Mp - P + 1 slots until their turn. For M >= P (or
  V = 1) the idle fraction is the interleaved schedule's (P-1)/(V*M); for M < P with
  V > 1 the schedule pads M up to P.
- Lock-step. Every rank executes the same instructions in every iteration; idle
  iterations compute on stale data and their results are masked out. Skipping them with
  a `lax.cond` on the rank would deadlock: the automatic axes' collectives inside the
  branch (FSDP all-gathers, resharding permutes) are not entered by every device (seen
  on XLA:CPU). In lock-step the idle time is the bubble either way.
- Ends. The embedding (a gather) runs before the stage loop and the final norm, output
  head and loss after it, as ordinary auto-sharded code; the head's micro-batches are
  split over the pp ranks (when pp divides M), so no stage carries the output layer.
- Light ends (`pp_light_ends`): the first and last logical stage hold one layer fewer,
  so n_layers = k*N - 2 (as Llama 3 405B: 126 layers on pp=16, k=8). Their slot 0 is a
  padding slot, masked like an idle iteration. Since the ends' extra work is outside the
  loop here, this buys layer counts that N does not divide, not balance.
- Backward by autodiff of the forward loop (`lax.scan`): the transpose of ppermute is
  the reverse permute, so the backward pass is the same pipeline run in reverse
  (all forwards, then all backwards, as GPipe, not 1F1B). Parameter gradients
  accumulate in float32 across micro-batches and virtual stages: the stage weights
  enter the loop in float32 and are cast to the compute dtype inside each iteration.
- Rematerialisation (model.remat): "full" checkpoints each (micro-batch, stage)
  computation and keeps only its input activation; "none" keeps every activation, but
  never the stage weights re-sliced in each iteration; the named policies
  (`model.remat_policy`) keep what they name.
- Other axes. The loop runs in a `shard_map` that is manual over `pp` only; dp, fsdp,
  cp and tp stay automatic and follow the same `constrain` annotations as without a
  pipeline (the rules are applied on the shard_map's abstract mesh).

Storage: the stored [n_layers, ...] parameters and their Adam moments are split over `pp`
in contiguous blocks of layers (the "layers" rule), so each rank keeps 1/pp of the layer
weights and optimizer state. With V = 1 a block is exactly the rank's stage; with V > 1
(or light ends) XLA moves the weights to their stages inside the step and the gradients
back, a per-step exchange of layer weights over `pp`, like FSDP's.
Costs: the embedded micro-batches [M, mb, S, dim] are held by every rank in float32 and
their cotangent is all-reduced over `pp`; the last rank's outputs are redistributed to
the ranks for the head.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llama3_jax.config import Config, ConfigError, MeshConfig, ModelConfig, dtype_of
from llama3_jax.model.loss import head_loss
from llama3_jax.model.model import (LAYER_PARAMS, PARAM_AXES, block, embed_tokens, final_hidden, remat_policy,
                                    rope_angles)
from llama3_jax.parallel import sharding as shd

AXIS = "pp"


# ---------------------------------------------------------------- layout and schedule

@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of the stages and the schedule."""
    pp: int
    virtual: int
    microbatches: int
    n_layers: int
    light_ends: bool = False

    @property
    def stages(self) -> int:
        """Logical stages N = pp * V."""
        return self.pp * self.virtual

    @property
    def slots(self) -> int:
        """Layer slots per stage (light ends: the end stages leave one of them empty)."""
        return (self.n_layers + (2 if self.light_ends else 0)) // self.stages

    def stage_layers(self) -> list[list[int]]:
        """Global layer indices of each logical stage, in order."""
        k, n = self.slots, self.stages
        if not self.light_ends:
            return [list(range(s * k, (s + 1) * k)) for s in range(n)]
        out, start = [], 0
        for s in range(n):
            size = k - 1 if s in (0, n - 1) else k
            out.append(list(range(start, start + size)))
            start += size
        return out

    def layer_index(self) -> tuple[np.ndarray, np.ndarray]:
        """([pp, V, k] global layer per slot, [pp, V] whether slot 0 is padding).

        Logical stage s = v*pp + p sits at [p, v]. Padding slots point at layer 0; their
        output is masked away, so they contribute nothing (not even a gradient)."""
        k = self.slots
        index = np.zeros((self.pp, self.virtual, k), np.int32)
        pad = np.zeros((self.pp, self.virtual), bool)
        for s, layers in enumerate(self.stage_layers()):
            p, v = s % self.pp, s // self.pp
            pad[p, v] = len(layers) < k
            index[p, v, k - len(layers):] = layers
        return index, pad

    @property
    def period(self) -> int:
        """Iterations between a micro-batch's visits to rank 0 (Mp)."""
        return max(self.microbatches, self.pp) if self.virtual > 1 else self.microbatches

    @property
    def iterations(self) -> int:
        """Loop length T of the schedule."""
        return (self.virtual - 1) * self.period + self.microbatches + self.pp - 1

    @property
    def ring(self) -> int:
        """Slots of rank 0's buffer for activations wrapping round to the next virtual stage."""
        return self.period - self.pp + 1

    @property
    def bubble_fraction(self) -> float:
        """The interleaved schedule's bubble (pp-1)/(V*M), relative to the useful work."""
        return (self.pp - 1) / (self.virtual * self.microbatches)

    @property
    def schedule_idle_fraction(self) -> float:
        """Idle iterations of this schedule per useful one (= bubble_fraction when M >= pp or V = 1)."""
        useful = self.virtual * self.microbatches
        return (self.iterations - useful) / useful

    def position(self, t: int, p: int) -> tuple[int, int] | None:
        """(micro-batch, virtual stage) that rank p runs at iteration t, or None if idle."""
        u = t - p
        if u < 0:
            return None
        v, m = divmod(u, self.period)
        return (m, v) if m < self.microbatches and v < self.virtual else None


def make_plan(model_cfg: ModelConfig, mesh_cfg: MeshConfig, pp: int) -> Plan:
    """The schedule of a config checked by `config.validate`."""
    return Plan(pp=pp, virtual=mesh_cfg.pp_virtual_stages, microbatches=mesh_cfg.pp_microbatches,
                n_layers=model_cfg.n_layers, light_ends=mesh_cfg.pp_light_ends)




# ---------------------------------------------------------------- parameters by stage

def to_stages(layers: dict, plan: Plan) -> dict:
    """[n_layers, ...] layer params -> [pp, V, k, ...] (rank, virtual stage, slot)."""
    P, V, k = plan.pp, plan.virtual, plan.slots
    if not plan.light_ends:
        # Logical stage s = v*P + p holds layers s*k .. s*k+k-1: split [L] as (V, P, k).
        return {n: jnp.swapaxes(a.reshape(V, P, k, *a.shape[1:]), 0, 1) for n, a in layers.items()}
    index, _ = plan.layer_index()
    flat = index.reshape(-1)
    return {n: jnp.take(a, flat, axis=0).reshape(P, V, k, *a.shape[1:]) for n, a in layers.items()}


def stage_spec(name: str, shape, mesh) -> PartitionSpec:
    """Stage params: the rank dimension over `pp`, the rest as the layer parameter's rule."""
    return shd.logical_to_spec(("stage", None, None) + PARAM_AXES[name][1:], shape, mesh)


# ---------------------------------------------------------------- the pipelined loss

# remat = "none" keeps every activation except cheap data movement: above all, the stage
# weights re-sliced (and cast) in each iteration must not be saved once per iteration.
_RECOMPUTED = frozenset({"convert_element_type", "dynamic_slice", "slice", "squeeze", "reshape",
                         "broadcast_in_dim", "transpose", "gather", "concatenate", "copy", "iota"})


def _keep_activations(prim, *_, **__) -> bool:
    return prim.name not in _RECOMPUTED


def _remat(fn, cfg: ModelConfig):
    policy = _keep_activations if cfg.remat == "none" else remat_policy(cfg.remat)
    return jax.checkpoint(fn, prevent_cse=False, policy=policy)


def _varying(tree):
    """Mark pp-replicated values as per-rank (inside the shard_map; their cotangents are
    then summed over pp)."""
    def one(x):
        return x if AXIS in jax.typeof(x).mat.varying else jax.lax.pcast(x, AXIS, to="varying")
    return jax.tree.map(one, tree)


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _stage_loop(stage_w, x_emb, segment_ids, positions, *, plan: Plan, cfg: ModelConfig, send_perm, ordered):
    """The per-rank program (manual over pp, automatic over the other axes).

    stage_w: this rank's [1, V, k, ...] layer params; x_emb: all micro-batches' embedded
    inputs [M, mb, S, dim] in float32 (used by rank 0; its cotangent is summed over pp, and
    XLA:CPU cannot compile that psum in bfloat16 inside a partly manual shard_map);
    segment_ids, positions: [M, mb, S]. Returns [M, mb, S, dim], the last stage's outputs
    (meaningful on the last rank).

    Every rank runs the same instructions in every iteration; idle iterations compute on
    stale data whose results are masked out. A `lax.cond` on the rank would skip that
    work, but collectives of the automatic axes inside such a branch (all-gathers, the
    gather's resharding) are not entered by all devices and can deadlock; in lock-step
    the idle time is the bubble either way. `constrain` here sees the shard_map's abstract
    mesh, where pp is manual, so activations are pinned over the other axes only.
    """
    x_emb, segment_ids, positions = _varying((x_emb, segment_ids, positions))
    x_emb = x_emb.astype(dtype_of(cfg.compute_dtype))
    stage_w = jax.tree.map(lambda a: a[0], stage_w)  # [V, k, ...] of this rank
    P, V, M, Mp, Q = plan.pp, plan.virtual, plan.microbatches, plan.period, plan.ring
    p = jax.lax.axis_index(AXIS)
    _, pad_table = plan.layer_index()
    pad_of_v = jnp.asarray(pad_table)[p]  # [V]: slot 0 of that stage is padding
    act_names = ("batch", "seq_sp", "embed")

    def stage(x, w_all, v, m, pad):
        w = _index(w_all, v)  # [k, ...] float32: gradients accumulate in float32
        seg, pos = _index(segment_ids, m), _index(positions, m)
        cos, sin = rope_angles(cfg, pos)

        def layer(x, lw):
            return block(x, lw, cos, sin, seg, pos, cfg, ordered)

        if plan.light_ends:  # the first and last stage mask their slot 0 away
            x = jnp.where(pad, x, layer(x, _index(w, 0)))
            w = jax.tree.map(lambda a: a[1:], w)
        x, _ = jax.lax.scan(lambda c, lw: (layer(c, lw), None), x, w)
        return x

    stage = _remat(stage, cfg)

    def iteration(carry, t):
        recv, ring, outs = carry
        u = t - p  # rank p runs micro-batch u % Mp of virtual stage u // Mp
        active = (u >= 0) & (u % Mp < M) & (u // Mp < V)
        v = jnp.clip(u // Mp, 0, V - 1)
        m = jnp.minimum(u % Mp, M - 1)
        if V > 1:  # rank 0 holds activations wrapping round until their micro-batch's turn
            if Q > 1:
                ring = jax.lax.dynamic_update_index_in_dim(ring, recv, t % Q, 0)
                wrapped = jax.lax.dynamic_index_in_dim(ring, (t + 1) % Q, 0, keepdims=False)
            else:
                wrapped = recv
            recv = jnp.where(p == 0, wrapped, recv)
        x = jnp.where((p == 0) & (v == 0), _index(x_emb, m), recv)
        out = shd.constrain(stage(shd.constrain(x, act_names), stage_w, v, m, pad_of_v[v]), act_names)
        last = active & (p == P - 1) & (v == V - 1)
        outs = jax.lax.dynamic_update_index_in_dim(
            outs, jnp.where(last, out, jax.lax.dynamic_index_in_dim(outs, m, 0, keepdims=False)), m, 0)
        if send_perm:
            out = jax.lax.ppermute(out, AXIS, send_perm)
        return (out, ring, outs), None

    act = x_emb[0]
    ring0 = jnp.zeros((Q if V > 1 and Q > 1 else 1, *act.shape), act.dtype)
    init = _varying((jnp.zeros_like(act), ring0, jnp.zeros_like(x_emb)))
    (_, _, outs), _ = jax.lax.scan(iteration, init, jnp.arange(plan.iterations))
    return outs


def split_microbatches(x, M: int, names):
    """[B, ...] -> [M, B/M, ...]; micro-batch m takes rows m, m+M, ..., so every micro-batch
    stays evenly sharded over the data axes."""
    y = jnp.swapaxes(x.reshape(x.shape[0] // M, M, *x.shape[1:]), 0, 1)
    return shd.constrain(y, (None,) + tuple(names))


def _send_perm(plan: Plan):
    P = plan.pp
    if P == 1:
        return [(0, 0)] if plan.virtual > 1 else []
    if plan.virtual > 1:  # the last rank's output wraps round to rank 0's next virtual stage
        return [(i, (i + 1) % P) for i in range(P)]
    return [(i, i + 1) for i in range(P - 1)]


def _last_stage(params: dict, batch: dict, cfg: ModelConfig, mesh, plan: Plan):
    """The last stage's outputs [M, B/M, s, dim] (micro-batch m holds rows m, m+M, ...)."""
    M, P = plan.microbatches, plan.pp
    layers = {n: params[n].astype(jnp.float32) for n in LAYER_PARAMS}
    stage_w = {n: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, stage_spec(n, a.shape, mesh)))
               for n, a in to_stages(layers, plan).items()}
    x = embed_tokens(params["embed"], batch["tokens"], cfg)
    x = split_microbatches(x.astype(jnp.float32), M, ("batch", "seq_sp", "embed"))
    seg, pos = (split_microbatches(batch[k], M, ("batch", "seq")) for k in ("segment_ids", "positions"))
    loop = functools.partial(_stage_loop, plan=plan, cfg=cfg, send_perm=_send_perm(plan),
                             ordered=mesh.shape["cp"] == 1)
    outs = jax.shard_map(loop, mesh=mesh, in_specs=(PartitionSpec(AXIS), PartitionSpec(), PartitionSpec(),
                                                     PartitionSpec()),
                         out_specs=PartitionSpec(AXIS), axis_names={AXIS})(stage_w, x, seg, pos)
    return outs[(P - 1) * M:]  # the last rank's block: the last stage's outputs


def pipeline_loss(params: dict, batch: dict, cfg: ModelConfig, mesh, plan: Plan):
    """Summed token losses of the batch, computed by the pipeline (differentiable).

    The embedding (a gather) runs before the stage loop and the final norm, output head
    and loss after it, as ordinary auto-sharded code: the head's micro-batches are split
    over the pp ranks, so no rank carries the whole output layer's work."""
    M, P = plan.microbatches, plan.pp
    y = _last_stage(params, batch, cfg, mesh, plan)
    targets, mask = (split_microbatches(batch[k], M, ("batch", "seq")) for k in ("targets", "loss_mask"))

    def micro_loss(h, targets, mask):
        return head_loss(final_hidden(h, params["norm"], cfg), params, targets, mask, cfg)

    # Split the micro-batches' head and loss over the pp ranks when they divide evenly.
    losses = jax.vmap(micro_loss, spmd_axis_name=AXIS if M % P == 0 else None)(y, targets, mask)
    return jnp.sum(losses)


def pipeline_hidden(params: dict, batch: dict, cfg: ModelConfig, mesh, plan: Plan):
    """Final-normed hidden states [B, s, dim] in the batch's row order, computed by the
    pipeline (differentiable): what a post-training objective's head takes."""
    y = _last_stage(params, batch, cfg, mesh, plan)
    y = jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])  # undo split_microbatches
    return final_hidden(y, params["norm"], cfg)


def make_grad_fn(cfg: Config, mesh, mesh_cfg: MeshConfig):
    """`grad_fn(params, batch) -> (loss_sum, grads)` with the meaning of
    `jax.value_and_grad(model.loss_sum)(params, batch, cfg.model)`, run as an interleaved
    pipeline over the mesh's `pp` axis (trace it inside jit, under `jax.set_mesh(mesh)`)."""
    plan = make_plan(cfg.model, mesh_cfg, mesh.shape[AXIS])
    loss_and_grad = jax.value_and_grad(pipeline_loss)

    def grad_fn(params, batch):
        b = batch["tokens"].shape[0]
        if b % plan.microbatches:
            raise ConfigError(f"a batch of {b} rows does not divide into mesh.pp_microbatches={plan.microbatches}")
        return loss_and_grad(params, batch, cfg.model, mesh, plan)

    grad_fn.plan = plan
    return grad_fn


def make_hidden_fn(cfg: Config, mesh, mesh_cfg: MeshConfig):
    """`hidden(params, batch)`: `pipeline_hidden` over the mesh's `pp` axis."""
    plan = make_plan(cfg.model, mesh_cfg, mesh.shape[AXIS])
    return functools.partial(pipeline_hidden, cfg=cfg.model, mesh=mesh, plan=plan)
