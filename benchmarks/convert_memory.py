"""Peak memory and time of the checkpoint conversions on a model of a preset's shapes.

    python benchmarks/convert_memory.py --config llama3-8b --dir /tmp/convert-8b

Writes random weights of the preset's shapes as a Hugging Face directory (bfloat16, as
released), then times `llama3-convert` from-hf, to-hf, to-meta and from-meta, each in its
own process, and prints a table of wall time and peak resident memory (the process's
VmHWM: unlike ru_maxrss, it does not count what the forking parent held). It
checks that to-hf gives back byte-identical safetensors. Outputs that are no longer needed
are deleted as it goes (an 8B model needs about 64 GB of disk at the peak).

`random_hf` is also the tests' way to make a large-shaped HF directory quickly.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llama3_jax.config import load_config  # noqa: E402
from llama3_jax.formats.hf import write_hf  # noqa: E402
from llama3_jax.formats.source import Source  # noqa: E402
from llama3_jax.model import param_shapes  # noqa: E402


class RandomSource(Source):
    """Random weights of a config's shapes, made fast for large shapes: float32 values that
    bfloat16 holds exactly, +-[1/128, 1/64) for weights, [1, 2) for norms."""

    def __init__(self, model, seed: int = 0):
        self.model, self.seed = model, seed

    def _random(self, name, shape, layer):
        rng = np.random.default_rng([self.seed, list(param_shapes(self.model)).index(name), layer + 1])
        exponent = 0x3F80 if name in ("attention_norm", "ffn_norm", "norm") else 0x3C00
        out = np.empty(shape, np.uint32)
        for a in range(0, shape[0], 1024):  # row blocks keep the temporaries small
            bits = rng.integers(0, 1 << 16, out[a:a + 1024].shape, dtype=np.uint16)
            out[a:a + 1024] = (bits & (0x007F if exponent == 0x3F80 else 0x807F)) | exponent
        out <<= 16
        return out.view(np.float32)

    def layer(self, name, i):
        return self._random(name, param_shapes(self.model)[name][1:], i)

    def whole(self, name):
        return self._random(name, param_shapes(self.model)[name], -1)


def random_hf(preset: str, out, *, overrides=(), dtype="bfloat16", max_shard_bytes=5 * 10**9, seed=0):
    """A Hugging Face directory of random weights with a preset's shapes, written tensor by tensor."""
    return write_hf(RandomSource(load_config(preset, overrides).model, seed), out, dtype=dtype,
                    max_shard_bytes=max_shard_bytes, log=lambda *_: None)


def measured(*argv) -> tuple[float, float]:
    """(seconds, peak GiB) of `llama3-convert ARGV` in a fresh process."""
    code = ("import sys; from llama3_jax.formats.convert import main; rc = main(sys.argv[1:]); "
            "print('PEAK', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))); "
            "sys.exit(rc)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"llama3-convert {' '.join(map(str, argv))} failed:\n{p.stderr[-3000:]}")
    kib = int(next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("PEAK")))
    return seconds, kib / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama3-8b")
    ap.add_argument("--dir", required=True, help="scratch directory (created; must not exist)")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", help="model.key=value overrides")
    args = ap.parse_args()
    d = pathlib.Path(args.dir)
    d.mkdir(parents=True)
    rows = []
    t0 = time.perf_counter()
    random_hf(args.config, d / "hf", overrides=args.overrides)
    rows.append(("random weights -> hf (bfloat16)", time.perf_counter() - t0,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
    steps = [("from-hf hf ours (float32)", ["from-hf", d / "hf", d / "ours"]),
             ("to-hf ours hf2 (bfloat16)", ["to-hf", d / "ours", d / "hf2"]),
             ("to-meta ours meta (bfloat16)", ["to-meta", d / "ours", d / "meta"]),
             ("from-meta meta ours2 (bfloat16)", ["from-meta", d / "meta", d / "ours2", "--dtype", "bfloat16"])]
    for label, argv in steps:
        rows.append((label, *measured(*argv)))
        if argv[0] == "to-hf":
            same = all(filecmp.cmp(d / "hf" / f.name, f, shallow=False) for f in (d / "hf2").glob("*.safetensors"))
            print(f"to-hf output byte-identical to the input: {same}", flush=True)
            shutil.rmtree(d / "hf2")
            shutil.rmtree(d / "hf")
    print(f"\n{args.config} ({os.cpu_count()} cores)")
    print(f"{'command':<34}{'wall s':>9}{'peak GiB':>10}")
    print("-" * 53)
    for label, seconds, gib in rows:
        print(f"{label:<34}{seconds:>9.1f}{gib:>10.2f}")


if __name__ == "__main__":
    main()
