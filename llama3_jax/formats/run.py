"""Run directories: the Orbax checkpoints of train.py, read and written.

Layout: RUN_DIR/checkpoints/<step>/{state,data,config}, RUN_DIR/tokenizer.model (the
tokenizer the run trained with) and, for converted checkpoints, RUN_DIR/convert.json.
Orbax writes each step into a temporary directory and renames it only once complete, so a
crash mid-save leaves no step directory that would restore wrong. Parameters are stored
by name with the layer axis stacked, independent of the mesh, so any checkpoint restores
onto any mesh.

`RunSource` reads parameters with TensorStore, any box of them at a time, as Orbax's
Checkpoint Format Guide shows (a zarr array per parameter under the step's `state`
OCDBT key-value store), so exports and placements never gather a whole parameter.
`write_orbax` writes a checkpoint from any `Source` block by block, through Orbax's
public TypeHandler interface, so a converted 8B model is never whole in memory either.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from llama3_jax.config import Config, ConfigError, DataConfig, dtype_of, from_dict, to_dict
from llama3_jax.formats.bpe import check_tokenizer_fits, default_tokenizer, load_tokenizer
from llama3_jax.formats.source import Source, kind_hint, need_dir, new_output
from llama3_jax.formats.tokenizer import Tokenizer
from llama3_jax.model import LAYER_PARAMS, param_shapes

# Written by from-hf / from-meta beside checkpoints/: where the weights came from and their
# special token ids (a converted checkpoint without a tokenizer must not be exported with the
# project's default tokenizer, which an empty data.tokenizer means for train.py runs).
CONVERT_INFO = "convert.json"
DEFAULT_READ_BLOCK = 2 * 2**30


# ---------------------------------------------------------------- train state

def checkpoint_dir(run_dir) -> pathlib.Path:
    return pathlib.Path(run_dir).resolve() / "checkpoints"


def manager(run_dir, *, keep: int = 3, save_every: int = 1, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict | None, cfg: Config,
         force: bool = False) -> bool:
    return mngr.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(to_dict(cfg))))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, log=print):
    """(step, state, data_state) of the newest checkpoint that restores; None if none.

    Call it once the saved config is known to match (a mismatch is not corruption). A
    checkpoint that fails to restore (corrupted or truncated files) is moved aside, never
    deleted (`set_aside`), and the previous one is tried. A checkpoint whose arrays differ
    from `abstract_state` (another version or model) is no corruption: a ConfigError.
    """
    _ignore_closed_loop_wakeups()
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            layout = state_layout(pathlib.Path(mngr.directory) / str(step) / "state")
            check_layout(layout, abstract_state, f"checkpoint at step {step} in {mngr.directory}")
            return restore_step(mngr, step, abstract_state)
        except ConfigError:
            raise  # readable, but not this run's state: no earlier checkpoint would do better
        except Exception as e:  # noqa: BLE001 - any other failure means this step is unusable
            log(f"checkpoint at step {step} could not be restored ({type(e).__name__}: {str(e)[:200]}); "
                + set_aside(mngr, step, "corrupt") + "; trying the previous one")
    return None


def latest_config(mngr: ocp.CheckpointManager) -> Config | None:
    """The config of the newest checkpoint whose config reads; None without checkpoints."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return read_config(pathlib.Path(mngr.directory) / str(step))[0]
        except (OSError, ValueError, ConfigError):
            continue
    return None


def set_aside(mngr: ocp.CheckpointManager, step: int, why: str) -> str:
    """Move checkpoint `step` out of the manager's sight, into RUN/set_aside/, and say where
    (a later save of the same step then succeeds, and nothing is deleted)."""
    src = pathlib.Path(mngr.directory) / str(step)
    dest_dir = pathlib.Path(mngr.directory).parent / "set_aside"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{step}-{why.split()[0]}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{step}-{why.split()[0]}-{n}"
    if jax.process_index() == 0:  # one process moves it; the others wait until it has
        src.rename(dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"llama3_jax set_aside {step}")
    mngr.reload()
    return f"checkpoint {step} ({why}) moved to {dest}"


def _leaf_shapes(tree) -> dict:
    """{'opt_state/1/0/mu/embed': shape} of a pytree of arrays or of Orbax array metadata."""
    def name(k):
        return str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))
    return {"/".join(map(name, path)): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_layout(state_dir) -> dict:
    """{array path: shape} of a checkpoint's train state, from its metadata alone; raises
    when that does not read (the handler raises where a Checkpointer would only warn)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        layout = _leaf_shapes(handler.metadata(pathlib.Path(state_dir)))
    finally:
        handler.close()
    if not layout:
        raise ValueError(f"{state_dir}: the metadata lists no arrays")
    return layout


def check_layout(stored: dict, abstract_state, where: str) -> None:
    """ConfigError when the stored arrays are not those `abstract_state` expects."""
    want = _leaf_shapes(abstract_state)
    diff = ([f"{k}: stored {stored[k]}, now {want[k]}" for k in stored if k in want and stored[k] != want[k]]
            + [f"{k}: not stored" for k in want if k not in stored]
            + [f"{k}: stored, not used now" for k in stored if k not in want])
    if diff:
        more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(f"{where} holds another train state than this run builds ({'; '.join(diff[:4])}{more}): "
                          "it was written by another llama3_jax version or model config; resume it with that, "
                          "or start a new --out")


def _ignore_closed_loop_wakeups() -> None:
    """When a restore fails, Orbax closes its event loop while TensorStore still has reads in
    flight; each read that then completes reports `RuntimeError: Event loop is closed`
    through sys.unraisablehook, a screen of tracebacks about nothing. Drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "llama3_jax", False):
        return

    def hook(u):
        if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed" and u.object is None):
            previous(u)

    hook.llama3_jax = True
    sys.unraisablehook = hook


def restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """(step, state, data_state) of one checkpoint; raises if it does not restore."""
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    jax.block_until_ready(out["state"])
    return step, out["state"], out["data"]


def read_config(path, step: int | None = None) -> tuple[Config, int, pathlib.Path]:
    """(config, step, step directory) of a run directory, its checkpoints/ folder, or one step
    folder: the latest step, or `step`."""
    path = pathlib.Path(path).resolve()
    if (path / "config").exists() and (path / "state").exists():
        step_dir = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = ocp.utils.checkpoint_steps(root) if root.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"{path}: no llama3_jax checkpoint here (expected a train.py run "
                                    "directory, its checkpoints/ folder or a step folder)")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint at step {step} (steps present: {sorted(steps)})")
        step_dir = root / str(max(steps) if step is None else step)
    cfg_file = step_dir / "config" / "metadata"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{step_dir}: checkpoint has no config")
    return from_dict(json.loads(cfg_file.read_text())), int(step_dir.name), step_dir


def run_tokenizer(cfg: Config, run_dir, override=None) -> Tokenizer | None:
    """The tokenizer of a run: `override`, else `data.tokenizer`, else the copy train.py keeps
    in the run directory, else none for a converted checkpoint that came without one, else
    the project's default BPE."""
    run_dir = pathlib.Path(run_dir)
    kept = run_dir / "tokenizer.model"
    path = override or cfg.data.tokenizer or (kept if kept.is_file() else None)
    if path:
        path = pathlib.Path(path)
        if not path.is_file():
            given = "--tokenizer" if override else "data.tokenizer"
            raise FileNotFoundError(f"tokenizer {path} does not exist; fix {given}")
        return load_tokenizer(path)
    if (run_dir / CONVERT_INFO).is_file():
        return None
    return default_tokenizer(cfg.data.default_vocab_size)


# ---------------------------------------------------------------- reading parameters

class RunSource(Source):
    """The parameters of a run's checkpoint (latest, or `step`), read with TensorStore into
    host memory; no JAX device is used, and no process needs the whole array."""

    def __init__(self, path, step: int | None = None, read_block_bytes: int = DEFAULT_READ_BLOCK):
        import tensorstore as ts
        path = need_dir(path)
        if (path / "config.json").exists() or (path / "params.json").exists():
            raise ConfigError(f"{path} is {kind_hint(path)}, not a llama3_jax run directory")
        self.config, self.step, self.step_dir = read_config(path, step)
        self.model = self.config.model
        self.run_dir = self.step_dir.parent.parent  # RUN/checkpoints/<step>
        info = self.run_dir / CONVERT_INFO
        self.converted = json.loads(info.read_text()) if info.is_file() else None
        self.read_block_bytes = read_block_bytes
        state = self.step_dir / "state"
        if (state / "manifest.ocdbt").is_file():
            kvstore = lambda name: {"driver": "ocdbt", "base": state.as_uri() + "/", "path": f"params.{name}/"}  # noqa: E731
        else:  # Orbax without OCDBT: a folder per parameter
            kvstore = lambda name: {"driver": "file", "path": f"{state}/params.{name}/"}  # noqa: E731
        context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        self._stores = {}
        for name, shape in param_shapes(self.model).items():
            try:
                t = ts.open({"driver": "auto", "kvstore": kvstore(name)}, open=True, read=True,
                            context=context).result()
            except ValueError as e:
                raise ConfigError(f"{state}: cannot read parameter {name!r} ({e}); the checkpoint is damaged "
                                  "or was not written by llama3_jax") from None
            if tuple(t.shape) != shape:
                raise ConfigError(f"{self.step_dir}: the stored config does not match the weights "
                                  f"({name}: stored shape {tuple(t.shape)}, shape from config {shape})")
            self._stores[name] = t
        self.dtypes = {k: np.dtype(t.dtype.numpy_dtype) for k, t in self._stores.items()}

    def read(self, name, index=()):
        return np.asarray(self._stores[name][tuple(index)].read().result())

    def layer(self, name, i):
        return self.read(name, (i,))

    def whole(self, name):
        return self.read(name)

    def layers_per_block(self, name: str) -> int:
        """Layers read at once. Where storage chunks hold fewer than all layers (checkpoints
        written by `write_orbax`: one chunk per layer) that is one chunk's worth, which costs
        one decompression per chunk. Where a chunk spans all layers (train.py's own
        checkpoints are chunked by device shard), as many layers as fit in read_block_bytes:
        each block then decompresses the chunks again, trading time for a bounded memory peak."""
        shape = param_shapes(self.model)[name]
        chunk = self._stores[name].chunk_layout.read_chunk.shape[0]
        if chunk and chunk < shape[0]:
            return int(chunk)
        layer_bytes = max(1, math.prod(shape[1:]) * self.dtypes[name].itemsize)
        return int(max(1, min(shape[0], self.read_block_bytes // layer_bytes)))

    def blocks(self, name):
        if name not in LAYER_PARAMS:
            yield 0, self.whole(name)
            return
        n, k = self.model.n_layers, self.layers_per_block(name)
        for start in range(0, n, k):
            yield start, self.read(name, (slice(start, min(n, start + k)),))

    def layers(self, name):
        for start, block in self.blocks(name):
            if name not in LAYER_PARAMS:
                yield None, block
            else:
                yield from ((start + j, block[j]) for j in range(block.shape[0]))


# ---------------------------------------------------------------- writing a checkpoint

class StreamedArray:
    """A parameter Orbax writes without it ever being whole in memory: `blocks()` yields
    (first index along axis 0, block) pieces that together cover the array."""

    def __init__(self, shape, dtype, blocks):
        self.shape, self.dtype, self.blocks = tuple(shape), np.dtype(dtype), blocks
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize


class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler (the same files, metadata and 'np.ndarray' type string, so the
    checkpoint restores like any other) whose `serialize` writes a StreamedArray block by
    block with TensorStore, one whole storage chunk at a time."""

    async def serialize(self, values, infos, args=None):
        import tensorstore as ts
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
                dtype=value.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
                arg=arg)
            t = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            chunk = tuple(t.chunk_layout.write_chunk.shape) if value.ndim else ()
            done = 0
            for start, block in value.blocks():
                block = np.asarray(block, dtype=value.dtype)
                if block.ndim != value.ndim or block.shape[1:] != value.shape[1:]:
                    raise ValueError(f"{info.name}: block of shape {block.shape} for {value.shape}")
                if not value.ndim:
                    await t.write(block)
                else:  # whole storage chunks: no partial-chunk rewrites, small buffers
                    for box in _chunk_boxes(block.shape, chunk, start):
                        local = (slice(box[0].start - start, box[0].stop - start), *box[1:])
                        await t[box].write(block[local])
                done += block.size
            if done != value.size:
                raise ValueError(f"{info.name}: wrote {done} of {value.size} elements")
        return []  # everything is written already: nothing left to commit in the background


def _chunk_boxes(shape, chunk, start: int = 0):
    """Index boxes of the storage chunks covering a block of `shape` that starts at `start`
    along axis 0 (blocks begin and end on chunk boundaries along axis 0, or at the array end)."""
    ranges = []
    for axis, (n, c) in enumerate(zip(shape, chunk)):
        lo = start if axis == 0 else 0
        c = max(1, int(c))
        ranges.append([slice(a, min(a + c, lo + n)) for a in range(lo, lo + n, c)])
    return list(itertools.product(*ranges))


# Storage chunk size of written checkpoints: stacked parameters get one chunk per layer (split
# further past this size), global ones (embeddings) chunks of at most this size.
ORBAX_CHUNK_BYTES = 256 * 2**20


def write_orbax(source: Source, out, *, dtype: str = "float32", tokenizer: pathlib.Path | None = None,
                info: dict | None = None, log=print):
    """OUT/checkpoints/0/{state: {"params": ...}, config}, readable as a train.py run, and
    OUT/convert.json (`info`: origin and special token ids)."""
    cfg = dataclasses.replace(source.model, param_dtype=dtype)
    cfg.validate()
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, cfg)
    out = pathlib.Path(out).resolve()
    with new_output(out) as tmp:
        data = DataConfig()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            data = DataConfig(tokenizer=str(out / "tokenizer.model"))
        full = Config(model=cfg, data=data)
        shapes = param_shapes(cfg)
        tree = {"params": {n: StreamedArray(s, dtype_of(dtype), lambda n=n: source.blocks(n))
                           for n, s in shapes.items()}}
        # One storage chunk per layer for stacked parameters, so exports read them layer by layer.
        save_args = {"params": {n: ocp.SaveArgs(shard_axes=(0,) if n in LAYER_PARAMS else (),
                                                chunk_byte_size=ORBAX_CHUNK_BYTES) for n in shapes}}
        registry = ocp.type_handlers.create_type_handler_registry(
            (StreamedArray, StreamedArrayHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))
        mngr = ocp.CheckpointManager(
            tmp / "checkpoints",
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                           "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree, save_args=save_args),
                                             config=ocp.args.JsonSave(to_dict(full))))
        mngr.wait_until_finished()
        mngr.close()
        (tmp / CONVERT_INFO).write_text(json.dumps({**(info or {}), "tokenizer": tokenizer is not None}, indent=2))
    log(f"wrote {out}: llama3_jax checkpoint (step 0), parameters in {dtype}"
        + (", with tokenizer.model" if tokenizer is not None else ""))
    return out
