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


CONSTANT_LR = ["train.warmup_steps=0", "train.final_lr_fraction=1.0"]


def train(out, steps, mesh, processes=1, extra=()):
    base = [sys.executable, str(REPO / "train.py"), "--mesh", str(mesh), "--out", str(out),
            "--steps", str(steps), *ARGS, *extra]
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
    evaluate = ["train.eval_every=3", "train.eval_batches=1"]  # held-out loss: each process scores its rows
    single = train(tmp_path / "single", 6, mesh, extra=evaluate)
    assert "on 8 cpu device(s)" in single[0]

    multi = tmp_path / "multi"
    outs = train(multi, 4, mesh, processes=2, extra=evaluate)  # checkpoints at 3 and (final) 4
    assert "on 8 cpu device(s)" in outs[0] and "model debug-tiny" not in outs[1]  # only process 0 logs
    outs = train(multi, 6, mesh, processes=2, extra=evaluate)  # restores step 4 on both processes
    assert "resumed" in outs[0] and "at step 4" in outs[0]

    want = [r["loss"] for r in read_metrics(tmp_path / "single") if "loss" in r]
    got = [r["loss"] for r in read_metrics(multi) if "loss" in r]
    assert len(got) == 6
    np.testing.assert_allclose(got, want, rtol=1e-5)
    evals = lambda run: {r["step"]: r["eval_loss"] for r in read_metrics(run) if r.get("event") == "eval"}  # noqa
    assert sorted(evals(multi)) == [3, 4, 6] and sorted(evals(tmp_path / "single")) == [3, 6]
    for step in (3, 6):
        np.testing.assert_allclose(evals(multi)[step], evals(tmp_path / "single")[step], rtol=1e-5)


def test_resuming_on_another_process_count_explains_data_shards(tmp_path):
    """The README's two-process example run where a one-process run left its checkpoints:
    a one-line error that names data.shards, not a traceback."""
    mesh = tmp_path / "fsdp8.toml"
    mesh.write_text("[mesh]\ndp = 2\nfsdp = 4\n")
    args = [a for a in ARGS if not a.startswith("data.shards")]  # the default: a shard per process
    base = [sys.executable, str(REPO / "train.py"), "--mesh", str(mesh), "--out", str(tmp_path / "run"), *args]
    first = subprocess.run(base + ["--steps", "2"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    base += ["--steps", "4", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen(base + ["--process-id", str(i)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert "data was read as 1 shard(s), but this run splits it into 2" in err and "data.shards" in err, err


def test_readme_multi_host_example_has_its_own_out():
    readme = (REPO / "README.md").read_text()
    start = readme.index("### Multi-host")
    block = readme[start:readme.index("\n## ", start)]  # up to the next section
    commands = [line for line in block.splitlines() if line.startswith("python train.py")]
    assert len(commands) == 2 and all("--out runs/two-process" in c for c in commands), commands


def test_sigterm_to_one_process_stops_both_at_one_agreed_step(tmp_path):
    """JAX's preemption sync: only process 1 gets SIGTERM; both save the same step and exit
    143, and the run resumes to the losses of one process on 8 devices (a constant learning
    rate, so that the first run's --steps does not shape the schedule)."""
    import signal
    import time
    mesh = tmp_path / "mesh.toml"
    mesh.write_text("[mesh]\ndp = 2\nfsdp = 4\n")
    out, port = tmp_path / "multi", free_port()
    base = [sys.executable, str(REPO / "train.py"), "--mesh", str(mesh), "--out", str(out), "--steps", "5000",
            *ARGS, *CONSTANT_LR, "train.checkpoint_every=100000", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(base + ["--process-id", str(i)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 4):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outputs[0][-3000:] + outputs[1][-3000:]
    saved = int(outputs[0].split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == saved
    assert read_metrics(out)[-1]["step"] == saved

    train(out, saved + 2, mesh, processes=2, extra=CONSTANT_LR)
    single = tmp_path / "single"
    train(single, saved + 2, mesh, extra=CONSTANT_LR)
    want = [r["loss"] for r in read_metrics(single, latest=True)]
    got = [r["loss"] for r in read_metrics(out, latest=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ppo_on_two_processes_matches_one_process(tmp_path):
    """PPO on a pp mesh across two processes: each samples and measures the same whole
    rollout (on the devices with pp folded into fsdp) and trains on its own rows of each
    mini-batch, so the losses, rollout rewards and task evaluation are one process's."""
    mesh = tmp_path / "pp.toml"
    mesh.write_text("[mesh]\nfsdp = 2\npp = 2\ntp = 2\npp_microbatches = 2\n")
    ppo = ["--stage", "ppo", "data.seq_len=32", "train.global_batch=16", "align.task_max_operand=5",
           "align.max_new_tokens=4", "train.checkpoint_every=4", "train.warmup_steps=0"]
    train(tmp_path / "single", 4, mesh, extra=ppo)
    outs = train(tmp_path / "multi", 4, mesh, processes=2, extra=ppo)
    assert "on 8 cpu device(s)" in outs[0]
    rows = {run: read_metrics(tmp_path / run) for run in ("single", "multi")}
    for key in ("loss", "reward", "kl", "policy_loss", "value_loss"):
        want, got = ([r[key] for r in rows[run] if "loss" in r] for run in ("single", "multi"))
        assert len(got) == 4, key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
    evaluation = {run: [r for r in rows[run] if r.get("event") == "evaluation"][-1] for run in rows}
    for key in ("eval_task_accuracy", "eval_answer_probability"):
        np.testing.assert_allclose(evaluation["multi"][key], evaluation["single"][key], rtol=1e-5, err_msg=key)
