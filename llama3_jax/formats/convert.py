"""Convert checkpoints: train.py runs (Orbax) <-> Hugging Face <-> Meta.

    llama3-convert to-hf     RUN OUT [--step N] [--dtype bfloat16] [--max-shard-size 5GB]
    llama3-convert to-meta   RUN OUT [--step N] [--shards 1] [--dtype bfloat16]
    llama3-convert from-hf   HF_DIR OUT [--dtype float32]
    llama3-convert from-meta META_DIR OUT [--rope-scaling-factor F] [--dtype float32]

(`python -m llama3_jax.convert` is the same command.) `COMMAND --help` describes each.
from-hf / from-meta write OUT/checkpoints/0/{state,config} like a train.py run, so
`train.py ... train.init_from=OUT` and `llama3_jax.load(OUT)` read it.

Every conversion is a Source (formats/run.py, hf.py, meta.py) that yields our parameters a
layer at a time, joined to a writer that puts each converted layer at its final place in
the output straight away: at most a block of layers is in memory, never a model (an 8B
model converts in under 5 GiB). Outputs are written into a temporary sibling directory
and renamed when complete.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

from llama3_jax.config import DTYPES, ConfigError
from llama3_jax.formats.hf import HFSource, write_hf
from llama3_jax.formats.meta import MetaSource, write_meta
from llama3_jax.formats.run import RunSource, run_tokenizer, write_orbax


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2**30 * 2, '100MB', '123' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} must look like 5GB, 500MB or 2GiB")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def exported_tokenizer(src: RunSource, override) -> tuple:
    """(tokenizer.model path or None, bos id, eos id) that an export of `src` carries."""
    tok = run_tokenizer(src.config, src.run_dir, override)
    if tok is None:  # a converted checkpoint that came without a tokenizer: its ids
        return None, src.converted.get("bos_token_id"), src.converted.get("eos_token_id")
    return pathlib.Path(tok.path), tok.bos_id, tok.eos_id


def cmd_to_hf(args):
    src = RunSource(args.src, step=args.step, read_block_bytes=parse_size(args.read_block_size))
    tok, bos, eos = exported_tokenizer(src, args.tokenizer)
    write_hf(src, args.dst, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
             bos_id=bos, eos_id=eos, tokenizer=tok)
    return 0


def cmd_to_meta(args):
    src = RunSource(args.src, step=args.step, read_block_bytes=parse_size(args.read_block_size))
    tok, _, _ = exported_tokenizer(src, args.tokenizer)
    write_meta(src, args.dst, shards=args.shards, dtype=args.dtype, tokenizer=tok)
    return 0


def cmd_from_hf(args):
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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="llama3-convert", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    src_help = {"RUN": "train.py run directory (or its checkpoints/ folder, or one step folder)",
                "HF_DIR": "Hugging Face LlamaForCausalLM directory (config.json + *.safetensors)",
                "META_DIR": "Meta directory (params.json + consolidated.NN.pth [+ tokenizer.model])"}

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
                   help="stored parameter dtype (default float32, train.py's default param_dtype)")
    c.set_defaults(func=cmd_from_hf)

    c = add("from-meta", "Meta directory (params.json + consolidated.*.pth) -> llama3_jax checkpoint",
            "Convert a Meta Llama 3 directory (all model-parallel shards merged) to OUT/checkpoints/0.\n"
            "params.json's use_scaled_rope means RoPE scaling factor 8 in Meta's code; Llama 3.2 1B/3B need 32,\n"
            "which is used when the shapes are theirs. --rope-scaling-factor overrides.", "META_DIR", "OUT")
    c.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="llama3 RoPE scaling factor (default: 32 for Llama 3.2 1B/3B shapes, else 8 when "
                        "use_scaled_rope is true)")
    c.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="stored parameter dtype (default float32, train.py's default param_dtype)")
    c.set_defaults(func=cmd_from_meta)
    return p


def main(argv=None) -> int:
    import logging
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's routine notes about optional metadata
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print("error: Hugging Face and Meta checkpoints are read and written with PyTorch, which is not "
              "installed; install its CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu",
              file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
