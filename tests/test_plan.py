"""`train.py --compile-only`: the real step compiled ahead of time for fake CPU devices and
for a TPU topology (libtpu, no TPU), its per-device memory checked against the shards."""

import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def compile_only(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "debug-tiny", "--compile-only",
                        "--out", str(tmp_path / "run"), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # planning writes nothing
    return p.stdout


def mib(text, label):
    value, unit = re.search(rf"{label}\s+([\d.]+) (MiB|GiB)", text).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def state_and_batch_mib(sizes: dict) -> float:
    """What each device holds of the train state and the batch, from the shardings alone."""
    import jax

    from llama3_jax.config import MeshConfig, load_config
    from llama3_jax.train.step import Trainer
    n = math.prod(sizes.values())
    trainer = Trainer(load_config("debug-tiny"), MeshConfig(**sizes), devices=jax.devices()[:n])
    leaves = jax.tree.leaves(trainer.abstract_state()) + jax.tree.leaves(trainer.abstract_batch())
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves) / 2**20


def test_compile_only_on_fake_cpu_devices(tmp_path):
    out = compile_only(tmp_path, "--mesh", "cpu-8")
    assert "8 x cpu" in out and "mesh fsdp=4 tp=2" in out
    np.testing.assert_allclose(mib(out, r"arguments \(parameters, optimizer state, batch\)"),
                               state_and_batch_mib(dict(fsdp=4, tp=2)), atol=0.01)
    assert mib(out, "XLA temporaries") > 0 and "no time estimate" in out


def test_compile_only_for_a_tpu_topology(tmp_path):
    (tmp_path / "fsdp4.toml").write_text("[mesh]\nfsdp = 4\n")
    out = compile_only(tmp_path, "--mesh", str(tmp_path / "fsdp4.toml"), "--topology", "v5p:2x2x1")
    assert "4 x TPU v5 (1 host(s)), mesh fsdp=4" in out and "of 95.00 GiB  fits" in out
    # TPU layouts pad small dimensions to whole tiles, so a device holds at least its shards.
    assert mib(out, r"arguments \(parameters, optimizer state, batch\)") >= state_and_batch_mib(dict(fsdp=4))
    step = re.search(r"estimated step ([\d.]+) (ms|s) .*: ([\d,]+) tokens/s per device, MFU ([\d.]+)%", out)
    assert step, out
    seconds = float(step.group(1)) / (1000 if step.group(2) == "ms" else 1)
    assert abs(8 * 64 / seconds / 4 / float(step.group(3).replace(",", "")) - 1) < 0.01  # tokens/s = tokens/step/dev


def test_a_plan_the_tpu_compiler_refuses_is_reported_as_not_fitting(tmp_path):
    """1024 sequences of 8192 tokens on 4 chips: far over 95 GiB, which the TPU compiler
    refuses outright; the plan says so in a line instead of a traceback."""
    (tmp_path / "fsdp4.toml").write_text("[mesh]\nfsdp = 4\n")
    out = compile_only(tmp_path, "--mesh", str(tmp_path / "fsdp4.toml"), "--topology", "v5p:2x2x1",
                       "data.seq_len=8192", "model.max_seq_len=8192", "train.global_batch=1024", "model.remat=none")
    assert re.search(r"DOES NOT FIT: .*exceeds available HBM \(9\d\.\d+G\)", out), out
