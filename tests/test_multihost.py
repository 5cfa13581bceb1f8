"""Two JAX processes with 4 CPU devices each train like one process with 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from llama3_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config", "debug-tiny", "model.compute_dtype=float32", "data.shards=2",
        "train.checkpoint_every=3", "train.sample_tokens=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e["JAX_PLATFORMS"] = "cpu"
    return e


def train(out, steps, mesh, processes=1):
    base = [sys.executable, str(REPO / "train.py"), "--mesh", str(mesh), "--out", str(out),
            "--steps", str(steps), *ARGS]
    if processes == 1:
        procs = [subprocess.Popen(base, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    else:
        port = free_port()
        procs = [subprocess.Popen(base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                          str(processes), "--process-id", str(i)],
                                  cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-4000:]
    return outputs


def test_two_processes_match_one_process_and_resume(tmp_path):
    mesh = tmp_path / "fsdp8.toml"
    mesh.write_text("[mesh]\ndp = 2\nfsdp = 4\n")
    single = train(tmp_path / "single", 6, mesh)
    assert "on 8 cpu device(s)" in single[0]

    multi = tmp_path / "multi"
    outs = train(multi, 4, mesh, processes=2)  # checkpoints at 3 and (final) 4
    assert "on 8 cpu device(s)" in outs[0] and "model debug-tiny" not in outs[1]  # only process 0 logs
    outs = train(multi, 6, mesh, processes=2)  # restores step 4 on both processes
    assert "resumed" in outs[0] and "at step 4" in outs[0]

    want = [r["loss"] for r in read_metrics(tmp_path / "single")]
    got = [r["loss"] for r in read_metrics(multi)]
    assert len(got) == 6
    np.testing.assert_allclose(got, want, rtol=1e-5)
