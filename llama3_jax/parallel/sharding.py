"""Meshes and the one table that maps the model's logical axis names to mesh axes.

The mesh has five axes, outermost first: dp, fsdp, pp, cp, tp. Devices are laid out
row-major over that shape, so the tensor axis is innermost, as in the paper's
[TP, CP, PP, DP] order: on the 16-device tp=cp=pp=dp=2 example device 0 shares a TP
group with 1, a CP group with 2, a PP group with 4 and a DP group with 8. On real
accelerators `jax.make_mesh` orders devices so that inner axes land on the fastest links.

Each parallelism lives in RULES (and, for the pipeline, in `llama3_jax.train.pipeline`):
- data parallel (dp, replicated) and FSDP (fsdp, ZeRO-3): "batch" over both; parameter
  "embed" dims over fsdp, so parameters, gradients and optimizer state are sharded.
- tensor parallel (tp, Megatron): heads, kv_heads, mlp and vocab over tp.
- sequence parallel (tp again): "seq_sp", the residual stream around the norms, is split
  over tp as well as cp, so the norms and residual adds are not replicated over tp.
- context parallel (cp): "seq" over cp; "kv_seq" (keys and values) is gathered.
- pipeline (pp): stored "layers" split over pp in blocks; "stage" is the pipeline's
  stage dimension inside the step (see `llama3_jax.train.pipeline`).
A dimension that a mesh axis does not divide (kv_heads < tp) is replicated over it, and a
mesh axis is used at most once per array (activations' "embed" is not split over fsdp,
which the batch already uses). Each parameter dimension replicated that way is logged once.

The mesh is JAX's ambient mesh: code that runs the model on a mesh enters
`jax.set_mesh(mesh)`, and `constrain` (called by the model at trace time) reads it with
`jax.sharding.get_abstract_mesh()`. Outside a mesh `constrain` does nothing (one device).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llama3_jax.config import MESH_AXES, MeshConfig

log = logging.getLogger(__name__)

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("dp", "fsdp")),
    ("seq", ("cp",)),
    ("seq_sp", ("cp", "tp")),
    ("kv_seq", ()),
    ("embed", ("fsdp",)),
    ("embed_norm", ()),
    ("heads", ("tp",)),
    ("kv_heads", ("tp",)),
    ("head_dim", ()),
    ("mlp", ("tp",)),
    ("vocab", ("tp",)),
    ("layers", ("pp",)),
    ("stage", ("pp",)),
)
_TABLE = dict(RULES)


def logical_to_spec(names, shape, mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`, on a
    mesh or abstract mesh (axes that are manual there, as inside `shard_map`, are skipped)."""
    return _spec(tuple(names), tuple(shape), _mesh_shape(mesh))[0]


def _mesh_shape(mesh) -> tuple[tuple[str, int], ...]:
    """(axis, size) of the mesh's axes that sharding rules may use: not manual, size > 1."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    return tuple((a, n) for a, n in mesh.shape.items() if n > 1 and types.get(a) != AxisType.Manual)


def _spec(names, shape, mesh_shape) -> tuple[PartitionSpec, list[tuple[int, str]]]:
    """(spec, [(dimension, axis) replicated because the axis does not divide it])."""
    sizes = dict(mesh_shape)
    used: set[str] = set()
    spec, dropped = [], []
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is not None and name not in _TABLE:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = [a for a in (_TABLE[name] if name else ()) if a not in used and a in sizes]
        # Replicate over trailing axes that do not divide the dimension (kv_heads < tp).
        while axes and size % math.prod(sizes[a] for a in axes):
            dropped.append((dim, axes.pop()))
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec), dropped


def param_sharding(name: str, names, shape, mesh: Mesh) -> NamedSharding:
    """A parameter's sharding; each dimension a mesh axis cannot divide is logged once."""
    spec, dropped = _spec(tuple(names), tuple(shape), _mesh_shape(mesh))
    for dim, axis in dropped:
        _log_replicated(name, dim, names[dim], shape[dim], axis, mesh.shape[axis])
    return NamedSharding(mesh, spec)


def param_shardings(axes: dict, shapes: dict, mesh: Mesh) -> dict:
    """{name: sharding} of parameters of `shapes` whose dimensions carry logical `axes`
    (the model's PARAM_AXES)."""
    return {name: param_sharding(name, axes[name], shape, mesh) for name, shape in shapes.items()}


@functools.cache
def _log_replicated(name, dim, logical, size, axis, axis_size) -> None:
    log.warning("parameter %s: dimension %d (%s, size %d) is not divisible by mesh axis %s=%d, so it "
                "is replicated over %s", name, dim, logical, size, axis, axis_size, axis)


def constrain(x, names):
    """Pin an activation to the ambient mesh by its logical axis names (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def make_mesh(dp=1, fsdp=1, pp=1, cp=1, tp=1, devices=None) -> Mesh:
    """The 5-axis mesh (dp, fsdp, pp, cp, tp); one size may be -1 for the remaining devices.

    With `devices` given, they are laid out row-major (tp innermost: exactly the paper's
    groups). Otherwise `jax.make_mesh` orders all devices so that the inner axes land on
    the fastest interconnect (NVLink inside a node, the ICI torus on TPU); on CPU that is
    the same row-major order. Axes are Auto (`jax.make_mesh` defaults to Explicit):
    sharding follows the logical-axis rules.
    """
    auto = (AxisType.Auto,) * len(MESH_AXES)
    n = len(jax.devices()) if devices is None else len(devices)
    sizes = MeshConfig(dp=dp, fsdp=fsdp, pp=pp, cp=cp, tp=tp).resolve(n)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(list(devices), dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def fold_pp_cp(mesh: Mesh) -> Mesh:
    """The same devices in the same order with pp and cp folded into fsdp (tp and dp kept):
    a mesh for code that has no pipeline or context-parallel form, such as the KV-cache
    generator sampling PPO's rollouts on a pp or cp training mesh. `mesh` itself when it
    has neither. Parameters move onto it by `jax.device_put` to its `param_sharding`s."""
    s = mesh.shape
    if s["pp"] == 1 and s["cp"] == 1:
        return mesh
    # (dp, fsdp, pp, cp, tp) row-major: fsdp, pp and cp are adjacent, so a reshape merges them.
    shape = (s["dp"], s["fsdp"] * s["pp"] * s["cp"], 1, 1, s["tp"])
    return Mesh(mesh.devices.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cp_order(seq_len: int, cp: int) -> np.ndarray:
    """Token order for load-balanced context parallelism.

    The sequence is cut into 2*cp chunks and cp rank i holds chunks i and 2*cp-1-i, so each
    rank gets equal causal work. Splitting the reordered sequence contiguously over `cp`
    gives exactly that; attention masks by positions, so the order changes nothing else.
    """
    chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)])
