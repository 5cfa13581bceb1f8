"""Meshes and the one table that maps the model's logical axis names to mesh axes.

The mesh has five axes, outermost first: dp, fsdp, pp, cp, tp. Devices are laid out
row-major over that shape, so the tensor axis is innermost, as in the paper's
[TP, CP, PP, DP] order: on the 16-device tp=cp=pp=dp=2 example device 0 shares a TP
group with 1, a CP group with 2, a PP group with 4 and a DP group with 8. On real
accelerators `jax.make_mesh` orders devices so that inner axes land on the fastest links.

Each parallelism lives in RULES (and, for the pipeline, in `llama3_jax.pipeline`):
- data parallel (dp, replicated) and FSDP (fsdp, ZeRO-3): "batch" over both; parameter
  "embed" dims over fsdp, so parameters, gradients and optimizer state are sharded.
- tensor parallel (tp, Megatron): heads, kv_heads, mlp and vocab over tp.
- sequence parallel (tp again): "seq_sp", the residual stream around the norms, is split
  over tp as well as cp, so the norms and residual adds are not replicated over tp.
- context parallel (cp): "seq" over cp; "kv_seq" (keys and values) is gathered.
- pipeline (pp): stored "layers" split over pp in blocks; "stage" is the pipeline's
  stage dimension inside the step (see `llama3_jax.pipeline`).
A dimension that a mesh axis does not divide (kv_heads < tp) is replicated over it, and a
mesh axis is used at most once per array (activations' "embed" is not split over fsdp,
which the batch already uses).
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dp", "fsdp", "pp", "cp", "tp")

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

_active: list[tuple[Mesh, dict]] = []


def logical_to_spec(names, shape, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = [a for a in (table[name] if name else ()) if a not in used and mesh.shape[a] > 1]
        # Replicate over trailing axes that do not divide the dimension (kv_heads < tp).
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules=RULES):
    """Within this context (at trace time), `constrain` pins activations to the mesh."""
    _active.append((mesh, rules))
    try:
        yield mesh
    finally:
        _active.pop()


def constrain(x, names):
    """Annotate an activation with logical axis names; a no-op outside `use_mesh_rules`."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def make_mesh(dp=1, fsdp=1, pp=1, cp=1, tp=1, devices=None) -> Mesh:
    """The 5-axis mesh (dp, fsdp, pp, cp, tp); one size may be -1 for the remaining devices.

    With `devices` given, they are laid out row-major (tp innermost: exactly the paper's
    groups). Otherwise `jax.make_mesh` orders all devices so that the inner axes land on
    the fastest interconnect (NVLink inside a node, the ICI torus on TPU); on CPU that is
    the same row-major order. Axes are Auto: sharding follows the logical-axis rules.
    """
    auto = (AxisType.Auto,) * len(MESH_AXES)
    n = len(jax.devices()) if devices is None else len(devices)
    sizes = resolve_axis_sizes(dict(dp=dp, fsdp=fsdp, pp=pp, cp=cp, tp=tp), n)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(list(devices), dtype=object).reshape(shape), MESH_AXES, axis_types=auto)


def resolve_axis_sizes(sizes: dict, n_devices: int) -> dict:
    from llama3_jax.config import ConfigError
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
                              f"{n_devices} devices; change the mesh file's sizes")
        sizes = {**sizes, wild[0]: n_devices // fixed}
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh {' x '.join(f'{a}={s}' for a, s in sizes.items())} needs {fixed} devices but "
            f"{n_devices} are available; change the mesh file (or set one axis to -1)")
    return sizes


def shardings_for(names_tree, shapes_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of parameters from their logical names and shapes."""
    return jax.tree.map(lambda names, shape: NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)),
                        names_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


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
