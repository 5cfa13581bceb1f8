"""The needle-in-a-haystack evaluation: a small model trained briefly on the synthetic retrieval
task (train.py on make-data's corpus) finds the needle at its trained length; the generator
is checked against independent re-encodings of its text; bad input is one line, exit 2."""

import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from llama3_jax.eval import needle
from llama3_jax.eval.haystack import (AGAIN, ANSWER, DATA_STREAM, FILLER, HEADER, QUESTION, task_for,
                                      trial_rng)
from llama3_jax.formats.bpe import default_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTH = 128  # the trained length: data.seq_len, and every training document's tokens
STEPS = 350
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
TRIALS = 10
# debug-tiny (2 layers, dim 64, 4 heads, tied embeddings) with 4 KV heads and a learning rate
# at which retrieval appears within the steps: 13 seeds of corpus, initialisation and data
# order all reached 100% here (with 300 steps, 11 of 12 did; retrieval appears at 150-300).
TRAIN = ["--config", "debug-tiny", "--steps", str(STEPS), f"data.seq_len={LENGTH}", "train.global_batch=16",
         "train.lr=2e-2", "train.warmup_steps=20", "model.n_kv_heads=4", f"train.checkpoint_every={STEPS}",
         "train.sample_tokens=2"]
NEEDLE_START = " The special magic number is "


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("needle") / "needle.jsonl"
    assert needle.main(["make-data", "--length", str(LENGTH), "--docs", str(STEPS * 16), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def trained(corpus):
    out = corpus.parent / "run"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # train.py asks for the devices its mesh needs
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(out), *TRAIN, f"data.path={corpus}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def evaluated(trained):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = needle.main([str(trained), "--lengths", str(LENGTH), "--depths", ",".join(map(str, DEPTHS)),
                          "--trials", str(TRIALS)])
    assert rc == 0
    return trained / "eval" / f"needle-step{STEPS}", stdout.getvalue()


# ------------------------------------------------------------------------------ retrieval

def test_trained_model_finds_the_needle_at_its_trained_length(tok, evaluated):
    out, _ = evaluated
    result = json.loads((out / "needle.json").read_text())
    cells = result["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(LENGTH, d) for d in DEPTHS]
    for c in cells:
        assert len(c["trials"]) == TRIALS
        # prompt + answer + end-of-text = the length
        assert c["prompt_tokens"] + len(tok.encode(ANSWER.format(value=c["trials"][0]["value"]))) + 1 == LENGTH
        # each trial judged again here: the continuation starts with the value, no digit after it
        again = [bool(re.match(rf"\s*{t['value']}(?!\d)", t["completion"])) for t in c["trials"]]
        assert [t["correct"] for t in c["trials"]] == again
        assert c["accuracy"] == pytest.approx(np.mean(again))
    mean = float(np.mean([c["accuracy"] for c in cells]))
    assert result["by_length"][str(LENGTH)] == pytest.approx(mean)
    print(f"needle accuracy at {LENGTH} tokens: {mean:.0%} by depth {[c['accuracy'] for c in cells]}")
    assert mean >= 0.9, cells
    # Many different values were asked for: a model that ignored the needle could not score so.
    assert len({t["value"] for c in cells for t in c["trials"]}) >= 10


def test_table_json_and_heatmap_agree(evaluated):
    out, printed = evaluated
    result = json.loads((out / "needle.json").read_text())
    settings = result["settings"]
    assert (settings["lengths"], settings["depths"], settings["trials"], settings["step"]) == \
        ([LENGTH], DEPTHS, TRIALS, STEPS)
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
            if line.split() and line.split()[0] in {*(f"{d:g}" for d in DEPTHS), "mean"}}
    for c in result["cells"]:
        assert rows[f"{c['depth']:g}"] == [f"{c['accuracy']:.0%}"]
    assert rows["mean"] == [f"{result['by_length'][str(LENGTH)]:.0%}"]
    png = (out / "needle.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ------------------------------------------------------------------------------ the generator

def needle_span(text: str, value: str) -> tuple[int, int]:
    """Characters [start, end) of the needle: its first sentence and the repeats after it."""
    start = text.index(NEEDLE_START)
    end = start + len(NEEDLE_START) + len(value) + 1 + len(" Say it again: ") + \
        len(", ".join([value] * AGAIN)) + 1
    return start, end


def filler_counts(tok, text: str, value: str) -> tuple[int, int]:
    """(filler tokens before the needle, filler tokens in all), counted from the text alone."""
    start, end = needle_span(text, value)
    header = len(tok.encode(HEADER))
    before = len(tok.encode(text[:start])) - header
    total = len(tok.encode(text)) - header - len(tok.encode(text[start:end])) - len(tok.encode(" " + QUESTION))
    return before, total


@pytest.mark.parametrize("length", [96, LENGTH, 300, 1000])
def test_prompts_have_the_length_the_value_only_in_the_needle_at_its_depth(tok, length):
    task = task_for(tok)
    half_sentence = max(len(tok.encode(" " + s)) for s in FILLER) / 2
    values = set()
    for d, depth in enumerate(DEPTHS + [0.1, 0.9]):
        for i in range(4):
            t = task.trial(length, depth, trial_rng(7, 0, length, d, i))
            answer = tok.encode(ANSWER.format(value=t.value))
            # prompt + answer + end-of-text is the length, encoded from the text alone
            assert tok.encode(t.text, bos=True) == t.prompt
            assert len(t.prompt) + len(answer) + 1 == length
            assert len(tok.encode(t.document(), bos=True, eos=True)) == length
            assert t.text.startswith(HEADER) and t.text.endswith(" " + QUESTION)
            # the value is one token; every number in the prompt is it, inside the needle
            assert len(tok.encode(t.value)) == 1
            start, end = needle_span(t.text, t.value)
            assert t.text[start:end] == f" The special magic number is {t.value}. Say it again: " + \
                ", ".join([t.value] * AGAIN) + "."
            assert [m.group() for m in re.finditer(r"\d+", t.text)] == [t.value] * (AGAIN + 1)
            assert all(start <= m.start() < end for m in re.finditer(r"\d+", t.text))
            # the needle's token position and its depth in the filler, within half a sentence
            assert len(tok.encode(t.text[:start], bos=True)) == t.needle[0]
            assert len(tok.encode(t.text[:end], bos=True)) == t.needle[1]
            before, total = filler_counts(tok, t.text, t.value)
            assert abs(before - depth * total) <= half_sentence + 1, (depth, before, total)
            assert t.actual_depth == pytest.approx(before / total)
            if depth in (0, 1):
                assert before == depth * total
            values.add(t.value)
    assert len(values) >= 8


def test_trials_are_seeded(tok):
    task = task_for(tok)
    a = task.trial(LENGTH, 0.5, trial_rng(3, 0, LENGTH, 2, 5))
    assert a == task.trial(LENGTH, 0.5, trial_rng(3, 0, LENGTH, 2, 5))
    assert len({task.trial(LENGTH, 0.5, trial_rng(s, 0, LENGTH, 2, 5)).value for s in range(20)}) >= 8


def test_make_data_writes_documents_of_the_length_with_uniform_depths(tok, corpus):
    lines = corpus.read_text().splitlines()
    assert len(lines) == STEPS * 16
    needles, totals = [], set()
    for line in lines[:400]:
        text = json.loads(line)["text"]
        assert len(tok.encode(text, bos=True, eos=True)) == LENGTH  # one document per row of seq_len
        value = re.findall(r"\d+", text)[0]
        assert text.endswith(" " + QUESTION + ANSWER.format(value=value))
        assert re.findall(r"\d+", text) == [value] * (AGAIN + 2)
        before, total = filler_counts(tok, text[:-len(ANSWER.format(value=value))], value)
        needles.append(before)
        totals.add(total)
    # Depth uniform in [0, 1], snapped to the nearest sentence boundary: each boundary holds
    # the needle as often as the stretch of depths nearest to it is long.
    (total,) = totals
    spots = sorted(set(needles))
    assert spots[0] == 0 and spots[-1] == total and len(spots) >= 5
    edges = [0.0, *((a + b) / 2 / total for a, b in zip(spots, spots[1:])), 1.0]
    for spot, lo, hi in zip(spots, edges, edges[1:]):
        expected = 400 * (hi - lo)
        assert abs(needles.count(spot) - expected) <= 4 * expected ** 0.5 + 2, (spot, needles.count(spot), expected)
    # the corpus comes from the training stream, not the evaluation's
    rng = trial_rng(0, DATA_STREAM, LENGTH, 0, 0)
    assert json.loads(lines[0])["text"] == task_for(tok).trial(LENGTH, float(rng.uniform()), rng).document()


# ------------------------------------------------------------------------------ bad input

def one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line_before_weights_load(trained, tmp_path, capsys, monkeypatch):
    import llama3_jax.infer.generate as generate

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(generate, "load_for_inference", no_weights)
    run = str(trained)
    line = one_error_line(capsys, needle.main([run, "--lengths", "128,1024"]))
    assert "1024" in line and "max_seq_len=512" in line and "up to 512" in line
    line = one_error_line(capsys, needle.main([run, "--lengths", "20"]))
    assert "too short" in line and re.search(r"at least \d+", line)
    line = one_error_line(capsys, needle.main([run, "--lengths", "128", "--depths", "0,0.5,1.5"]))
    assert "1.5" in line and "[0, 1]" in line
    line = one_error_line(capsys, needle.main([run, "--lengths", "128,abc"]))
    assert "--lengths" in line
    line = one_error_line(capsys, needle.main([str(tmp_path), "--lengths", "128"]))
    assert "holds no weights" in line
    line = one_error_line(capsys, needle.main([run, "--lengths", "128", "--step", "7"]))
    assert "no checkpoint at step 7" in line
    line = one_error_line(capsys, needle.main(["make-data", "--length", "20", "--out", str(tmp_path / "x.jsonl")]))
    assert "too short" in line and not (tmp_path / "x.jsonl").exists()
