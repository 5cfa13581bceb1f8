"""Orbax checkpoints of a run: train state, data-iterator state and the resolved config.

Layout: RUN_DIR/checkpoints/<step>/{state,data,config}. Orbax writes each step into a
temporary directory and renames it only once complete, so a crash mid-save leaves no
step directory that would restore wrong. Parameters are stored by name with the layer
axis stacked, independent of the mesh, so any checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from llama3_jax.config import Config, from_dict, to_dict


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

    A checkpoint that fails to restore (corrupted or truncated files) is reported and
    the previous one is tried; nothing is deleted.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            jax.block_until_ready(out["state"])
            return step, out["state"], out["data"]
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
            log(f"checkpoint at step {step} in {mngr.directory} could not be restored "
                f"({type(e).__name__}: {str(e)[:300]}); trying the previous one")
    return None


def read_config(path) -> tuple[Config, int, pathlib.Path]:
    """(config, step, step directory) of a run directory, its checkpoints dir, or one step dir."""
    path = pathlib.Path(path).resolve()
    if (path / "config").exists() and (path / "state").exists():
        step_dir = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) \
            if root.is_dir() else []
        if not steps:
            raise FileNotFoundError(f"{path}: no llama3_jax checkpoint here (expected a train.py run "
                                    "directory, its checkpoints/ folder, a step folder, or a Hugging Face "
                                    "directory with config.json)")
        step_dir = root / str(steps[0])
    cfg_file = step_dir / "config" / "metadata"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{step_dir}: checkpoint has no config")
    return from_dict(json.loads(cfg_file.read_text())), int(step_dir.name), step_dir


def load_params(path, shardings: dict | None = None) -> tuple:
    """(model config, parameter dict) from a checkpoint, restoring only the parameters.

    `shardings` (by parameter name) places each one; default: the first device.
    """
    cfg, _, step_dir = read_config(path)
    meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=(shardings or {}).get(k, default))
              for k, m in tree["params"].items()}
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype) for k, t in target.items()}
    out = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return cfg.model, dict(out["params"])
