"""The data schedule: annealing reads its own mix for the last steps, a resume on either side
of the switch is exact, and the run reports the mix it read (rows per source, exact)."""

import json
import shutil

import pytest

from llama3_jax.config import load_config
from llama3_jax.data.schedule import ScheduledBatches, make_batches
from llama3_jax.formats.bpe import default_tokenizer
from llama3_jax.train.loop import cli
from llama3_jax.train.metrics import read_metrics

STEPS, ANNEAL, BATCH = 12, 4, 8


def corpus(folder, word, docs=60):
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": " ".join(f"{word}{(i * 7 + j) % 13}" for j in range(40))}) + "\n")


@pytest.fixture(scope="module")
def annealed(tmp_path_factory):
    root = tmp_path_factory.mktemp("anneal")
    for name, word in (("web", "alpha"), ("code", "beta"), ("best", "omega")):
        corpus(root / name, word)
    (root / "run.toml").write_text(f"""base = "debug-tiny"
[data]
anneal_steps = {ANNEAL}
[[data.sources]]
path = "{root / 'web'}"
weight = 3.0
[[data.sources]]
path = "{root / 'code'}"
weight = 1.0
[[data.anneal_sources]]
path = "{root / 'best'}"
[train]
steps = {STEPS}
global_batch = {BATCH}
checkpoint_every = 2
keep_checkpoints = 20
sample_tokens = 2
compile_cache = "off"
""")
    (root / "mesh.toml").write_text("[mesh]\nfsdp = -1\n")  # the test process's 8 devices
    assert train(root, root / "run") == 0
    return root


def train(root, out, *extra):
    return cli(["--config", str(root / "run.toml"), "--mesh", str(root / "mesh.toml"), "--out", str(out), *extra])


def test_annealing_reads_its_mix_for_the_last_steps_only(annealed):
    cfg = load_config(str(annealed / "run.toml"))
    tok = default_tokenizer()
    batches = make_batches(cfg.data, tok, global_batch=BATCH, seq_len=cfg.data.seq_len, steps=STEPS)
    assert isinstance(batches, ScheduledBatches) and batches.switch == STEPS - ANNEAL
    words = []
    for step in range(STEPS):
        batches.select(step)
        text = tok.decode([t for t in next(batches)["tokens"].ravel().tolist() if t < 1792])
        words.append({w for w in ("alpha", "beta", "omega") if w in text})
    assert all(w == {"alpha", "beta"} for w in words[:STEPS - ANNEAL])
    assert all(w == {"omega"} for w in words[STEPS - ANNEAL:])
    batches.select(STEPS - ANNEAL - 1)  # a rollback to before the switch reads the main mix again
    assert "omega" not in tok.decode([t for t in next(batches)["tokens"].ravel().tolist() if t < 1792])


def test_the_run_reports_the_rows_it_read_from_each_source(annealed):
    event = json.loads((annealed / "run" / "data_mix.json").read_text())
    rows = {r["name"].rsplit("/", 1)[-1]: r["rows"] for r in event["sources"]}
    assert rows["best"] == ANNEAL * BATCH  # exactly the annealing steps' rows
    assert rows["web"] + rows["code"] == (STEPS - ANNEAL) * BATCH
    assert abs(rows["web"] / (rows["web"] + rows["code"]) - 0.75) <= 2 / ((STEPS - ANNEAL) * BATCH)


@pytest.mark.parametrize("at", [6, 8], ids=["before-the-switch", "at-the-switch"])
def test_resume_across_the_switch_is_exact(annealed, tmp_path, at):
    run = tmp_path / "run"
    shutil.copytree(annealed / "run", run)
    for step in range(at + 2, STEPS + 1, 2):
        shutil.rmtree(run / "checkpoints" / str(step))
    assert train(annealed, run) == 0
    first = {r["step"]: r["loss"] for r in read_metrics(annealed / "run") if "loss" in r}
    redone = {r["step"]: r["loss"] for r in read_metrics(run) if r.get("redo")}
    assert redone == {s: first[s] for s in range(at + 1, STEPS + 1)}


def test_annealing_needs_both_keys(annealed, tmp_path, capsys):
    assert cli(["--config", "debug-tiny", "--mesh", str(annealed / "mesh.toml"), "--out", str(tmp_path / "run"),
                "data.anneal_steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.anneal_steps" in err[0] and "anneal_sources" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [2, STEPS - ANNEAL - 1], ids=["in-place", "across-the-switch"])
def test_a_rollback_trains_what_a_run_told_to_skip_the_batch_does(annealed, tmp_path, monkeypatch, bad):
    """A NaN batch rolls back at once. Its step applied no update, so the run goes on from the
    state in memory, keeping the step already in flight; only when the batches drawn since
    then straddle the switch to the annealing mix does it reload its checkpoint (every 2 steps
    here: the one at step 6)."""
    import numpy as np

    from llama3_jax.formats.run import RunSource
    monkeypatch.setenv("LLAMA3_JAX_FAULTS", f"nan@{bad}")
    assert train(annealed, tmp_path / "faulty", "train.rollback_after=1") == 0
    monkeypatch.delenv("LLAMA3_JAX_FAULTS")
    assert train(annealed, tmp_path / "clean", f"train.skip_batches={bad}") == 0
    rows = read_metrics(tmp_path / "faulty")
    [rollback] = [r for r in rows if r.get("event") == "rollback"]
    assert rollback["skip_batches"] == f"{bad}-{bad}" and rollback["bad_steps"] == f"{bad + 1}-{bad + 1}"
    assert rollback["step"] == (bad if bad == 2 else 6)
    assert [r["batch"] for r in read_metrics(tmp_path / "faulty", latest=True) if "loss" in r] == \
        [r["batch"] for r in read_metrics(tmp_path / "clean") if "loss" in r]
    a, b = RunSource(tmp_path / "faulty"), RunSource(tmp_path / "clean")
    for k in a.dtypes:
        np.testing.assert_array_equal(a.whole(k), b.whole(k))
