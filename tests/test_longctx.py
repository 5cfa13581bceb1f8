"""Long context (issue: 8K -> 128K): a long step on context-parallel meshes equals the
one-device step; the staged schedule changes sequence length and mesh mid-run and resumes
exactly; the presets encode the paper's six stages."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from llama3_jax.config import load_config, load_mesh
from llama3_jax.train import context
from llama3_jax.train.loop import cli
from llama3_jax.train.metrics import read_metrics

from test_parallel import BASE, fixed_batch, trainer_on

# ------------------------------------------------------------------ a long step

# The suite runs this at 4K tokens, within its time on 2 cores; LLAMA3_JAX_TEST_SEQ=32768 runs
# it at 32K (about 7 minutes on 2 cores: dense attention's softmax alone is 2^30 exps per head
# and pass, and 8 fake devices share the cores). One layer and a narrow width; the
# sequence is what is under test: chunked attention (blocks of 1024 queries, no [seq, seq]
# scores) and the chunked loss over load-balanced CP chunks, three packed documents per row.
SEQ = int(os.environ.get("LLAMA3_JAX_TEST_SEQ", "4096"))
LONG = BASE + ["train.global_batch=1", f"data.seq_len={SEQ}", f"model.max_seq_len={SEQ}", "model.n_layers=1",
               "model.dim=64", "model.n_heads=2", "model.n_kv_heads=1", "model.multiple_of=64",
               "model.attention_impl=xla_chunked", f"model.loss_chunk={SEQ // 4}", "model.remat=full"]


@pytest.fixture(scope="module")
def long_reference():
    cfg = load_config("debug", LONG)
    batch = fixed_batch(batch=1, seq=SEQ)
    trainer = trainer_on(cfg, {})
    init = trainer.init_state()
    before = jax.device_get(init["params"])
    state, metrics = trainer(init, trainer.put(batch))
    return cfg, batch, float(metrics["loss"]), jax.device_get(state["params"]), before


@pytest.mark.parametrize("sizes", [dict(cp=8), dict(cp=4, tp=2)], ids=str)
def test_long_step_on_cp_mesh_equals_one_device(sizes, long_reference):
    cfg, batch, ref_loss, ref_params, before = long_reference
    trainer = trainer_on(cfg, sizes)
    state, metrics = trainer(trainer.init_state(), trainer.put(batch))
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-5)
    params = jax.device_get(state["params"])
    for name in ref_params:
        np.testing.assert_allclose(params[name], ref_params[name], atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(ref_params["wq"] - before["wq"]).max() > 1e-4  # the step moved them far more


# ------------------------------------------------------------------ the staged schedule

STAGES = """base = "debug-tiny"
[train]
steps = 8
checkpoint_every = 2
keep_checkpoints = 10
sample_tokens = 2
compile_cache = "off"
[[train.context_stages]]
start_step = 4
seq_len = 128
global_batch = 4
cp = 2
rope_theta = 1000000.0
"""


def train(config, out, *extra):
    return cli(["--config", str(config), "--mesh", str(config.parent / "mesh.toml"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    (root / "stages.toml").write_text(STAGES)
    (root / "mesh.toml").write_text("[mesh]\nfsdp = -1\n")  # cp 2 takes half of the 8 devices' fsdp
    assert train(root / "stages.toml", root / "run") == 0
    return root


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_stage_change_trains_the_new_length_on_the_new_mesh(staged):
    rows = [r for r in read_metrics(staged / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Tokens per step: 8 x 64 in stage 0, 4 x 128 in stage 1.
    assert [r["tokens"] for r in rows] == [512 * s for s in range(1, 9)]
    saved = {s: json.loads((staged / "run" / "checkpoints" / str(s) / "config" / "metadata").read_text())
             for s in (4, 6, 8)}
    assert saved[4]["data"]["seq_len"] == 64 and saved[6]["data"]["seq_len"] == 128
    assert saved[6]["train"]["global_batch"] == 4 and saved[8]["model"]["rope_theta"] == 1e6
    assert all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("at", [4, 6], ids=["at-the-stage-change", "inside-a-stage"])
def test_resume_in_a_staged_run_is_exact(staged, at, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(staged / "run", run)
    for later in (s for s in (6, 8) if s > at):
        shutil.rmtree(run / "checkpoints" / str(later))
    assert train(staged / "stages.toml", run) == 0
    redone = [r for r in read_metrics(run) if r.get("redo")]
    assert [r["step"] for r in redone] == list(range(at + 1, 9))
    want = losses(staged / "run")
    assert {r["step"]: r["loss"] for r in redone} == {s: want[s] for s in range(at + 1, 9)}


def test_a_changed_past_stage_is_refused(staged, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(staged / "run", run)
    changed = tmp_path / "stages.toml"
    changed.write_text(STAGES.replace("seq_len = 128", "seq_len = 256"))
    (tmp_path / "mesh.toml").write_text("[mesh]\nfsdp = -1\n")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train(changed, run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.seq_len: saved 128, now 256" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("stage,mesh,message", [
    ("start_step = 0\nseq_len = 128", "fsdp = -1", "must be positive and increasing"),
    ("start_step = 4\nseq_len = 102\ncp = 2", "fsdp = -1", "divisible by 2*cp=4"),
    ("start_step = 4\nseq_len = 128\ncp = 2", "fsdp = 8", "needs a mesh with one axis at -1"),
    ("start_step = 4\nseq_len = 1024", "fsdp = -1", "exceeds model.max_seq_len=512"),
])
def test_bad_stages_are_one_line_before_compiling(tmp_path, capsys, stage, mesh, message):
    (tmp_path / "stages.toml").write_text(STAGES.split("[[train")[0] + "[[train.context_stages]]\n" + stage + "\n")
    (tmp_path / "mesh.toml").write_text(f"[mesh]\n{mesh}\n")
    assert train(tmp_path / "stages.toml", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_compile_only_plans_every_stage(staged, capsys):
    assert train(staged / "stages.toml", staged / "plan", "--compile-only") == 0
    out = capsys.readouterr().out
    assert "context stage 1 of 2: steps 1-4, seq_len 64" in out
    assert "context stage 2 of 2: steps 5-8, seq_len 128" in out
    assert out.count("per device:") == 2 and "cp=2" in out


# ------------------------------------------------------------------ the presets

@pytest.mark.parametrize("config,mesh,devices", [
    ("llama3.1-8b-longctx", "gpu-multinode", 512), ("llama3.1-70b-longctx", "gpu-multinode", 512),
    ("llama3.1-405b-longctx", "gpu-405b-longctx", 8192)])
def test_presets_encode_six_stages_to_128k(config, mesh, devices):
    cfg, mesh_cfg = load_config(config), load_mesh(mesh)
    context.check(cfg, mesh_cfg, devices)  # every stage divides over its mesh
    stages = [context.apply(cfg, mesh_cfg, k) for k in range(len(cfg.train.context_stages) + 1)]
    lengths = [c.data.seq_len for c, _ in stages]
    assert len(stages) == 6 and lengths == sorted(lengths) and lengths[0] > 8192 and lengths[-1] == 131072
    assert len({c.train.global_batch * c.data.seq_len for c, _ in stages}) == 1  # constant tokens per batch
    assert stages[-1][1].cp == 16 and all(m.cp >= 1 for _, m in stages)
    assert 7.5e11 < context.tokens_at(cfg, cfg.train.steps) < 8.5e11  # the paper's ~800B tokens
    assert all(c.model.loss_chunk and c.model.attention_impl == "xla_chunked" for c, _ in stages)
