"""Post-training: chat rows against the tokenizer's own chat format, the SFT loss against
transformers, DPO and Bradley-Terry against NumPy formulas, a mesh against one device,
learning on the synthetic task, and exact resume after a SIGKILL."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama3_jax.align import objectives, ppo, stages, task
from llama3_jax.config import ConfigError, DataConfig, MeshConfig, load_config
from llama3_jax.data.chat import as_example, chat_tokens, load_examples, make_chat_iterator, pairs_batch, rows_batch
from llama3_jax.formats import convert
from llama3_jax.formats.bpe import default_tokenizer
from llama3_jax.infer.generate import load_for_inference
from llama3_jax.parallel.sharding import make_mesh
from llama3_jax.train.metrics import read_metrics
from llama3_jax.train.step import Trainer

from conftest import REPO

TOK = default_tokenizer(2048)
# The synthetic task small enough to learn in seconds on 2 cores.
TASK = ["data.seq_len=64", "train.global_batch=16", "align.task_max_operand=5"]
# PPO: rollouts of 128 answers, 4 updates each (2 epochs x 2 mini-batches).
PPO = ["train.global_batch=64", "data.seq_len=32", "train.lr=1e-3", "train.warmup_steps=0", "train.checkpoint_every=40"]


def train(out, stage, steps, *extra, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (env_extra or {})
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "debug-tiny", "--stage", stage,
                        "--steps", str(steps), "--out", str(out), *TASK, *extra],  # later overrides win
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def evaluation(out) -> dict:
    return [r for r in read_metrics(out) if r.get("event") == "evaluation"][-1]


def losses(out) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out, latest=True) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT from scratch on the task, kept short so that DPO, PPO and rejection sampling have
    room to improve on it; a longer SFT and a reward model from that. Both SFTs run at 3e-3,
    where training is stable: at 6e-3 a 2% change of the rate moved the task accuracy from
    0.56 to 0.27. Over 2% changes of the rate and +-10 steps, the short SFT's accuracy was
    0.53-0.58, DPO's held-out accuracy 0.84-0.95 and PPO's gain in answer probability 0.08-0.17."""
    work = tmp_path_factory.mktemp("align")
    train(work / "sft", "sft", 150, "train.lr=3e-3")
    train(work / "sft-long", "sft", 300, "train.lr=3e-3")
    # With fewer pairs a step, the reward model's ranking swung from 0.78 to 1.0 with rounding-level
    # changes. These settings gave 0.97-1.0 over five 2% changes of either rate.
    train(work / "rm", "rm", 300, "train.lr=2e-3", "train.global_batch=128", f"train.init_from={work / 'sft-long'}")
    train(work / "dpo", "dpo", 60, "train.lr=1e-3", f"train.init_from={work / 'sft'}")
    train(work / "ppo", "ppo", 80, *PPO, f"train.init_from={work / 'sft'}")
    return work


# ---------------------------------------------------------------- rows

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3 ="},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4 + 4 ="},
                {"role": "assistant", "content": " It is 8. "}]


def test_chat_rows_are_the_chat_format_with_answers_masked():
    ids, mask = chat_tokens(TOK, CONVERSATION)
    assert ids.tolist() == TOK.encode_dialog(CONVERSATION, add_generation_prompt=False)
    # The learned tokens are each assistant content and its <|eot_id|>, nothing else.
    want = [*TOK.encode("5"), TOK.eot_id, *TOK.encode("It is 8."), TOK.eot_id]
    assert ids[mask].tolist() == want
    ids, content_only = chat_tokens(TOK, CONVERSATION, formatting=False)
    assert ids[content_only].tolist() == [*TOK.encode("5"), *TOK.encode("It is 8.")]
    # Targets: a position learns its next token where that token is an answer token.
    x = as_example(ids, mask)
    assert np.array_equal(x[:-1, 1] >= 0, mask[1:]) and x[-1, 1] == -1


def test_bad_rows_name_the_file_and_line_or_are_counted_and_skipped(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = [{"messages": [{"role": "robot", "content": "x"}]}, {"conversation": []}, "not json",
           {"messages": [{"role": "user", "content": "y " * 100}, {"role": "assistant", "content": "z"}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good)] + [b if isinstance(b, str) else json.dumps(b) for b in bad]) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: .*unknown role 'robot'.*skip_bad_rows"):
        load_examples(DataConfig(path=str(path)), TOK, "sft", 64)
    examples, skipped = load_examples(DataConfig(path=str(path), skip_bad_rows=True), TOK, "sft", 64)
    assert len(examples) == 1 and [w for w, _ in skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "missing field 'messages'" in skipped[1][1] and "longer than data.seq_len=64" in skipped[3][1]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
                                 "rejected": [{"role": "user", "content": "b"}]}) + "\n")
    with pytest.raises(ConfigError, match=rf"{pairs}:1: field 'rejected' holds a 'user' message"):
        load_examples(DataConfig(path=str(pairs)), TOK, "pairs", 64)


def test_the_task_command_writes_its_output_and_nothing_beside_it(tmp_path):
    (tmp_path / "sft.jsonl").write_text("the user's own rows\n")
    assert task.main(["sft", str(tmp_path / "mine.jsonl"), "--rows", "7", "--max-operand", "5"]) == 0
    assert (tmp_path / "sft.jsonl").read_text() == "the user's own rows\n"
    assert (tmp_path / "mine.jsonl").read_text().splitlines() == [json.dumps(r) for r in task.rows("sft", 7, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl", "sft.jsonl"]


def test_parquet_rows_read_as_the_jsonl_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = task.write_task(tmp_path, "pairs", 20, 5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    from_jsonl, _ = load_examples(DataConfig(path=str(path)), TOK, "pairs", 64)
    from_parquet, _ = load_examples(DataConfig(path=str(tmp_path / "pairs.parquet")), TOK, "pairs", 64)
    assert len(from_parquet) == 20
    assert all(np.array_equal(a, b) for x, y in zip(from_jsonl, from_parquet) for a, b in zip(x, y))


def test_sft_rows_pack_whole_conversations_and_resume_exactly(tmp_path):
    path = task.write_task(tmp_path, "sft", 50, 5)
    data = DataConfig(path=str(path), seed=3)
    examples, _ = load_examples(data, TOK, "sft", 64)
    it = make_chat_iterator(examples, "sft", data, global_batch=4, seq_len=64)
    seen = [next(it) for _ in range(3)]
    for b in seen:  # every segment is a whole conversation: it starts with <|begin_of_text|> at position 0
        starts = (b["positions"] == 0) & (b["segment_ids"] > 0)
        assert np.all(b["tokens"][starts] == TOK.bos_id)
        assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
    state = it.get_state()
    after = next(it)
    again = make_chat_iterator(examples, "sft", data, global_batch=4, seq_len=64)
    again.set_state(state)
    resumed = next(again)
    assert all(np.array_equal(v, resumed[k]) for k, v in after.items())


# ---------------------------------------------------------------- losses against oracles

def test_sft_loss_equals_transformers_with_ignored_labels(runs, tmp_path):
    assert convert.main(["to-hf", str(runs / "sft"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    params, model_cfg, tok, _ = load_for_inference(runs / "sft", dtype="float32")
    cfg = dataclasses.replace(load_config("debug-tiny"), model=model_cfg)
    examples, _ = load_examples(DataConfig(path=str(runs / "sft" / "task" / "sft.jsonl")), tok, "sft", 64)
    batch = rows_batch([x for (x,) in examples[:6]], 48)  # one conversation per row, from position 0
    loss, sums = objectives.sft(cfg, True)(params, batch)
    ours = float(loss / sums["count"])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    labels = np.where(np.concatenate([np.zeros((6, 1)), batch["loss_mask"][:, :-1]], 1) > 0, batch["tokens"], -100)
    with torch.no_grad():
        theirs = hf(torch.tensor(batch["tokens"], dtype=torch.long), attention_mask=torch.tensor(batch["segment_ids"]),
                    labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    assert abs(ours - theirs) < 1e-5, (ours, theirs)


def test_gae_grpo_and_the_clipped_objective_equal_numpy_formulas():
    rng = np.random.default_rng(1)
    b, s = 3, 7
    mask = np.zeros((b, s), np.float32)
    for i, (lo, hi) in enumerate([(2, 6), (1, 7), (4, 5)]):
        mask[i, lo:hi] = 1
    rewards, values = rng.normal(size=(b, s)) * mask, rng.normal(size=(b, s)) * mask
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i in range(b):  # A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t
        idx = np.flatnonzero(mask[i])
        v = np.append(values[i, idx], 0.0)
        delta = rewards[i, idx] + gamma * v[1:] - v[:-1]
        want = [sum((gamma * lam) ** k * delta[t + k] for k in range(len(idx) - t)) for t in range(len(idx))]
        np.testing.assert_allclose(adv[i, idx], want, rtol=1e-5)
        np.testing.assert_allclose(ret[i, idx], np.asarray(want) + values[i, idx], rtol=1e-5)
    scores = rng.integers(0, 2, 8).astype(np.float32)
    g = scores.reshape(2, 4)
    np.testing.assert_allclose(ppo.group_advantages(scores, 4),
                               ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1),
                               rtol=1e-5)
    # The clipped policy and value losses, the entropy, the clip fraction and GRPO's k3 KL.
    logp_all = np.log(rng.dirichlet(np.ones(5), (b, s))).astype(np.float32)
    logp = logp_all[..., 0]
    batch = {"loss_mask": mask, "advantages": rng.normal(size=(b, s)).astype(np.float32),
             "old_logps": (logp + rng.normal(0, 0.3, (b, s))).astype(np.float32),
             "ref_logps": (logp + rng.normal(0, 0.3, (b, s))).astype(np.float32),
             "values": rng.normal(size=(b, s)).astype(np.float32), "returns": rng.normal(size=(b, s)).astype(np.float32)}
    v = (batch["values"] + rng.normal(0, 0.5, (b, s))).astype(np.float32)
    for grpo in (False, True):
        a = dataclasses.replace(load_config().align, grpo=grpo)
        total, sums = ppo.losses(jnp.asarray(logp), jnp.asarray(logp_all), jnp.asarray(v),
                                 {k: jnp.asarray(x) for k, x in batch.items()}, a)
        r = np.exp(logp - batch["old_logps"])
        A = batch["advantages"]
        pol = np.maximum(-r * A, -np.clip(r, 0.8, 1.2) * A)
        vc = batch["values"] + np.clip(v - batch["values"], -0.2, 0.2)
        val = 0.5 * np.maximum((v - batch["returns"]) ** 2, (vc - batch["returns"]) ** 2)
        d = batch["ref_logps"] - logp
        kl = np.exp(d) - d - 1
        want = np.sum((pol + (0.05 * kl if grpo else 0.5 * val)) * mask)
        np.testing.assert_allclose(float(total), want, rtol=1e-5)
        np.testing.assert_allclose(float(sums["entropy"]), np.sum(-(np.exp(logp_all) * logp_all).sum(-1) * mask),
                                   rtol=1e-5)
        assert float(sums["clip_fraction"]) == np.sum((np.abs(r - 1) > 0.2) * mask)


def test_dpo_and_bradley_terry_equal_numpy_formulas():
    rng = np.random.default_rng(0)
    logps, ref = rng.normal(-20, 5, 8), rng.normal(-20, 5, 8)
    tokens = rng.integers(1, 9, 4).astype(np.float32)
    ac = load_config().align
    total, sums = objectives.dpo_loss(jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(tokens), ac)
    c, r = (logps - ref)[0::2], (logps - ref)[1::2]
    pref = np.log1p(np.exp(-ac.dpo_beta * (c - r)))  # -log sigmoid
    nll = -logps[0::2] / tokens
    np.testing.assert_allclose(float(total), np.sum(pref + 0.2 * nll), rtol=1e-6)
    np.testing.assert_allclose(float(sums["dpo_loss"]), pref.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["reward_margin"]), 0.1 * np.sum(c - r), rtol=1e-6)
    assert float(sums["accuracy"]) == np.sum(c > r) and float(sums["count"]) == 4
    chosen, rejected = rng.normal(size=5), rng.normal(size=5)
    bt, s = objectives.bradley_terry(jnp.asarray(chosen), jnp.asarray(rejected))
    np.testing.assert_allclose(float(bt), -np.sum(np.log(1 / (1 + np.exp(-(chosen - rejected))))), rtol=1e-6)
    assert float(s["accuracy"]) == np.sum(chosen > rejected)


def test_sequence_logps_equal_a_numpy_log_softmax(runs):
    params, model_cfg, tok, _ = load_for_inference(runs / "sft", dtype="float32")
    cfg = dataclasses.replace(load_config("debug-tiny"), model=model_cfg)
    rows = task.rows("pairs", 3, 5, seed=1)
    pairs = [tuple(as_example(*chat_tokens(tok, r["prompt"] + r[k], False)) for k in ("chosen", "rejected"))
             for r in rows]
    batch = pairs_batch(pairs, 32)
    got = np.asarray(objectives.sequence_logps(params, batch, cfg))
    from llama3_jax.model import forward
    logits = np.asarray(forward(params, jnp.asarray(batch["tokens"]), model_cfg), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(logp[i, t, batch["targets"][i, t]] for t in np.flatnonzero(batch["loss_mask"][i])) for i in range(6)]
    # float32 log-softmax errs by a few ulps of the logits' scale, which for an answer token of
    # probability near 1 (log p near 0) is more than any relative tolerance of log p.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=8 * np.finfo(np.float32).eps * np.abs(logits).max())
    # The DPO mask holds the answer's content only: no header, no <|eot_id|>.
    assert set(tok.decode(batch["targets"][batch["loss_mask"] > 0].tolist())) <= set("-0123456789")


# ---------------------------------------------------------------- sharding

@pytest.mark.parametrize("stage,mesh", [("sft", MeshConfig(fsdp=2, tp=2)), ("dpo", MeshConfig(fsdp=2, tp=2)),
                                        ("ppo", MeshConfig(fsdp=2, tp=2)), ("rm", MeshConfig(pp=2, tp=2, pp_microbatches=2))])
def test_a_step_on_a_mesh_equals_one_device(tmp_path, stage, mesh):
    # A real update (no warmup); a large Adam eps keeps it smooth in the gradient, so float
    # reordering across devices cannot flip a near-zero gradient into an lr-sized step.
    cfg = load_config("debug-tiny", [f"train.stage={stage}", "data.seq_len=64", "train.global_batch=8",
                                     "train.steps=4", "train.checkpoint_every=4", "train.warmup_steps=0",
                                     "train.eps=1e-3"])
    cfg = stages.configure(cfg, tmp_path)
    if stage == "ppo":  # an SFT batch with made-up rollout values: the update, not the rollout, is compared
        sft_cfg = stages.configure(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage="sft"),
                                                       data=DataConfig(seq_len=64)), tmp_path)
        make, _ = stages.batches(sft_cfg, TOK, process_index=0, process_count=1, log=lambda *a: None)
        host = next(make(global_batch=8, seq_len=64))
        rng = np.random.default_rng(0)
        host |= {k: rng.normal(scale, 0.3, (8, 64)).astype(np.float32) * host["loss_mask"]
                 for k, scale in (("old_logps", -2.0), ("ref_logps", -2.0), ("values", 0.5), ("advantages", 0.0),
                                  ("returns", 0.5))}
    else:
        make, _ = stages.batches(cfg, TOK, process_index=0, process_count=1, log=lambda *a: None)
        host = next(make(global_batch=8, seq_len=64))
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], MeshConfig()), (jax.devices()[:4], mesh)):
        trainer = Trainer(cfg, mesh_cfg, devices=devices, objective=stages.objective(cfg),
                          batch_axes=stages.batch_axes(cfg))
        state = trainer.init_state()
        init = jax.device_get(state["params"])
        batch = trainer.put(host)
        if stage == "dpo":  # a reference other than the policy: the initial weights of another seed
            ref = trainer.init_state(seed=5)["params"]
            batch = stages.Reference(ref, cfg, trainer.mesh, trainer.batch_shardings()["ref_logps"])(batch)
        state, metrics = trainer(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (m1, p1), (m4, p4) = results
    assert max(float(np.max(np.abs(p1[k] - init[k]))) for k in p1) > 1e-4  # the step did update
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in p1:
        np.testing.assert_allclose(p4[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_ppo_rollout_and_update_on_a_pipeline_mesh_equal_one_device(tmp_path):
    # The rollout samples and measures on the same devices with pp and cp folded into fsdp;
    # the update runs on the pipeline. Same tokens, log-probs, values and updated weights.
    # (The train settings are the PPO case above: its one-device step is compiled already.)
    cfg = load_config("debug-tiny", ["train.stage=ppo", "data.seq_len=64", "train.global_batch=8", "train.steps=4",
                                     "train.checkpoint_every=4", "train.warmup_steps=0", "train.eps=1e-3",
                                     "align.task_max_operand=5", "align.max_new_tokens=4"])
    cfg = stages.configure(cfg, tmp_path)
    results, reference = [], None
    for devices, mesh_cfg in ((jax.devices()[:1], MeshConfig()),
                              (jax.devices()[:8], MeshConfig(pp=2, cp=2, tp=2, pp_microbatches=2))):
        trainer = Trainer(cfg, mesh_cfg, devices=devices, objective=stages.objective(cfg),
                          batch_axes=stages.batch_axes(cfg))
        state = trainer.init_state()
        init = jax.device_get(state["params"])
        # A reference other than the policy: another seed's initial weights, on this mesh.
        reference = reference or jax.device_get(trainer.init_state(seed=5)["params"])
        rollouts = stages.rollouts(cfg, TOK, trainer.mesh, log=lambda *a: None)
        folded = rollouts.mesh.shape
        assert rollouts.mesh.devices.size == len(devices) and folded["pp"] == folded["cp"] == 1
        rollouts.policy = lambda: state["params"]
        rollouts.reference = jax.device_put(reference, {k: x.sharding for k, x in state["params"].items()})
        first = next(rollouts)
        whole = {k: np.concatenate([first[k], rollouts.queue[0][k]]) for k in first}  # epoch 1: all 16 answers
        state, metrics = trainer(state, trainer.put(first))
        results.append((whole, jax.device_get(metrics), jax.device_get(state["params"])))
    (r1, m1, p1), (r8, m8, p8) = results
    for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions"):
        np.testing.assert_array_equal(r8[k], r1[k], err_msg=k)
    assert r1["loss_mask"].sum() > 16 and np.abs(r1["old_logps"] - r1["ref_logps"]).max() > 1e-3
    for k in ("old_logps", "ref_logps", "values", "advantages", "returns"):
        np.testing.assert_allclose(r8[k], r1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert max(float(np.max(np.abs(p1[k] - init[k]))) for k in p1) > 1e-4  # the step did update
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- learning and resume

def test_sft_raises_task_accuracy_over_the_base_model(runs):
    cfg = load_config("debug-tiny", [*TASK, "train.stage=sft"])
    base = Trainer(cfg, MeshConfig(), devices=jax.devices()[:1])
    before = stages.task_accuracy(base.init_state()["params"], cfg, TOK, base.mesh)
    after = evaluation(runs / "sft-long")["eval_task_accuracy"]
    assert before < 0.05 and after > 0.9, (before, after)
    rows = [r for r in read_metrics(runs / "sft-long") if "loss" in r]
    assert np.mean([r["accuracy"] for r in rows[-20:]]) > np.mean([r["accuracy"] for r in rows[:20]]) + 0.2


def test_reward_model_ranks_unseen_pairs(runs):
    assert evaluation(runs / "rm")["eval_pair_accuracy"] > 0.9


def test_dpo_raises_margin_and_accuracy(runs):
    rows = [r for r in read_metrics(runs / "dpo") if "loss" in r]
    assert rows[0]["reward_margin"] == 0 and rows[0]["accuracy"] == 0  # the policy starts as the reference
    late = rows[-20:]
    assert np.mean([r["reward_margin"] for r in late]) > 0.03 and np.mean([r["accuracy"] for r in late]) > 0.6
    result = evaluation(runs / "dpo")
    assert result["eval_dpo_accuracy"] > 0.7 and result["eval_reward_margin"] > 0


def test_ppo_raises_the_expected_reward(runs):
    rows = [r for r in read_metrics(runs / "ppo") if "loss" in r]
    first, last = np.mean([r["reward"] for r in rows[:20]]), np.mean([r["reward"] for r in rows[-20:]])
    assert last > first + 0.05, (first, last)  # sampled rewards of the first and last 5 rollouts
    # Noise-free: the probability of the right answer on the same problems, before and after.
    params, model_cfg, tok, mesh = load_for_inference(runs / "sft", dtype="float32")
    cfg = dataclasses.replace(load_config("debug-tiny", TASK), model=model_cfg)
    before = stages.answer_probability(params, cfg, tok, mesh)
    after = evaluation(runs / "ppo")["eval_answer_probability"]
    assert after > before + 0.05, (before, after)
    assert all(np.isfinite(r[k]) for r in rows for k in ("kl", "value_loss", "clip_fraction", "entropy"))


@pytest.mark.parametrize("stage", ["dpo"])  # SFT resumes through the same loop and a simpler batch
def test_sigkill_and_restart_give_the_uninterrupted_losses(runs, tmp_path, stage):
    extra = ["train.checkpoint_every=5", f"train.init_from={runs / 'sft'}"]
    train(tmp_path / "whole", stage, 12, *extra)
    killed = train(tmp_path / "cut", stage, 12, *extra, env_extra={"LLAMA3_JAX_FAULTS": "kill@8"}, check=False)
    assert killed.returncode != 0 and 8 not in losses(tmp_path / "cut")
    train(tmp_path / "cut", stage, 12, *extra)
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == sorted(whole) == list(range(1, 13))
    np.testing.assert_allclose([cut[s] for s in whole], list(whole.values()), rtol=1e-6)


def test_rejection_sampling_keeps_better_answers(runs, tmp_path):
    from llama3_jax.align import rejection
    prompts = task.write_task(tmp_path, "prompts", 24, 5)
    for reward in ("python:llama3_jax.align.task.reward", str(runs / "rm")):
        out = tmp_path / "best.jsonl"
        assert rejection.main(["--policy", str(runs / "sft"), "--reward", reward, "--prompts", str(prompts),
                               "--k", "4", "--out", str(out), "--max-new-tokens", "6", "--seed", "1"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 24 and all(r["score"] == max(r["scores"]) and len(r["candidates"]) == 4 for r in rows)
        kept, one = np.mean([r["score"] for r in rows]), np.mean([r["scores"][0] for r in rows])
        assert kept > one, (reward, kept, one)
        # By the task's own verifier, the kept answers are right more often than a random one.
        right = lambda r, text: task.reward(r["messages"][:-1], text)  # noqa: E731
        assert np.mean([right(r, r["messages"][-1]["content"]) for r in rows]) > \
            np.mean([right(r, r["candidates"][0]) for r in rows])
        # The output is SFT data.
        assert len(load_examples(DataConfig(path=str(out)), TOK, "sft", 64)[0]) == 24
    assert rejection.main(["--policy", str(runs / "sft"), "--reward", str(runs / "sft"), "--prompts", str(prompts),
                           "--out", str(tmp_path / "x.jsonl")]) == 2  # a policy is no reward model


def test_grpo_rollouts_mask_the_answers_and_share_group_advantages(tmp_path):
    cfg = load_config("debug-tiny", ["train.stage=ppo", "data.seq_len=32", "train.global_batch=8", "train.steps=4",
                                     "train.checkpoint_every=4", "align.grpo=true", "align.group_size=4",
                                     "align.task_max_operand=5"])
    cfg = stages.configure(cfg, tmp_path)
    trainer = Trainer(cfg, MeshConfig(), devices=jax.devices()[:1], objective=stages.objective(cfg),
                      batch_axes=stages.batch_axes(cfg))
    params = trainer.init_state()["params"]
    rollouts = stages.rollouts(cfg, TOK, trainer.mesh, log=lambda *a: None)
    rollouts.policy, rollouts.reference = (lambda: params), params
    first = next(rollouts)
    assert len(rollouts.queue) == 3 and set(first) == set(ppo.KEYS)  # 2 epochs x 2 mini-batches per rollout
    whole = {k: np.concatenate([first[k], rollouts.queue[0][k]]) for k in first}  # epoch 1: all 16 answers
    for i in range(16):
        m = whole["loss_mask"][i] > 0
        start = np.flatnonzero(m)[0]
        # The answer's tokens are learned, the prompt's are not: the prompt ends with the assistant header.
        assert whole["tokens"][i, start - 1] == TOK.end_header_id and TOK.decode([whole["tokens"][i, start]]) == "\n\n"
        assert np.all(np.diff(np.flatnonzero(m)) == 1)  # one contiguous answer
        adv = whole["advantages"][i][m]
        assert np.allclose(adv, adv[0])  # one advantage per answer
    # Policy == reference: no KL, old log-probs equal the reference's.
    np.testing.assert_allclose(whole["old_logps"], whole["ref_logps"], atol=1e-6)
    assert rollouts.get_state() == {"position": 4, "rollouts": 1, "pending": 3}
