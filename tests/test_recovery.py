"""The self-repairing loop: bad steps skipped on the device, rollback with data rollback,
the watchdog, restarts, Ctrl-C, goodput; proven against clean runs."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from llama3_jax.config import ConfigError, load_config
from llama3_jax.train import recovery
from llama3_jax.train.metrics import read_metrics
from llama3_jax.train.step import Trainer, synthetic_batch
from test_train import REPO, cmd, env, final_params, run


def trainer(*overrides):
    cfg = load_config("debug-tiny", ["model.compute_dtype=float32", "train.global_batch=4", "data.seq_len=32",
                                     "train.lr=1e-2", "train.warmup_steps=0", *overrides])
    return Trainer(cfg, devices=jax.devices()[:1])


def test_bad_steps_apply_no_update_and_leave_no_trace():
    """NaN and spiking batches are skipped on the device: the state equals that of a run
    that never saw them (bit for bit), and the metrics say why."""
    t = trainer("train.spike_warmup=5", "train.spike_k=6", "train.spike_window=8")
    V = t.cfg.model.vocab_size
    # One batch learned over and over: the loss settles, so an unseen target is a clear spike.
    good = [synthetic_batch(4, 32, V)] * 25
    nan = dict(good[0], loss_mask=np.full_like(good[0]["loss_mask"], np.nan))
    spike = dict(good[0], targets=np.full_like(good[0]["targets"], V - 1))
    inf = dict(good[0], loss_mask=good[0]["loss_mask"] * np.float32(np.inf))
    bad_at = {7: (nan, "non-finite"), 20: (spike, "spike"), 22: (inf, "non-finite")}

    guarded, clean = t.init_state(), t.init_state()
    stream = []
    for i, b in enumerate(good):
        stream.append(b)
        if i in bad_at:
            stream.append(bad_at[i][0])
    reasons = []
    for b in stream:
        guarded, m = t(guarded, t.put(b))
        reasons.append(recovery.REASONS[int(m["skipped"])])
    for b in good:
        clean, _ = t(clean, t.put(b))
    assert [r for r in reasons if r] == [v[1] for v in bad_at.values()]
    assert int(guarded["step"]) == int(clean["step"]) == len(good)
    for a, b in zip(jax.tree.leaves(jax.device_get(guarded)), jax.tree.leaves(jax.device_get(clean))):
        np.testing.assert_array_equal(a, b)


def test_spike_statistics_follow_the_numpy_formula():
    tc = load_config("debug-tiny", ["train.spike_window=4", "train.spike_warmup=3", "train.spike_k=2"]).train
    losses = [5.0, 4.0, 4.5, 4.2, 9.0, float("nan"), 4.1, 4.3]
    guard, seen = recovery.init_guard(), []
    mean = var = 0.0
    n, alpha = 0, 2 / (4 + 1)
    for x in losses:
        ok, reason, guard = recovery.judge(np.float32(x), np.float32(1.0), guard, tc)
        want_spike = n >= 3 and x > mean + 2 * np.sqrt(var)
        want_ok = np.isfinite(x) and not want_spike
        assert bool(ok) == want_ok, x
        seen.append(int(reason))
        if want_ok:  # the NumPy oracle of the exponential mean and variance
            a = 1.0 if n == 0 else alpha
            d = x - mean
            mean, var, n = mean + a * d, (1 - a) * (var + a * d * d), n + 1
        np.testing.assert_allclose([guard["loss_mean"], guard["loss_var"]], [mean, var], rtol=1e-5)
    assert seen == [0, 0, 0, 0, 2, 1, 0, 0]


@pytest.mark.parametrize("text, ranges", [("", ()), ("3", ((3, 3),)), ("10-12, 0-1", ((0, 1), (10, 12)))])
def test_skip_batches_parse(text, ranges):
    assert recovery.parse_ranges(text) == ranges


@pytest.mark.parametrize("text", ["3-1", "a-b", "-4"])
def test_skip_batches_refused(text):
    with pytest.raises(ConfigError, match="skip_batches"):
        recovery.parse_ranges(text)


def start(out, steps, *extra, faults=""):
    e = dict(env(), LLAMA3_JAX_FAULTS=faults)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd(out, steps, *extra), cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for_step(out, step, proc, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        path = out / "metrics.jsonl"
        if path.exists() and sum(1 for _ in open(path)) >= step:
            return
        assert proc.poll() is None, "train.py ended early"
        time.sleep(0.1)
    raise AssertionError("no progress")


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path):
    out = tmp_path / "run"
    p = start(out, 5000)
    wait_for_step(out, 3, p)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    saved = int(log.split("Ctrl-C: saved checkpoint at step ")[1].split()[0])
    assert saved >= 3 and (out / "checkpoints" / str(saved)).is_dir()
    assert read_metrics(out)[-1]["step"] == saved
    again = run(out, saved + 2)  # resumes where Ctrl-C left it
    assert f"resumed {out} at step {saved}" in again.stdout


def test_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "run"
    p = start(out, 5000, "train.checkpoint_every=100000")
    wait_for_step(out, 2, p)
    p.send_signal(signal.SIGINT)
    # The second Ctrl-C as soon as the first one's handler has run (not after a fixed pause,
    # which a fast step-and-save can outlast, and not before, when the two could merge).
    deadline = time.time() + 30
    while "Ctrl-C: finishing" not in (tmp_path / "run.log").read_text() and time.time() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    log = (tmp_path / "run.log").read_text()
    assert "Ctrl-C again: exiting now, without saving" in log
    assert "saved checkpoint" not in log


def test_kills_a_hang_and_a_nan_rollback_end_where_a_clean_run_does(tmp_path):
    """benchmarks/goodput.py at a tiny size: three SIGKILLs, a hung step and a NaN batch
    under --max-restarts; the final parameters equal those of a clean run told to skip the
    batch that was rolled back over (the script exits 1 otherwise). Checkpoints are saved
    from a copy of the state while the next step runs (train.checkpoint_copy)."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    import goodput
    assert goodput.main(["--config", "debug-tiny", "--steps", "40", "--out", str(tmp_path),
                         "train.checkpoint_every=4", "model.compute_dtype=float32", "train.checkpoint_copy=true"]) == 0
    run_dir = tmp_path / "faulty"
    causes = [json.loads(line)["cause"] for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert sorted(causes) == ["killed by SIGKILL"] * 3 + ["the watchdog stopped a hung step"]
    stacks = (run_dir / "watchdog" / "stacks-0.txt").read_text()
    assert "did not finish" in stacks and "Thread" in stacks and "after_dispatch" in stacks
    rows = read_metrics(run_dir)
    rollback = [r for r in rows if r.get("event") == "rollback"]
    nan_batch = int(goodput.fault_plan(40, 0)["nan"][0]) - 1
    assert [r["skip_batches"] for r in rollback] == [f"{nan_batch}-{nan_batch}"]
    assert [r["step"] for r in rollback] == [nan_batch]  # in place: from the step before the bad one
    assert [r["batch"] for r in rows if r.get("skipped")] == [nan_batch]
    summary = json.loads((run_dir / "goodput.json").read_text())
    assert summary["sessions"] == 5 and summary["lost_s"]["watchdog"] >= 3  # train.step_timeout_s
    from llama3_jax.train.goodput import read_events
    events = [e for e in read_events(run_dir / "goodput" / "events.jsonl") if "step" in e]
    productive = [e["step"] for e in events if e["kind"] == "productive"]
    assert len(productive) == len(set(productive)) == summary["productive_steps"]  # re-done steps are lost time
    assert {e["step"] for e in events} == set(range(1, 41))


def test_restarts_stop_on_a_configuration_error(tmp_path):
    out = tmp_path / "run"
    p = run(out, 5, "--max-restarts", "3", "model.dim=abc", check=False)
    assert p.returncode == 2 and "model.dim" in p.stderr
    assert not (out / "restarts.jsonl").exists()


def test_bad_rows_mid_run_are_skipped_and_too_many_stop_cleanly(tmp_path):
    from test_train import write_config
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) for i in range(600)]
    few, many = list(lines), list(lines)
    for i in range(5, 600, 150):  # 4 bad rows: skipped, counted, the run goes on
        few[i] = "{not json"
    for i in range(3, 600, 4):  # a quarter bad: the run stops with a checkpoint
        many[i] = '{"body": "no text"}'
    for name, rows in (("few", few), ("many", many)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        write_config(tmp_path / f"{name}.toml", [(tmp_path / f"{name}.jsonl", 1.0)])

    ok = subprocess.run([*cmd(tmp_path / "few-run", 12), "--config", str(tmp_path / "few.toml")], cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # The row shuffle reads more than an epoch ahead: every bad row is met by the first step.
    counts = [r["bad_rows"] for r in read_metrics(tmp_path / "few-run")]
    assert counts == [4] * 12
    assert ok.stderr.count("skipped a bad row") == 4 and "few.jsonl:6: not valid JSON" in ok.stderr

    out = tmp_path / "many-run"
    stopped = subprocess.run([*cmd(out, 200), "--config", str(tmp_path / "many.toml")], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 77, stopped.stderr[-3000:]
    last = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and "data.max_bad_row_fraction" in last[0] and "saved checkpoint at step" in last[0]
    step = int(last[0].split("saved checkpoint at step ")[1].split()[0])
    assert (out / "checkpoints" / str(step)).is_dir() and step < 200

