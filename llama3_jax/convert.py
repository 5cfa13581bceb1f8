"""Convert checkpoints: train.py runs (Orbax) <-> Hugging Face <-> Meta.

    python -m llama3_jax.convert to-hf     RUN OUT [--step N] [--dtype bfloat16] [--max-shard-size 5GB]
    python -m llama3_jax.convert to-meta   RUN OUT [--step N] [--shards 1] [--dtype bfloat16]
    python -m llama3_jax.convert from-hf   HF_DIR OUT [--dtype float32]
    python -m llama3_jax.convert from-meta META_DIR OUT [--rope-scaling-factor F] [--dtype float32]
    python -m llama3_jax.convert random-hf PRESET OUT [--dtype bfloat16]   (random weights, for tests)

`COMMAND --help` describes each. from-hf / from-meta write OUT/checkpoints/0/{state,config} like
a train.py run, so `train.py ... train.init_from=OUT` and `llama3_jax.load(OUT)` read it.

How it streams. Every conversion is a *source* joined to a *writer*: the source yields our
parameters by name (`llama3_jax.model.param_shapes`), in our layout, stacked ones in blocks of
consecutive layers; the writer converts each layer and writes it to its final place in the
output straight away. At most one block plus one converted layer is in memory, never a model.

- Run checkpoints (Orbax) are read with TensorStore, one parameter block at a time, straight
  into host memory: no device is involved, so a checkpoint written by any mesh or any number
  of processes exports without being gathered anywhere. A block is as many layers as the
  storage chunks make cheap to read, capped by --read-block-size (train.py's own checkpoints
  are chunked per device shard, which spans every layer; reading those in blocks of k layers
  decompresses the parameter L/k times).
- Orbax checkpoints are written through Orbax (so they read like any run) with a TypeHandler
  that writes each stacked parameter layer by layer into one chunk per layer.
- safetensors files are written by planning every file's header first (the config gives every
  shape), then writing each tensor's bytes at its offset.
- Meta consolidated.NN.pth files are torch zip archives: a skeleton holding every tensor is saved
  with `torch.serialization.skip_data` over fake tensors (no memory), then each tensor's bytes
  are written at the offset of its record in the archive.
- Hugging Face and Meta files are read memory-mapped (`torch.load(mmap=True, weights_only=True)`)
  tensor by tensor; the maps are dropped after each parameter so pages read leave the process.

Layouts. Ours keeps Meta's names and Meta's adjacent-pair rotary layout, so Meta tensors only
need `checkpoint.to_torch_layout` / `from_torch_layout`; Hugging Face's q/k permutation is
`checkpoint.meta_to_hf_qk` / `hf_to_meta_qk` (via `ours_to_hf_tensor` / `hf_tensor_to_ours`)
and nothing else.

Meta's model-parallel shards split wq, wk, wv, w1, w3, output and tok_embeddings on dim 0 and
wo, w2 on dim 1; norms are replicated. With more shards than kv heads (--shards 16 for 8 kv
heads), each kv head is repeated on shards // n_kv_heads consecutive shards and params.json
says n_kv_heads = shards, as in Meta's Llama 3.1 405B "MP16" release: Meta's code gives every
shard one kv head, and the model computes exactly the same function. from-meta reads such
directories back as they are (n_kv_heads = shards); when params.json states fewer kv heads than
the shards hold, the repeated heads are checked to be identical and collapsed.

Meta's params.json has no RoPE scaling factor: `use_scaled_rope: true` means factor 8 in Meta's
code, but Llama 3.2 1B and 3B were trained with 32. from-meta therefore uses 32 when the shapes
are those of 3.2 1B / 3B and 8 otherwise, and --rope-scaling-factor overrides both. to-meta adds
`rope_scaling_factor` (and `rope_low_freq_factor`, `rope_high_freq_factor`,
`rope_original_max_position`) to params.json only when they differ from what from-meta would
assume, so exports of the released shapes keep Meta's exact key set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from llama3_jax.checkpoint import (HF_NAMES, META_NAMES, SafetensorsDir, config_from_hf, config_to_hf,
                                   from_torch_layout, hf_tensor_to_ours, ours_to_hf_tensor,
                                   tensor_names, to_torch_layout, torch_shape)
from llama3_jax.config import Config, ConfigError, DataConfig, ModelConfig, load_config, to_dict
from llama3_jax.model import LAYER_PARAMS, param_shapes

DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DEFAULT_READ_BLOCK = 2 * 2**30
# Memory-mapped inputs are re-opened after this many bytes were read from them, so the pages
# read (file-backed, but counted in the process's resident memory) do not accumulate.
REMAP_BYTES = 2**30
# Written by from-hf / from-meta beside checkpoints/: where the weights came from and their
# special token ids (a converted checkpoint without a tokenizer must not be exported with the
# project's default tokenizer, which an empty data.tokenizer means for train.py runs).
CONVERT_INFO = "convert.json"

# Meta's model-parallel split dimension of each of our parameters (None: replicated).
META_SPLIT_DIM = {"embed": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                  "wo": 1, "w2": 1, "attention_norm": None, "ffn_norm": None, "norm": None}
# Meta's hard-coded llama3 RoPE scaling constants (besides the factor).
META_ROPE = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_position": 8192}


class ConvertError(ConfigError):
    """Input that cannot be converted: wrong kind of directory, mismatched config and weights..."""


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2**30 * 2, '100MB', '123' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"size {text!r} must look like 5GB, 500MB or 2GiB")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# ===================================================================================== sources

class Source:
    """Our parameters, one block at a time. `model` is the ModelConfig."""

    model: ModelConfig

    def blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first layer, block [k, ...]) for stacked parameters; (0, array) once for global ones."""
        raise NotImplementedError

    def layers(self, name: str) -> Iterator[tuple[int | None, np.ndarray]]:
        """(layer, array) for each layer of a stacked parameter; (None, array) for a global one."""
        for start, block in self.blocks(name):
            if name in LAYER_PARAMS:
                for j in range(block.shape[0]):
                    yield start + j, block[j]
            else:
                yield None, block


def _kind_hint(path: pathlib.Path) -> str:
    if (path / "config.json").exists():
        return "a Hugging Face directory (convert it with from-hf)"
    if (path / "params.json").exists() or list(path.glob("consolidated.*.pth")):
        return "a Meta directory (convert it with from-meta)"
    if (path / "checkpoints").is_dir() or (path / "state").is_dir():
        return "a llama3_jax run/checkpoint (export it with to-hf or to-meta)"
    return "not a checkpoint this tool knows"


def _need_dir(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ConvertError(f"{path} is a file; expected a directory")
    return path


class RunSource(Source):
    """A train.py run directory (or its checkpoints/ or one step folder), read with TensorStore.

    Parameters are read block by block into host memory; no JAX device is used.
    """

    def __init__(self, path, step: int | None = None, read_block_bytes: int = DEFAULT_READ_BLOCK):
        import orbax.checkpoint as ocp

        from llama3_jax import checkpointing
        path = _need_dir(path)
        if (path / "config.json").exists() or (path / "params.json").exists():
            raise ConvertError(f"{path} is {_kind_hint(path)}, not a llama3_jax run directory")
        if step is None:
            self.config, self.step, self.step_dir = checkpointing.read_config(path)
        else:
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            step_dir = root / str(step)
            if not (step_dir / "state").is_dir():
                have = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
                raise FileNotFoundError(f"{path}: no checkpoint at step {step} (steps present: {have or 'none'})")
            self.config, self.step, self.step_dir = checkpointing.read_config(step_dir)
        self.model = self.config.model
        self.read_block_bytes = read_block_bytes
        info = self.step_dir.parent.parent / CONVERT_INFO  # RUN/checkpoints/<step>
        self.converted = json.loads(info.read_text()) if info.is_file() else None
        state = self.step_dir / "state"
        try:
            meta = ocp.PyTreeCheckpointer().metadata(state)
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for a damaged folder
            raise ConvertError(f"{state}: cannot read the checkpoint's metadata ({type(e).__name__}: {e})") from None
        tree_meta = getattr(meta, "item_metadata", meta)
        tree = tree_meta.tree
        self._use_zarr3 = bool(getattr(tree_meta, "use_zarr3", False))
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state)
        stored = (tree.get("params") or {}) if isinstance(tree, dict) else {}
        want = param_shapes(self.model)
        missing = [k for k in want if k not in stored]
        if missing:
            raise ConvertError(f"{state}: no parameter(s) {missing} in the checkpoint; expected {list(want)}")
        bad = {k: (tuple(stored[k].shape), want[k]) for k in want if tuple(stored[k].shape) != want[k]}
        if bad:
            raise ConvertError(f"{self.step_dir}: the stored config does not match the weights "
                               f"(parameter: (stored shape, shape from config) {bad})")
        self.dtypes = {k: np.dtype(stored[k].dtype) for k in want}
        self._state = state
        self._ctx = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)

    def _open(self, name: str):
        import orbax.checkpoint as ocp
        import tensorstore as ts
        info = ocp.type_handlers.ParamInfo(name=f"params.{name}", parent_dir=self._state,
                                           is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3,
                                           ts_context=self._ctx)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
        return ts.open(ts.Spec(spec), open=True, read=True, context=self._ctx).result()

    def layers_per_block(self, name: str, t=None) -> int:
        """Layers read at once. Where storage chunks hold fewer than all layers (checkpoints
        written by this tool: one chunk per layer) that is one chunk's worth, which costs one
        decompression per chunk. Where a chunk spans all layers (train.py's own checkpoints are
        chunked by device shard), as many layers as fit in read_block_bytes: each block then
        decompresses the chunks again, trading time for a bounded memory peak."""
        shape = param_shapes(self.model)[name]
        chunk = None
        if t is not None:
            try:
                chunk = t.chunk_layout.read_chunk.shape[0]
            except (AttributeError, TypeError, IndexError):
                chunk = None
        if chunk and chunk < shape[0]:
            return int(chunk)
        layer_bytes = max(1, math.prod(shape[1:]) * self.dtypes[name].itemsize)
        return int(max(1, min(shape[0], self.read_block_bytes // layer_bytes)))

    def blocks(self, name):
        t = self._open(name)
        if name not in LAYER_PARAMS:
            yield 0, np.asarray(t.read().result())
            return
        n = t.shape[0]
        k = self.layers_per_block(name, t)
        for start in range(0, n, k):
            yield start, np.asarray(t[start:min(n, start + k)].read().result())


class HFSource(Source):
    """A Hugging Face LlamaForCausalLM directory (config.json + safetensors), tensor by tensor."""

    def __init__(self, path):
        path = _need_dir(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ConvertError(f"{path} has no config.json: it is {_kind_hint(path)}, not a Hugging Face model")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_file} is not valid JSON: {e}") from None
        try:
            self.model = config_from_hf(hf)
        except KeyError as e:
            raise ConvertError(f"{cfg_file} lacks {e} and so is not a Llama config") from None
        self.path = path
        self.hf_config = hf
        self.reader = SafetensorsDir(path)
        self._validate()

    def _validate(self):
        cfg, names = self.model, tensor_names(self.model, HF_NAMES)
        have = set(self.reader.weight_map)
        expected = {hf for _, _, hf in names}
        missing = [hf for _, _, hf in names if hf not in have]
        if missing:
            raise ConvertError(f"{self.path}: {len(missing)} tensor(s) that config.json implies are missing, "
                               f"e.g. {missing[:3]}; the config does not match the weights or a shard is incomplete")
        ignorable = re.compile(r".*rotary_emb\.inv_freq$" + (r"|lm_head\.weight$" if cfg.tie_embeddings else ""))
        extra = sorted(n for n in have - expected if not ignorable.match(n))
        if extra:
            raise ConvertError(f"{self.path}: {len(extra)} tensor(s) a Llama 3 model does not have, "
                               f"e.g. {extra[:3]}; the config does not match the weights")
        for name, _, hf in names:
            got, want = self.reader.shape(hf), torch_shape(name, cfg)
            if got != want:
                raise ConvertError(f"{self.path}: tensor {hf} has shape {got} but config.json implies {want}; "
                                   "the config does not match the weights")
        self.reader.close()

    def _get(self, hf_name: str) -> np.ndarray:
        w = self.reader.get(hf_name)
        self._mapped += w.nbytes
        if self._mapped > REMAP_BYTES:  # drop the memory maps: the pages read leave the process
            self.reader.close()
            self._mapped = 0
        return w

    _mapped = 0

    def blocks(self, name):
        try:
            if name in LAYER_PARAMS:
                for i in range(self.model.n_layers):
                    w = self._get(HF_NAMES[name].format(i=i))
                    yield i, hf_tensor_to_ours(name, w, self.model)[None]
            else:
                yield 0, hf_tensor_to_ours(name, self._get(HF_NAMES[name]), self.model)
        finally:
            self.reader.close()

    def special_ids(self) -> tuple:
        return self.hf_config.get("bos_token_id"), self.hf_config.get("eos_token_id")

    def tokenizer_file(self, scratch: pathlib.Path) -> pathlib.Path | None:
        """A tiktoken tokenizer.model for this model: the one shipped (original/), else one
        derived from a byte-level BPE tokenizer.json, else None."""
        for cand in (self.path / "original" / "tokenizer.model", self.path / "tokenizer.model"):
            if cand.is_file() and _is_tiktoken_file(cand):
                return cand
        tj = self.path / "tokenizer.json"
        if tj.is_file():
            try:
                ranks = ranks_from_tokenizer_json(tj)
            except ConvertError as e:
                print(f"note: {tj} not converted to tokenizer.model ({e})", file=sys.stderr)
                return None
            out = scratch / "tokenizer.model"
            write_tiktoken_file(ranks, out)
            return out
        return None


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


def _meta_rope_defaults(dims: dict) -> dict:
    """The llama3 RoPE settings from-meta assumes for a model of these shapes (see module doc)."""
    factor = 8.0
    for preset in ("llama3.2-1b", "llama3.2-3b"):
        p = load_config(preset).model
        if all(dims.get(k) == getattr(p, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")):
            factor = p.rope_scaling_factor
    return {"rope_scaling_factor": factor, **META_ROPE}


class MetaSource(Source):
    """A Meta directory: params.json + consolidated.NN.pth model-parallel shards (merged here)."""

    def __init__(self, path, rope_scaling_factor: float | None = None, log=print):
        path = _need_dir(path)
        self.path = path
        pfile = path / "params.json"
        files = sorted(path.glob("consolidated.*.pth"))
        if not pfile.exists() or not files:
            what = "params.json" if not pfile.exists() else "consolidated.*.pth files"
            raise ConvertError(f"{path} has no {what}: it is {_kind_hint(path)}, not a Meta Llama checkpoint")
        idx = []
        for f in files:
            m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
            if not m:
                raise ConvertError(f"{f}: unexpected shard name (expected consolidated.NN.pth)")
            idx.append(int(m.group(1)))
        if sorted(idx) != list(range(len(idx))):
            gaps = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ConvertError(f"{path}: missing shard(s) {', '.join(f'consolidated.{i:02d}.pth' for i in gaps)} "
                               f"(found {len(idx)} of at least {max(idx) + 1})")
        self.files = [f for _, f in sorted(zip(idx, files))]
        try:
            params = json.loads(pfile.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{pfile} is not valid JSON: {e}") from None
        need = ("dim", "n_layers", "n_heads")
        if any(k not in params for k in need):
            raise ConvertError(f"{pfile} lacks {[k for k in need if k not in params]}; not a Llama params.json")
        self.params = params
        shards = self._load()
        first = shards[0]
        n = len(shards)
        emb = META_NAMES["embed"]
        if emb not in first:
            raise ConvertError(f"{self.files[0]} has no {emb}; not a Llama checkpoint")
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            vocab = first[emb].shape[0] * n
        dims = dict(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                    n_kv_heads=params.get("n_kv_heads") or params["n_heads"], vocab_size=vocab)
        defaults = _meta_rope_defaults(dims)
        rope = {}
        if params.get("use_scaled_rope") or rope_scaling_factor is not None:
            rope = {k: params.get(k, v) for k, v in defaults.items()}
            if rope_scaling_factor is not None:
                rope["rope_scaling_factor"] = float(rope_scaling_factor)
                if not params.get("use_scaled_rope"):
                    log(f"note: params.json has no use_scaled_rope; scaling RoPE by {rope_scaling_factor} as asked")
            elif "rope_scaling_factor" not in params and defaults["rope_scaling_factor"] != 8.0:
                log(f"note: use_scaled_rope with the shapes of Llama 3.2 1B/3B: using factor "
                    f"{defaults['rope_scaling_factor']:g} (Meta's code says 8; override with --rope-scaling-factor)")
        kv_stored = dims["n_kv_heads"]
        hd = dims["dim"] // dims["n_heads"]
        wk0 = first.get(META_NAMES["wk"].format(i=0))
        if wk0 is not None and wk0.shape[0] * n != kv_stored * hd and wk0.shape[0] == hd and n % kv_stored == 0:
            self.kv_repeat = n // kv_stored  # one (repeated) kv head per shard; params.json gives the true count
        else:
            self.kv_repeat = 1
        self.n_shards = n
        try:
            self.model = ModelConfig(
                **dims, multiple_of=params.get("multiple_of", 256),
                ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=float(params.get("rope_theta", 10000.0)),
                max_seq_len=131072 if rope else 8192,
                **({} if not rope else {k: (int(v) if k == "rope_original_max_position" else float(v))
                                        for k, v in rope.items()}))
            self.model.validate()
        except (TypeError, ValueError) as e:
            raise ConvertError(f"{pfile}: {e}") from None
        out_key = META_NAMES["output"]
        tied = out_key not in first
        if not tied:
            tied = (first[out_key].shape == first[emb].shape
                    and all(np.array_equal(_torch_to_numpy(s[out_key]), _torch_to_numpy(s[emb])) for s in shards))
        self.model = dataclasses.replace(self.model, tie_embeddings=tied)
        self._validate(shards)
        del shards

    def _load(self) -> list[dict]:
        import torch
        out = []
        for f in self.files:
            try:
                out.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise ConvertError(f"{f}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
        return out

    def _validate(self, shards):
        cfg = self.model
        for name, _, key in tensor_names(cfg, META_NAMES):
            missing = [str(f.name) for f, s in zip(self.files, shards) if key not in s]
            if missing:
                raise ConvertError(f"{self.path}: tensor {key} is missing from {missing}; "
                                   "the shards are incomplete or params.json does not match them")
            shapes = [tuple(s[key].shape) for s in shards]
            if len(set(shapes)) != 1:
                raise ConvertError(f"{self.path}: shards disagree on the shape of {key}: {shapes}")
            dim, want = META_SPLIT_DIM[name], torch_shape(name, cfg)
            got = list(shapes[0])
            if dim is not None:
                reps = self.kv_repeat if name in ("wk", "wv") else 1
                got[dim] = got[dim] * len(shards) // reps
            if tuple(got) != want:
                raise ConvertError(f"{self.path}: {key} merged from {len(shards)} shard(s) has shape {tuple(got)} "
                                   f"but params.json implies {want}; params.json does not match the weights "
                                   "(or shards are missing)")

    def _merged(self, shards, name: str, key: str) -> np.ndarray:
        parts = [_torch_to_numpy(s[key]) for s in shards]
        dim = META_SPLIT_DIM[name]
        if dim is None:
            if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
                raise ConvertError(f"{self.path}: replicated tensor {key} differs between shards")
            return parts[0]
        if name in ("wk", "wv") and self.kv_repeat > 1:
            r = self.kv_repeat
            for g in range(0, len(parts), r):
                if any(not np.array_equal(parts[g], parts[g + j]) for j in range(1, r)):
                    raise ConvertError(f"{self.path}: {key}: shards {g}..{g + r - 1} should hold the same "
                                       "repeated kv head but differ")
            parts = parts[::r]
        return np.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]

    def blocks(self, name):
        shards = self._load()
        try:
            key = META_NAMES[name]
            if name in LAYER_PARAMS:
                mapped = 0
                for i in range(self.model.n_layers):
                    w = self._merged(shards, name, key.format(i=i))
                    mapped += w.nbytes
                    if mapped > REMAP_BYTES:  # re-map: the pages read so far leave the process
                        shards, mapped = self._load(), 0
                    yield i, from_torch_layout(name, w, self.model)[None]
            else:
                yield 0, from_torch_layout(name, self._merged(shards, name, key), self.model)
        finally:
            del shards

    def tokenizer_file(self) -> pathlib.Path | None:
        f = self.path / "tokenizer.model"
        return f if f.is_file() and _is_tiktoken_file(f) else None

    def special_ids(self) -> tuple:
        f = self.tokenizer_file()
        if f is not None:
            tok = _load_tokenizer(f)
            return tok.bos_id, tok.eos_id
        return (128000, 128001) if self.model.vocab_size >= 128256 else (None, None)


class RandomSource(Source):
    """Random weights of a config's shapes, made fast for large shapes (tests, memory checks):
    float32 values that bfloat16 holds exactly, +-[1/128, 1/64) for weights, [1, 2) for norms."""

    def __init__(self, model: ModelConfig, seed: int = 0):
        self.model, self.seed = model, seed

    def blocks(self, name):
        shape = param_shapes(self.model)[name]
        rng = np.random.default_rng([self.seed, list(param_shapes(self.model)).index(name)])
        exponent = 0x3F80 if name in ("attention_norm", "ffn_norm", "norm") else 0x3C00

        def one(s):
            out = np.empty(s, np.uint32)
            for a in range(0, s[0], 1024):  # row blocks keep the temporaries small
                bits = rng.integers(0, 1 << 16, out[a:a + 1024].shape, dtype=np.uint16)
                out[a:a + 1024] = (bits & (0x007F if exponent == 0x3F80 else 0x807F)) | exponent
            out <<= 16
            return out.view(np.float32)

        if name in LAYER_PARAMS:
            for i in range(shape[0]):
                yield i, one((1, *shape[1:]))
        else:
            yield 0, one(shape)


# ===================================================================================== output files

def _start_output(out) -> tuple[pathlib.Path, pathlib.Path]:
    """(final path, temporary sibling to write into); the final path must be new or empty."""
    out = pathlib.Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} already exists and is not empty; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def _finish_output(tmp: pathlib.Path, out: pathlib.Path):
    if out.exists():
        out.rmdir()  # empty, checked in _start_output
    tmp.rename(out)


def _pwrite(fd: int, arr: np.ndarray, offset: int):
    buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    while len(buf):
        n = os.pwrite(fd, buf[: 1 << 30], offset)
        buf, offset = buf[n:], offset + n


class SafetensorsWriter:
    """One .safetensors file whose header is planned up front; tensors are written at their offsets.

    Format: 8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}} padded with spaces to a multiple of 8, then the tensors' bytes.
    """

    def __init__(self, path, entries: list[tuple[str, tuple, str, int]], metadata: dict | None = None):
        header, offsets, pos = {}, {}, 0
        for name, shape, st_dtype, nbytes in entries:
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            offsets[name] = pos
            pos += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.offsets, self.base = pathlib.Path(path), offsets, 8 + len(raw)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, len(raw).to_bytes(8, "little") + raw)
        os.ftruncate(self.fd, self.base + pos)

    def write(self, name: str, arr: np.ndarray):
        _pwrite(self.fd, arr, self.base + self.offsets[name])

    def close(self):
        os.close(self.fd)


def write_hf(source: Source, out, *, dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9,
             bos_id: int | None = 128000, eos_id: int | None = 128001, tokenizer: pathlib.Path | None = None,
             log=print):
    """A Hugging Face LlamaForCausalLM directory from `source`, written tensor by tensor."""
    cfg, nd = source.model, np_dtype(dtype)
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, cfg)
    out, tmp = _start_output(out)
    try:
        entries = []  # (our name, layer, hf name, shape, nbytes), in the order the source yields
        for name in param_shapes(cfg):
            shape = torch_shape(name, cfg)
            nbytes = math.prod(shape) * nd.itemsize
            layers = range(cfg.n_layers) if name in LAYER_PARAMS else [None]
            entries += [(name, i, HF_NAMES[name].format(i=i), shape, nbytes) for i in layers]
        groups, size = [[]], 0
        for e in entries:
            if groups[-1] and size + e[4] > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e[4]
        n = len(groups)
        files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        writers, where = [], {}
        for fname, group in zip(files, groups):
            planned = [(e[2], e[3], SAFETENSORS_DTYPES[dtype], e[4]) for e in group]
            writers.append(SafetensorsWriter(tmp / fname, planned, {"format": "pt"}))
            where.update({e[2]: len(writers) - 1 for e in group})
        try:
            for name in param_shapes(cfg):
                for i, arr in source.layers(name):
                    hf_name = HF_NAMES[name].format(i=i)
                    w = ours_to_hf_tensor(name, arr, cfg)
                    writers[where[hf_name]].write(hf_name, np.ascontiguousarray(w, dtype=nd))
        finally:
            for w in writers:
                w.close()
        if n > 1:
            index = {"metadata": {"total_size": sum(e[4] for e in entries)},
                     "weight_map": {e[2]: files[where[e[2]]] for e in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, bos_id, eos_id, dtype), indent=2))
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                               indent=2))
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model_max_length=cfg.max_seq_len)
        _finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: {len(entries)} tensors in {n} safetensors file(s), {dtype}"
        + (", with tokenizer" if tokenizer is not None else ""))
    return out


# ------------------------------------------------------------------------------ Meta

def meta_ffn_params(cfg: ModelConfig) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's formula gives cfg.ffn_dim exactly."""
    want = cfg.ffn_dim

    def gives(mo, mult):
        return dataclasses.replace(cfg, ffn_hidden=None, multiple_of=mo, ffn_dim_multiplier=mult).ffn_dim == want

    if gives(cfg.multiple_of, cfg.ffn_dim_multiplier):
        return cfg.multiple_of, cfg.ffn_dim_multiplier
    base = int(2 * 4 * cfg.dim / 3)
    if base <= 0:
        raise ConvertError(f"dim={cfg.dim} is too small for Meta's FFN formula")
    mos = [cfg.multiple_of] + [2**k for k in range(12, -1, -1) if 2**k != cfg.multiple_of]
    for decimals in range(1, 7):
        mult = round(want / base, decimals)
        for mult_c in (None, cfg.ffn_dim_multiplier, mult):
            for mo in mos:
                if mo <= want and gives(mo, mult_c):
                    return mo, mult_c
    if gives(want, want / base):
        return want, want / base
    raise ConvertError(f"no multiple_of / ffn_dim_multiplier make Meta's FFN formula give {want} for dim={cfg.dim}")


def meta_params(cfg: ModelConfig, n_kv_heads: int | None = None) -> dict:
    """Meta's params.json for `cfg` (see the module doc for the RoPE keys added when needed)."""
    mo, mult = meta_ffn_params(cfg)
    p = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
         "n_kv_heads": n_kv_heads or cfg.n_kv_heads, "vocab_size": cfg.vocab_size, "multiple_of": mo,
         "ffn_dim_multiplier": mult, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
         "use_scaled_rope": cfg.rope_scaling_factor is not None}
    if cfg.rope_scaling_factor is not None:
        defaults = _meta_rope_defaults(dataclasses.asdict(cfg))
        for k, v in defaults.items():
            if getattr(cfg, k) != v:
                p[k] = getattr(cfg, k)
    return p


def _torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _save_pth_skeleton(path: pathlib.Path, entries: list[tuple[str, tuple]], dtype: str) -> dict[str, int]:
    """Save a torch checkpoint of `entries` without their data; return each tensor's data offset."""
    import torch
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
    except ImportError:  # pragma: no cover - plain torch.empty is lazily allocated anyway
        import contextlib
        mode = contextlib.nullcontext()
    tdt = _torch_dtype(dtype)
    with mode:
        sd = {name: torch.empty(shape, dtype=tdt) for name, shape in entries}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(sd, path)
    del sd
    itemsize = np_dtype(dtype).itemsize
    offsets = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        records = {}
        for info in z.infolist():
            m = re.fullmatch(r"[^/]+/data/(\d+)", info.filename)
            if m:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
                    raise RuntimeError(f"{path}: unexpected torch archive layout")
                n_name, n_extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                records[int(m.group(1))] = (info.header_offset + 30 + n_name + n_extra, info.file_size)
    if sorted(records) != list(range(len(entries))):
        raise RuntimeError(f"{path}: expected {len(entries)} storages, found {len(records)}")
    for k, (name, shape) in enumerate(entries):  # storages are numbered in the order they are pickled
        off, size = records[k]
        if size != math.prod(shape) * itemsize:
            raise RuntimeError(f"{path}: storage {k} has {size} bytes, {name} needs {math.prod(shape) * itemsize}")
        offsets[name] = off
    return offsets


def _meta_order(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """(our name, layer) in the order of Meta's state_dict."""
    order = [("embed", None)]
    for i in range(cfg.n_layers):
        order += [(n, i) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")]
    return order + [("norm", None), ("output", None)]


def write_meta(source: Source, out, *, shards: int = 1, dtype: str = "bfloat16",
               tokenizer: pathlib.Path | None = None, log=print):
    """Meta's layout: consolidated.NN.pth (model-parallel shards), params.json, tokenizer.model."""
    cfg, nd = source.model, np_dtype(dtype)
    if shards < 1:
        raise ConvertError("--shards must be at least 1")
    kv = cfg.n_kv_heads
    problems = [f"n_heads={cfg.n_heads}" if cfg.n_heads % shards else "",
                f"vocab_size={cfg.vocab_size}" if cfg.vocab_size % shards else "",
                f"ffn_dim={cfg.ffn_dim}" if cfg.ffn_dim % shards else "",
                f"n_kv_heads={kv}" if kv % shards and shards % kv else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConvertError(f"cannot split into {shards} model-parallel shards: {', '.join(problems)} "
                           f"must divide by {shards} (kv heads may instead divide {shards}, then they are repeated)")
    kv_repeat = shards // kv if shards > kv else 1
    params = meta_params(cfg, n_kv_heads=kv * kv_repeat)
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, cfg)
    out, tmp = _start_output(out)
    try:
        def shard_shape(name):
            shape = list(torch_shape(name, cfg))
            dim = META_SPLIT_DIM[name]
            if dim is not None:
                shape[dim] = shape[dim] * (kv_repeat if name in ("wk", "wv") else 1) // shards
            return tuple(shape)

        order = _meta_order(cfg)
        entries = [(META_NAMES[n].format(i=i), shard_shape(n)) for n, i in order]
        fds, offsets = [], []
        for s in range(shards):
            path = tmp / f"consolidated.{s:02d}.pth"
            offsets.append(_save_pth_skeleton(path, entries, dtype))
            fds.append(os.open(path, os.O_WRONLY))
        try:
            for name in param_shapes(cfg):
                for i, arr in source.layers(name):
                    t = np.ascontiguousarray(to_torch_layout(name, arr, cfg), dtype=nd)
                    targets = ["embed", "output"] if name == "embed" and cfg.tie_embeddings else [name]
                    for target in targets:
                        key = META_NAMES[target].format(i=i)
                        for s, piece in enumerate(_split_for_meta(target, t, shards, kv_repeat, cfg)):
                            _pwrite(fds[s], piece, offsets[s][key])
        finally:
            for fd in fds:
                os.close(fd)
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        _finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: {shards} shard(s), {dtype}" + (f", kv heads repeated x{kv_repeat}" if kv_repeat > 1 else "")
        + (", with tokenizer.model" if tokenizer is not None else ""))
    return out


def _split_for_meta(name: str, t: np.ndarray, shards: int, kv_repeat: int, cfg: ModelConfig) -> list:
    dim = META_SPLIT_DIM[name]
    if dim is None or shards == 1:
        return [t] * shards
    if name in ("wk", "wv") and kv_repeat > 1:
        heads = t.reshape(cfg.n_kv_heads, cfg.head_dim, t.shape[1])
        return [heads[s // kv_repeat] for s in range(shards)]
    return np.split(t, shards, axis=dim)


# ------------------------------------------------------------------------------ Orbax

class StreamedArray:
    """A parameter Orbax writes without it ever being whole in memory: `blocks()` yields
    (first index along axis 0, block) pieces that together cover the array."""

    def __init__(self, shape, dtype, blocks: Callable[[], Iterator[tuple[int, np.ndarray]]]):
        self.shape, self.dtype, self._blocks = tuple(shape), np.dtype(dtype), blocks
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize


def _streamed_handler():
    """An Orbax TypeHandler that writes StreamedArray block by block with TensorStore. It is
    Orbax's own numpy handler (same files, metadata and 'np.ndarray' type string, so the
    checkpoint restores like any other) except for how the bytes arrive."""
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                spec = ocp.type_handlers.get_json_tspec_write(
                    info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape,
                    local_shape=value.shape, dtype=value.dtype,
                    process_index=0 if info.is_ocdbt_checkpoint else None, arg=arg)
                t = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
                chunk = tuple(t.chunk_layout.write_chunk.shape) if value.ndim else ()
                done = 0
                for start, block in value._blocks():
                    block = np.asarray(block, dtype=value.dtype)
                    if block.ndim != value.ndim or block.shape[1:] != value.shape[1:]:
                        raise ValueError(f"{info.name}: block of shape {block.shape} for {value.shape}")
                    if not value.ndim:
                        await t.write(block)
                    else:  # one whole storage chunk at a time: no partial-chunk rewrites, small buffers
                        for box in _chunk_boxes(block.shape, chunk, start):
                            local = (slice(box[0].start - start, box[0].stop - start), *box[1:])
                            await t[box].write(block[local])
                    done += block.size
                if done != value.size:
                    raise ValueError(f"{info.name}: wrote {done} of {value.size} elements")

    return StreamedArrayHandler()


def _chunk_boxes(shape, chunk, start: int = 0):
    """Index boxes of the storage chunks covering a block of `shape` that starts at `start`
    along axis 0 (blocks begin and end on chunk boundaries along axis 0, or at the array end)."""
    import itertools
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
    import orbax.checkpoint as ocp

    cfg = dataclasses.replace(source.model, param_dtype=dtype)
    cfg.validate()
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, cfg)
    out, tmp = _start_output(out)
    try:
        data = DataConfig()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            data = DataConfig(tokenizer=str(out / "tokenizer.model"))
        full = Config(model=cfg, data=data)
        shapes = param_shapes(cfg)
        tree = {"params": {n: StreamedArray(s, np_dtype(dtype), lambda n=n: source.blocks(n))
                           for n, s in shapes.items()}}
        # One storage chunk per layer for stacked parameters, so exports read them layer by layer.
        save_args = {"params": {n: ocp.SaveArgs(shard_axes=(0,) if n in LAYER_PARAMS else (),
                                                chunk_byte_size=ORBAX_CHUNK_BYTES) for n in shapes}}
        import jax
        registry = ocp.type_handlers.create_type_handler_registry(
            (StreamedArray, _streamed_handler()), (jax.Array, ocp.type_handlers.ArrayHandler()))
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
        _finish_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}: llama3_jax checkpoint (step 0), parameters in {dtype}"
        + (", with tokenizer.model" if tokenizer is not None else ""))
    return out


# ===================================================================================== tokenizer

def _is_tiktoken_file(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    lines = head.splitlines()[:5]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines)


def read_tiktoken_file(path) -> dict[bytes, int]:
    import base64
    ranks = {}
    for line in pathlib.Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def write_tiktoken_file(ranks: dict[bytes, int], path):
    import base64
    lines = [base64.b64encode(tok) + b" " + str(rank).encode()
             for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    pathlib.Path(path).write_bytes(b"\n".join(lines) + b"\n")


def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character table: printable Latin-1 bytes
    stand for themselves, the rest map in order to U+0100 upwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def ranks_from_tokenizer_json(path) -> dict[bytes, int]:
    """tiktoken ranks (token bytes -> id) from a byte-level BPE tokenizer.json whose regular
    vocabulary is ids 0..n-1 (as Llama 3's)."""
    d = json.loads(pathlib.Path(path).read_text())
    model = d.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model:
        raise ConvertError("not a BPE tokenizer")
    inv = {c: b for b, c in _byte_to_unicode().items()}
    ranks = {}
    for tok, i in model["vocab"].items():
        try:
            ranks[bytes(inv[c] for c in tok)] = i
        except KeyError:
            raise ConvertError(f"token {tok!r} is not byte-level BPE") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConvertError("vocabulary ids are not 0..n-1")
    return ranks


def _load_tokenizer(path):
    from llama3_jax.tokenizer import Tokenizer
    try:
        return Tokenizer(path)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _check_tokenizer_fits(path: pathlib.Path, cfg: ModelConfig):
    tok = _load_tokenizer(path)
    if tok.n_words > cfg.vocab_size:
        raise ConvertError(f"tokenizer {path} has {tok.n_words} ids but the model's vocab_size is {cfg.vocab_size}")


def write_hf_tokenizer(tokenizer_model, out: pathlib.Path, model_max_length: int = 131072):
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) for a tiktoken
    tokenizer.model in Llama 3's format, and a copy of it as original/tokenizer.model.

    The BPE merges are every split (a, b) of a token into two tokens, ranked by the merged
    token's rank, which is the order tiktoken merges in; `ignore_merges` makes a piece that is
    itself a token encode as that token, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from llama3_jax.tokenizer import LLAMA3_SPLIT_PATTERN

    tok = _load_tokenizer(tokenizer_model)
    ranks = read_tiktoken_file(tokenizer_model)
    b2u = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    merges = []
    for b, r in ranks.items():
        for k in range(1, len(b)):
            ra, rb = ranks.get(b[:k]), ranks.get(b[k:])
            if ra is not None and rb is not None:
                merges.append((r, ra, rb, text(b[:k]), text(b[k:])))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True,
                                fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda x: x[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if hf.token_to_id(s) != i:
            raise ConvertError(f"special token {s} would get id {hf.token_to_id(s)} instead of {i}")
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    hf.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": "<|end_of_text|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        **special_map, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s, i in specials},
    }, indent=2))
    (out / "original").mkdir(exist_ok=True)
    shutil.copyfile(tokenizer_model, out / "original" / "tokenizer.model")


def run_tokenizer(config: Config, override=None, converted: dict | None = None, run_dir=None) -> tuple:
    """(tokenizer.model path or None, bos id, eos id) of a checkpoint: --tokenizer, else the
    config's data.tokenizer, else the copy train.py keeps in the run directory, else for
    converted checkpoints none (ids from convert.json), else the project's default tokenizer."""
    from llama3_jax.tokenizer import default_tokenizer
    kept = pathlib.Path(run_dir) / "tokenizer.model" if run_dir is not None else None
    path = override or config.data.tokenizer or (kept if kept is not None and kept.is_file() else None)
    if path:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"the run's tokenizer {path} does not exist; pass --tokenizer PATH")
        tok = _load_tokenizer(path)
    elif converted is not None:
        return None, converted.get("bos_token_id"), converted.get("eos_token_id")
    else:
        tok = default_tokenizer(config.data.default_vocab_size)
    return pathlib.Path(tok.path), tok.bos_id, tok.eos_id


# ===================================================================================== commands

def cmd_to_hf(args):
    src = RunSource(args.src, step=args.step, read_block_bytes=parse_size(args.read_block_size))
    tok, bos, eos = run_tokenizer(src.config, args.tokenizer, src.converted, src.step_dir.parent.parent)
    write_hf(src, args.dst, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
             bos_id=bos, eos_id=eos, tokenizer=tok)
    return 0


def cmd_to_meta(args):
    src = RunSource(args.src, step=args.step, read_block_bytes=parse_size(args.read_block_size))
    tok, _, _ = run_tokenizer(src.config, args.tokenizer, src.converted, src.step_dir.parent.parent)
    write_meta(src, args.dst, shards=args.shards, dtype=args.dtype, tokenizer=tok)
    return 0


def cmd_from_hf(args):
    import tempfile
    src = HFSource(args.src)
    with tempfile.TemporaryDirectory() as scratch:
        tok = src.tokenizer_file(pathlib.Path(scratch))
        bos, eos = src.special_ids()
        write_orbax(src, args.dst, dtype=args.dtype, tokenizer=tok,
                    info={"converted_from": "hf", "source": str(src.path.resolve()),
                          "bos_token_id": bos, "eos_token_id": eos})
    return 0


def cmd_from_meta(args):
    src = MetaSource(args.src, rope_scaling_factor=args.rope_scaling_factor)
    bos, eos = src.special_ids()
    write_orbax(src, args.dst, dtype=args.dtype, tokenizer=src.tokenizer_file(),
                info={"converted_from": "meta", "source": str(src.path.resolve()),
                      "bos_token_id": bos, "eos_token_id": eos})
    return 0


def cmd_random_hf(args):
    model = load_config(args.src, args.overrides).model
    write_hf(RandomSource(model, args.seed), args.dst, dtype=args.dtype,
             max_shard_bytes=parse_size(args.max_shard_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m llama3_jax.convert", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    src_help = {"RUN": "train.py run directory (or its checkpoints/ folder, or one step folder)",
                "HF_DIR": "Hugging Face LlamaForCausalLM directory (config.json + *.safetensors)",
                "META_DIR": "Meta directory (params.json + consolidated.NN.pth [+ tokenizer.model])",
                "PRESET": "config preset name in configs/ or a .toml path"}

    def add(name, help, description, src, dst):
        c = sub.add_parser(name, help=help, description=description, formatter_class=fmt)
        c.add_argument("src", metavar=src, help=src_help[src])
        c.add_argument("dst", metavar=dst, help="output directory (must be new or empty)")
        return c

    c = add("to-hf", "run checkpoint -> Hugging Face LlamaForCausalLM directory",
            "Export a train.py checkpoint as a Hugging Face directory: config.json, generation_config.json,\n"
            "safetensors (sharded with model.safetensors.index.json past --max-shard-size) and the tokenizer\n"
            "(tokenizer.json, tokenizer_config.json, original/tokenizer.model) of the run.", "RUN", "OUT")
    c.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="tensor dtype (default bfloat16)")
    c.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    c.add_argument("--tokenizer", default=None,
                   help="tokenizer.model to export (default: the run's data.tokenizer, else the project's BPE)")
    c.add_argument("--read-block-size", default="2GiB", help="most bytes of one parameter read at once")
    c.set_defaults(func=cmd_to_hf)

    c = add("to-meta", "run checkpoint -> Meta consolidated.NN.pth + params.json",
            "Export a train.py checkpoint in Meta's layout: consolidated.NN.pth model-parallel shards (dim 0\n"
            "for wq, wk, wv, w1, w3, output, tok_embeddings; dim 1 for wo, w2; norms replicated), params.json\n"
            "and tokenizer.model. More shards than kv heads repeat each kv head (as Meta's 405B MP16).",
            "RUN", "OUT")
    c.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    c.add_argument("--shards", type=int, default=1, help="model-parallel shards (default 1)")
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="tensor dtype (default bfloat16)")
    c.add_argument("--tokenizer", default=None, help="tokenizer.model to copy (default: the run's)")
    c.add_argument("--read-block-size", default="2GiB", help="most bytes of one parameter read at once")
    c.set_defaults(func=cmd_to_meta)

    c = add("from-hf", "Hugging Face LlamaForCausalLM directory -> llama3_jax checkpoint",
            "Convert a Hugging Face Llama directory to OUT/checkpoints/0 (a run layout): use it with\n"
            "`train.py ... train.init_from=OUT` or `llama3_jax.load(OUT)`. The tokenizer (original/tokenizer.model,\n"
            "or one derived from tokenizer.json) is copied to OUT/tokenizer.model and set as data.tokenizer.",
            "HF_DIR", "OUT")
    c.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="stored parameter dtype (default float32, train.py's master weights)")
    c.set_defaults(func=cmd_from_hf)

    c = add("from-meta", "Meta directory (params.json + consolidated.*.pth) -> llama3_jax checkpoint",
            "Convert a Meta Llama 3 directory (all model-parallel shards merged) to OUT/checkpoints/0.\n"
            "params.json's use_scaled_rope means RoPE scaling factor 8 in Meta's code; Llama 3.2 1B/3B need 32,\n"
            "which is used when the shapes are theirs. --rope-scaling-factor overrides.", "META_DIR", "OUT")
    c.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="llama3 RoPE scaling factor (default: 32 for Llama 3.2 1B/3B shapes, else 8 when "
                        "use_scaled_rope is true)")
    c.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="stored parameter dtype (default float32, train.py's master weights)")
    c.set_defaults(func=cmd_from_meta)

    c = add("random-hf", "random weights of a preset -> Hugging Face directory (tests, memory checks)",
            "Write random weights with the shapes of a config preset as a Hugging Face directory, tensor by\n"
            "tensor (e.g. an 8B-shaped checkpoint to measure conversion memory).", "PRESET", "OUT")
    c.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    c.add_argument("--max-shard-size", default="5GB")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("overrides", nargs="*", help="model.key=value overrides of the preset")
    c.set_defaults(func=cmd_random_hf)
    return p


def main(argv=None) -> int:
    import logging
    args = build_parser().parse_args(argv)
    if __name__ == "__main__":  # Orbax logs routine warnings (missing optional metadata files) via absl
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
