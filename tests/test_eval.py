"""Evaluation: the held-out loss of train.py, and lm-evaluation-harness on our model.

Oracles: lm-eval's own `hf` model on the same weights exported `to-hf`, transformers'
LlamaForCausalLM, and the 1-device eval loss.
"""

import dataclasses
import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama3_jax.config import DataConfig, DataSource, MeshConfig, load_config
from llama3_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"
STEPS = 40


def env():
    e = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    e.pop("XLA_FLAGS", None)  # train.py asks for the devices its mesh needs
    return e


os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # nothing is downloaded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The no-argument default run (debug config, stdlib corpus, own BPE), shortened, with
    held-out loss every 20 steps."""
    out = tmp_path_factory.mktemp("eval") / "run"
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(out), "--steps", str(STEPS),
                        "train.eval_every=20"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


@pytest.fixture(scope="module")
def hf_dir(trained):
    from llama3_jax.formats import convert
    out = trained[0].parent / "hf"
    assert convert.main(["to-hf", str(trained[0]), str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def ours(trained):
    from llama3_jax.eval.harness import JaxLM
    from llama3_jax.infer.generate import load_for_inference
    params, cfg, tok, mesh = load_for_inference(trained[0], dtype="float32")
    return JaxLM(params, cfg, tok, mesh=mesh, batch_size=4)


# ------------------------------------------------------------------------------ held-out loss

def tensorboard_steps(run, tag):
    """Steps of `tag`'s scalars in a run's TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    steps = []
    for f in sorted(run.glob("events.out.tfevents*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            steps += [event.step for v in event.summary.value if v.tag == tag]
            i += 12 + n + 4
    return steps


def test_default_run_loss_and_held_out_loss_fall_together(trained):
    out, stdout = trained
    records = read_metrics(out, latest=True)
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-5:]])
    assert first > 7.0  # ~ln(2048) at initialisation
    assert last < first - 1.5, (first, last)
    assert "sample:" in stdout and "loss curve:" in stdout
    evals = [r for r in read_metrics(out) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["eval_loss/<default corpus>"] == r["eval_loss"] and r["eval_tokens"] > 4 * 16 * 200
    assert evals[0]["eval_loss"] > evals[1]["eval_loss"] + 0.2
    assert abs(evals[-1]["eval_loss"] - last) < 1.0  # held-out files, same kind of text: near the train loss
    assert f"eval perplexity at step {STEPS}: {evals[-1]['eval_ppl']:.2f}" in stdout
    assert tensorboard_steps(out, "eval/loss") == [20, 40]


def test_benchmark_of_a_training_run_scores_its_parameters(trained, ours, tmp_path):
    """train.benchmark_every's Benchmark on the run's parameters: scores as lm-eval reports
    them, the results JSON under the run; an unknown task is refused up front."""
    from llama3_jax.config import ConfigError
    from llama3_jax.eval.harness import Benchmark
    from llama3_jax.formats.run import read_config
    cfg = read_config(trained[0])[0]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, benchmark_tasks="llama3_jax_mc",
                                                             benchmark_include=str(TASKS), benchmark_every=10))
    scores = Benchmark(cfg, ours.tok, ours.mesh, tmp_path)(ours.params, step=STEPS, log=lambda *a: None)
    saved = json.loads((tmp_path / "eval" / f"benchmark-step{STEPS}.json").read_text())
    assert scores == {"benchmark/llama3_jax_mc/acc": saved["results"]["llama3_jax_mc"]["acc,none"]}
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        Benchmark(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, benchmark_tasks="nope")),
                  ours.tok, ours.mesh, tmp_path)


def test_held_out_files_are_never_trained_on_and_batches_are_fixed():
    from llama3_jax.data import heldout_batches, open_sources
    from llama3_jax.formats.bpe import default_tokenizer
    data = DataConfig(seq_len=64)
    train = {p for _, docs, _ in open_sources(data, "train") for p in docs.paths}
    held = {p for _, docs, _ in open_sources(data, "eval") for p in docs.paths}
    assert held and not held & train and len(held) < 0.05 * len(train)
    tok = default_tokenizer()
    a, b = (heldout_batches(data, tok, global_batch=4, seq_len=64, batches=2) for _ in range(2))
    assert [n for n, _ in a] == ["<default corpus>"] and len(a[0][1]) == 2
    for x, y in zip(a[0][1], b[0][1]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_eval_fraction_splits_a_source_and_eval_sources_replace_it(tmp_path):
    from llama3_jax.data import open_sources
    from llama3_jax.data.sources import check_data
    from llama3_jax.config import ConfigError
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(200)))
    data = DataConfig(sources=(DataSource(str(docs)),), eval_fraction=0.1)
    (_, train, _), = open_sources(data, "train")
    (_, held, _), = open_sources(data, "eval")
    texts = lambda d: {d[i] for i in range(len(d))}  # noqa: E731
    assert len(held) == 20 and len(train) == 180 and not texts(held) & texts(train)
    other = DataConfig(sources=(DataSource(str(docs)),), eval_sources=(DataSource(str(docs)),))
    assert len(open_sources(other, "train")[0][1]) == 200 and len(open_sources(other, "eval")[0][1]) == 200
    with pytest.raises(ConfigError, match="not both"):
        check_data(DataConfig(sources=data.sources, eval_sources=data.sources, eval_fraction=0.1), 4)


def test_eval_loss_on_fsdp2_tp2_equals_one_device():
    from llama3_jax.formats.bpe import default_tokenizer
    from llama3_jax.train.step import Trainer
    from llama3_jax.train.validation import Validation
    cfg = load_config("debug-tiny", ["model.compute_dtype=float32", "data.seq_len=64", "train.eval_batches=2"])
    tok = default_tokenizer()
    one = Trainer(cfg, MeshConfig(), devices=jax.devices()[:1])
    params = jax.device_get(one.init_state()["params"])
    many = Trainer(cfg, MeshConfig(fsdp=2, tp=2), devices=jax.devices()[:4])
    sharded = jax.device_put(params, jax.tree.map(lambda a: a.sharding, many.abstract_state()["params"]))
    want = Validation(one, tok)(jax.device_put(params, jax.devices()[0]))
    got = Validation(many, tok)(sharded)
    assert got["eval_tokens"] == want["eval_tokens"] > 0
    np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ lm-eval adapter

def samples_of(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_and_generations_equal_lm_evals_hf_model(ours, hf_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from llama3_jax.eval.harness import run_tasks, task_manager
    tasks = ["llama3_jax_mc", "llama3_jax_gen"]
    manager = task_manager(tasks, str(TASKS))
    mine = run_tasks(ours, tasks, manager, bootstrap_iters=0, log_samples=True)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu")
    theirs = lm_eval.simple_evaluate(model=hf, tasks=tasks, task_manager=manager, bootstrap_iters=0,
                                     log_samples=True)
    a, b = samples_of(mine, "llama3_jax_mc"), samples_of(theirs, "llama3_jax_mc")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        ll_x, ll_y = (np.array([float(r[0][0]) for r in s["resps"]]) for s in (x, y))
        np.testing.assert_allclose(ll_x, ll_y, rtol=0, atol=1e-4)
        assert [bool(r[0][1]) for r in x["resps"]] == [bool(r[0][1]) for r in y["resps"]]
    assert mine["results"]["llama3_jax_mc"]["acc,none"] == theirs["results"]["llama3_jax_mc"]["acc,none"]
    gen_a, gen_b = samples_of(mine, "llama3_jax_gen"), samples_of(theirs, "llama3_jax_gen")
    assert [s["filtered_resps"] for s in gen_a] == [s["filtered_resps"] for s in gen_b]
    assert mine["results"]["llama3_jax_gen"]["exact_match,none"] == \
        theirs["results"]["llama3_jax_gen"]["exact_match,none"]


def test_rolling_perplexity_equals_transformers(ours, hf_dir):
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    texts = [json.loads(line)["text"] for line in (TASKS / "text.jsonl").read_text().splitlines()]
    got = ours.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for text, logp in zip(texts, got):
        ids = torch.tensor([[ours.tok.bos_id] + ours.tok.encode(text)])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        want = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].sum().item()
        n = ids.shape[1] - 1
        assert math.exp(-logp / n) == pytest.approx(math.exp(-want / n), rel=1e-4)
    # Windows shorter than the text score every token once: the total stays close.
    short = type(ours)(ours.params, ours.cfg, ours.tok, mesh=ours.mesh, batch_size=4, max_length=16)
    windowed = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[2],), 0)])[0]
    assert windowed < 0 and windowed != got[2]


def test_evaluate_command_prints_a_table_and_saves_json(trained, capsys):
    from llama3_jax.eval.cli import main
    run = trained[0]
    mesh = run.parent / "fsdp4-tp2.toml"  # the adapter sharded over all 8 devices
    mesh.write_text("[mesh]\nfsdp = 4\ntp = 2\n")
    assert main([str(run), "--tasks", "llama3_jax_text", "--include-path", str(TASKS), "--bootstrap-iters", "0",
                 "--mesh", str(mesh), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "llama3_jax_text" in out and "word_perplexity" in out
    saved = json.loads((run / "eval" / f"results-step{STEPS}.json").read_text())
    assert saved["results"]["llama3_jax_text"]["word_perplexity,none"] > 1


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
    (["--tasks", "llama3_jax_mc", "--tokenizer", str(REPO.parent / "shared" / "llama3-tokenizer" / "tokenizer.model")],
     "tokenizer"),
])
def test_bad_input_is_one_line(trained, capsys, extra, message):
    from llama3_jax.eval.cli import main
    assert main([str(trained[0]), "--include-path", str(TASKS), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_a_run_directory_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from llama3_jax.eval.cli import main
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main([str(tmp_path / "run"), "--tasks", "llama3_jax_mc", "--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "checkpoint" in err and "\n" not in err
