"""train.py end to end: exact resume after SIGKILL, preemption, bad input, falling loss."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama3_jax.config import ConfigError
from llama3_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40  # long enough that a kill after step 6 always lands mid-run
TINY = ["--config", "debug-tiny", "model.compute_dtype=float32", "train.checkpoint_every=4",
        "train.keep_checkpoints=3", "train.sample_tokens=4"]


def cmd(out, steps, *extra):
    return [sys.executable, str(REPO / "train.py"), "--out", str(out), "--steps", str(steps), *TINY, *extra]


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # train.py asks for the devices its mesh needs
    return e


def run(out, steps, *extra, check=True):
    p = subprocess.run(cmd(out, steps, *extra), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def final_params(out):
    from llama3_jax.formats.run import RunSource
    src = RunSource(out)
    return {k: src.whole(k) for k in src.dtypes}


def held_out_loss(run_dir, *overrides):
    """The held-out loss of a run's final parameters, computed here from the config alone."""
    import jax
    from llama3_jax.config import load_config
    from llama3_jax.formats.bpe import load_tokenizer
    from llama3_jax.train.step import Trainer
    from llama3_jax.train.validation import Validation
    cfg = load_config(TINY[1], [*TINY[2:], *overrides])
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    params = jax.device_put(final_params(run_dir), jax.devices()[0])
    return Validation(trainer, load_tokenizer(run_dir / "tokenizer.model"))(params)["eval_loss"]


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out, latest=True)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run(out, STEPS)
    return out


def test_metrics_have_every_field(uninterrupted):
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s",
                "tflops_per_device", "mfu"):
        assert all(r[key] is not None for r in records), key
    assert records[-1]["tokens"] == STEPS * 8 * 64
    assert any(p.name.startswith("events.out.tfevents") for p in uninterrupted.iterdir())
    assert (uninterrupted / "loss.png").stat().st_size > 1000
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == [32, 36, 40]
    # The run keeps the tokenizer it trained with (the default BPE depends on the stdlib).
    from llama3_jax.formats.bpe import default_tokenizer
    kept = (uninterrupted / "tokenizer.model").read_bytes()
    assert kept == pathlib.Path(default_tokenizer().path).read_bytes()


def test_sigkill_then_resume_is_exact(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # With held-out loss on (the uninterrupted run has it off): evaluation changes no training.
    evaluated = ("train.eval_every=8", "train.eval_batches=2")
    proc = subprocess.Popen(cmd(out, STEPS, *evaluated), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    # Kill between checkpoints: after step 4 is saved and step 6 is logged.
    while time.time() < deadline:
        done = (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 6
        if done and (out / "checkpoints" / "4").exists():
            break
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(out)) < STEPS  # really interrupted
    p = run(out, STEPS, *evaluated)
    assert "resumed" in p.stdout
    want, got = losses(uninterrupted), losses(out)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=0, atol=1e-6)
    a, b = final_params(uninterrupted), final_params(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The resumed run scored the same held-out batches as a fresh start scores now.
    evals = {r["step"]: r for r in read_metrics(out) if r.get("event") == "eval"}
    assert sorted(evals) == list(range(8, STEPS + 1, 8)) and all(np.isfinite(r["eval_loss"]) for r in evals.values())
    assert held_out_loss(uninterrupted, *evaluated) == pytest.approx(evals[STEPS]["eval_loss"], abs=1e-6)


def test_a_restart_takes_the_warm_spare_and_resumes_exactly(uninterrupted, tmp_path):
    """--max-restarts keeps the next session imported and waiting; a SIGKILL releases it at
    once, the run ends exactly where an uninterrupted one does, and the spare left over at
    the end (one restart remained) is not left running."""
    out = tmp_path / "spared"
    e = dict(env(), LLAMA3_JAX_FAULTS="kill@22", LLAMA3_JAX_SPARE_AFTER_S="0")  # spares start at once
    p = subprocess.run(cmd(out, STEPS, "--max-restarts", "2"), cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "restart 1/2: killed by SIGKILL" in p.stderr and "(in the warm spare)" in p.stderr
    [row] = [json.loads(line) for line in (out / "restarts.jsonl").read_text().splitlines()]
    assert row["warm_spare"] and row["cause"] == "killed by SIGKILL"
    assert "resumed" in p.stdout and [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    a, b = final_params(uninterrupted), final_params(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    left = [d for d in pathlib.Path("/proc").glob("[0-9]*") if str(out).encode() in _cmdline(d)]
    assert not left, [_cmdline(d) for d in left]


def _cmdline(proc_dir) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def test_corrupted_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, out)
    state_dir = out / "checkpoints" / str(STEPS) / "state"
    for f in state_dir.rglob("*"):  # garble every data file of the newest checkpoint
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage" * 3)
    p = run(out, STEPS)
    assert f"checkpoint at step {STEPS}" in p.stdout and "could not be restored" in p.stdout
    assert "resumed" in p.stdout and f"at step {STEPS - 4}" in p.stdout
    np.testing.assert_allclose([v for _, v in losses(out)], [v for _, v in losses(uninterrupted)], atol=1e-6)
    assert (out / "checkpoints" / str(STEPS - 8)).exists()  # nothing older was deleted
    assert (out / "set_aside" / f"{STEPS}-corrupt" / "state").is_dir()  # nor the corrupt one


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    out = tmp_path / "preempted"
    # No periodic checkpoints: the only one can come from the SIGTERM handler.
    proc = subprocess.Popen(cmd(out, 1000, "train.checkpoint_every=100000"), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout[-2000:]
    last = read_metrics(out)[-1]["step"]
    assert "SIGTERM" in stdout and 5 <= last < 1000
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert str(last) in saved


@pytest.mark.parametrize("args,message", [
    (["data.sources=[]"], "is a list of tables"),
    (["model.n_layer=3"], "unknown key(s) model.n_layer; valid keys in [model]: dim, n_layers"),
    (["trian.lr=1"], "unknown section 'trian'"),
    (["data.seq_len=1024"], "exceeds model.max_seq_len=512"),
    (["train.global_batch=6", "train.micro_batches=4"], "does not divide into train.micro_batches=4"),
    (["data.tokenizer=/nonexistent/tokenizer.model"], "/nonexistent/tokenizer.model"),
])
def test_bad_input_is_reported_clearly(tmp_path, args, message):
    p = run(tmp_path / "bad", 2, *args, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_missing_data_path_and_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    for src, message in [(tmp_path / "nope", "nope"), (tmp_path / "empty", "no documents")]:
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(f'base = "{REPO / "configs" / "debug-tiny.toml"}"\n[[data.sources]]\npath = "{src}"\n')
        p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--out",
                            str(tmp_path / "bad"), "--steps", "2"], cwd=REPO, env=env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr


def test_config_errors_name_the_fix():
    from llama3_jax.config import load_config
    with pytest.raises(ConfigError, match="not found: give a .toml path or one of"):
        load_config("llama3-9b")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("debug-tiny", ["lr=3"])
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config("debug-tiny", ["train.steps=ten"])
    assert json.dumps(load_config("llama3.1-8b").model.rope_scaling_factor) == "8.0"


def test_paper_16_mesh_trains_like_one_device(uninterrupted, tmp_path):
    """tp=2 cp=2 pp=2 dp=2 on 16 fake CPU devices that train.py requests itself."""
    out = tmp_path / "paper16"
    p = run(out, 5, "--mesh", "paper-16")
    assert "on 16 cpu device(s)" in p.stdout
    want = [v for _, v in losses(uninterrupted)[:5]]
    np.testing.assert_allclose([v for _, v in losses(out)], want, rtol=1e-5)


# ---------------------------------------------------------------- what a newcomer types

def test_out_that_cannot_be_a_run_directory(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for out, message in [(afile, "is a file; give a directory"), (afile / "run", "runs through"),
                         (pathlib.Path("/sys/llama3-jax-run"), "is not writable")]:
        p = run(out, 2, check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert afile.read_text() == "mine"


def test_resume_with_changed_steps_or_data_says_what_happens(uninterrupted, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(uninterrupted, out)
    p = run(out, STEPS - 10, check=False)  # below the run's step: nothing to train
    assert p.returncode == 2 and f"--steps {STEPS - 10} is below the run's step {STEPS}" in p.stderr, p.stderr
    p = run(out, STEPS, "data.seed=7", check=False)
    assert p.returncode == 2 and "data.seed: saved 0, now 7" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run(out, STEPS + 4)  # more steps: the cosine schedule stretches, and the run says so
    assert f"train.steps changed from {STEPS} to {STEPS + 4}" in p.stdout and "learning rate at step" in p.stdout
    assert "WARNING:absl" not in p.stderr  # Orbax's notes about optional metadata files stay out
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 5))
    assert all((out / "checkpoints" / str(s)).exists() for s in (STEPS, STEPS + 4))


def write_config(path, sources):
    lines = [f'base = "{REPO / "configs" / "debug-tiny.toml"}"']
    for src, weight in sources:
        lines += ["[[data.sources]]", f'path = "{src}"', f"weight = {weight}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_sources_are_counted_and_empty_ones_refused(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"document {i} " * 40)
    (docs / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 20)
    (tmp_path / "empty.txt").write_text("")
    for sources in ([(tmp_path / "empty.txt", 1.0)], [(docs, 0.5), (tmp_path / "empty.txt", 0.5)]):
        cfg = write_config(tmp_path / "cfg.toml", sources)
        p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--out",
                            str(tmp_path / "bad"), "--steps", "1"], cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2 and "empty.txt' has no text" in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "bad").exists()
    cfg = write_config(tmp_path / "cfg.toml", [(docs, 3.0), (REPO / "configs", 1.0)])
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--out", str(tmp_path / "ok"),
                        "--steps", "1", "train.sample_tokens=1"], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    table = p.stdout.splitlines()
    row = next(line for line in table if str(docs)[-30:] in line)
    assert row.split()[1:3] == ["7", "7"] and "75.0%" in row  # 7 files, 7 documents, 3/(3+1) of the tokens
    assert any("configs" in line and "25.0%" in line for line in table)
    assert "1 of its 7 documents cannot be read and will be skipped" in p.stdout and "latin1.txt: not UTF-8" in p.stdout
    assert p.stderr.count("skipped a bad row") == 1  # read once an epoch, logged once


def test_init_from_a_hugging_face_directory_and_a_bad_one(tmp_path):
    """train.init_from takes a Hugging Face directory directly (each device reads its
    shard); a bad init_from stops before --out is created."""
    import torch
    import transformers
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=512)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    p = run(tmp_path / "bad", 1, f"train.init_from={tmp_path / 'nowhere'}", check=False)
    assert p.returncode == 2 and "nowhere does not exist" in p.stderr and not (tmp_path / "bad").exists()
    p = run(tmp_path / "bad", 1, f"train.init_from={tmp_path / 'hf'}", "model.n_layers=3", check=False)
    assert p.returncode == 2 and "shapes differ from this model config" in p.stderr
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "from_hf"
    run(out, 1, f"train.init_from={tmp_path / 'hf'}", "train.lr=0")
    from llama3_jax.formats.hf import HFSource
    want, got = HFSource(tmp_path / "hf"), final_params(out)
    for name in got:
        np.testing.assert_array_equal(got[name], want.read(name), err_msg=name)


def test_the_cpu_peak_for_mfu_is_measured_once_per_machine(tmp_path, monkeypatch):
    from llama3_jax.train import metrics
    monkeypatch.setenv("LLAMA3_JAX_CACHE", str(tmp_path))
    metrics.measure_cpu_flops.cache_clear()
    try:
        first = metrics.measure_cpu_flops()
        saved = json.loads((tmp_path / "cpu_flops.json").read_text())
        assert list(saved.values()) == [first] and first > 1e8
        (tmp_path / "cpu_flops.json").write_text(json.dumps({k: 123.0 for k in saved}))
        metrics.measure_cpu_flops.cache_clear()
        assert metrics.measure_cpu_flops() == 123.0  # read back, not measured again
    finally:
        metrics.measure_cpu_flops.cache_clear()
