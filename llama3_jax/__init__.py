"""Llama 3 pretraining in JAX/XLA.

The package is a room per capability; imports run one way, down this list:

    config/     typed configs, presets, the one `validate`   (standard library only)
    parallel/   the logical-axis rule table, meshes, multi-process start-up
    model/      the Llama 3 model, attention, the loss
    data/       sources, held-out splits, packing, mixing, checkpointable iterators
    formats/    run checkpoints (Orbax), Hugging Face, Meta, the tokenizer, `load`
    infer/      KV-cache generation, int8
    align/      post-training: SFT, reward model, rejection sampling, DPO, PPO/GRPO
    eval/       lm-evaluation-harness on our model (`python -m llama3_jax.evaluate`)
    train/      optimizer and step (`Trainer`), pipeline schedule, held-out loss, metrics, the loop

Public surface: `load`, `Tokenizer`, `Llama`, `Config`, `ModelConfig`, `MeshConfig`,
`load_config`, `load_mesh`, the `llama3-train` / `llama3-convert` commands (also
`python train.py` and `python -m llama3_jax.convert`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from llama3_jax.config import Config, MeshConfig, ModelConfig, load_config, load_mesh
from llama3_jax.formats.tokenizer import Tokenizer
from llama3_jax.formats.weights import load
from llama3_jax.model import Llama

__all__ = ["Config", "Llama", "MeshConfig", "ModelConfig", "Tokenizer", "load", "load_config", "load_mesh"]

# Modules of the flat layout before the package had rooms, and where their contents live now.
MOVED = {
    "llama3_jax.tokenizer": "llama3_jax.formats.tokenizer",
    "llama3_jax.sharding": "llama3_jax.parallel.sharding",
    "llama3_jax.distributed": "llama3_jax.parallel.distributed",
    "llama3_jax.attention": "llama3_jax.model.attention",
    "llama3_jax.corpus": "llama3_jax.data.corpus",
    "llama3_jax.pipeline": "llama3_jax.train.pipeline",
    "llama3_jax.metrics": "llama3_jax.train.metrics",
    "llama3_jax.checkpointing": "llama3_jax.formats.run",
}
# Modules whose contents were split: importing them says where each part went.
SPLIT = {
    "llama3_jax.trainer": "the optimizer, state and step are in llama3_jax.train.step (Trainer), validate is "
                          "llama3_jax.config.validate, the loss is in llama3_jax.model.loss, peak_flops in "
                          "llama3_jax.train.metrics",
    "llama3_jax.checkpoint": "weight names and layouts are in llama3_jax.formats.hf and llama3_jax.formats.meta; "
                             "load is llama3_jax.load",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import llama3_jax.tokenizer` (an old path) gives the module's new home, with a
    warning that names it; a module that was split fails with where its parts went."""

    def find_spec(self, name, path=None, target=None):
        if name in SPLIT:
            raise ImportError(f"{name} no longer exists: {SPLIT[name]}", name=name)
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", FutureWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModules())
