"""KV-cache generation against transformers' generate, our own uncached forward, the 1-device
mesh and NumPy-level properties of sampling; int8 quality on a trained model; the command."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama3_jax.config import ConfigError
from llama3_jax.formats import convert
from llama3_jax.infer import cli
from llama3_jax.infer.decode import choose, empty_cache, forward_cached, score
from llama3_jax.infer.generate import (Sampling, allowed_ids, as_dtype, cache_bytes, generate,
                                       load_for_inference)
from llama3_jax.infer.quant import param_bytes, prepare_params
from llama3_jax.model import PARAM_AXES, forward
from llama3_jax.parallel.sharding import make_mesh, param_sharding

from conftest import REPO

PROMPT_LENGTHS = (5, 17, 40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug-tiny run trained for 200 steps (about 12 s), and its Hugging Face export."""
    work = tmp_path_factory.mktemp("infer")
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", "debug-tiny", "--steps", "200",
                    "--out", str(work / "run"), "train.sample_tokens=4"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert convert.main(["to-hf", str(work / "run"), str(work / "hf"), "--dtype", "float32"]) == 0
    return work


@pytest.fixture(scope="module")
def loaded(trained):
    return load_for_inference(trained / "run", dtype="float32")


def prompts_of(tok, lengths=PROMPT_LENGTHS):
    text = (REPO / "README.md").read_text()
    ids = tok.encode(text)
    return [ids[100 * i:100 * i + n] for i, n in enumerate(lengths)]


def test_greedy_equals_transformers_generate(trained, loaded):
    params, cfg, tok, _ = loaded
    prompts = prompts_of(tok)
    ours = generate(params, cfg, prompts, Sampling(max_new_tokens=64))
    hf = transformers.LlamaForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    for prompt, new in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64,
                              pad_token_id=0, eos_token_id=None)
        assert new == out[0, len(prompt):].tolist()
    # The Hugging Face export loads into the same generator with the same result.
    hf_params, hf_cfg, _, _ = load_for_inference(trained / "hf", dtype="float32")
    assert generate(hf_params, hf_cfg, prompts, Sampling(max_new_tokens=64)).tokens == ours.tokens


def test_cached_decode_equals_uncached_forward(loaded):
    params, cfg, tok, _ = loaded
    prompts = prompts_of(tok, (3, 11))
    g = generate(params, cfg, prompts, Sampling(max_new_tokens=16))
    for prompt, new, logps in zip(prompts, g.tokens, g.logprobs):
        seq = jnp.asarray([prompt + new])
        logp = jax.nn.log_softmax(forward(params, seq, cfg)[0], axis=-1)
        rows = np.asarray(logp[len(prompt) - 1:-1])
        assert new == rows.argmax(-1).tolist()
        np.testing.assert_allclose(logps, rows[np.arange(len(new)), new], atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [dict(tp=2), dict(fsdp=2, tp=2)])
def test_cached_decode_logits_equal_on_a_mesh(loaded, mesh_shape):
    params, cfg, tok, _ = loaded
    tokens = np.asarray([p[:5] for p in prompts_of(tok, (5, 5))], np.int32)
    pad = np.asarray([0, 2], np.int32)

    def decode(params, mesh=None):
        with jax.set_mesh(mesh) if mesh else __import__("contextlib").nullcontext():
            params = prepare_params(params)
            cache = jax.jit(lambda: empty_cache(cfg, 2, 16, jnp.float32))()
            run = jax.jit(lambda p, t, c, s: forward_cached(p, t, c, s, pad, cfg))
            _, cache = run(params, tokens, cache, jnp.int32(0))
            logits, cache = run(params, tokens[:, -1:], cache, jnp.int32(5))
            return np.asarray(logits), cache["k"][0].sharding

    mesh = make_mesh(**mesh_shape, devices=jax.devices()[:np.prod(list(mesh_shape.values()))])
    sharded = {n: jax.device_put(x, param_sharding(n, PARAM_AXES[n], x.shape, mesh)) for n, x in params.items()}
    (logits, cache_sharding), (one_device, _) = decode(sharded, mesh), decode(params)
    np.testing.assert_allclose(logits, one_device, atol=1e-5, rtol=0)
    # The cache follows the training rules: kv heads over tp, the batch over fsdp.
    spec = tuple(cache_sharding.spec) + (None,) * 4
    assert spec[1] == "tp" and spec[0] == ("fsdp" if "fsdp" in mesh_shape else None)


def test_sampling_is_reproducible_and_never_draws_a_disallowed_id(loaded):
    params, cfg, tok, _ = loaded
    prompts = prompts_of(tok)
    hot = Sampling(max_new_tokens=24, temperature=5.0, seed=7)
    a, b = generate(params, cfg, prompts, hot), generate(params, cfg, prompts, hot)
    assert a.tokens == b.tokens
    assert generate(params, cfg, prompts, Sampling(24, temperature=5.0, seed=8)).tokens != a.tokens
    allowed = allowed_ids(cfg.vocab_size, tok, sorted(tok.stop_ids))
    assert not allowed[tok.special_tokens["<|reserved_special_token_194|>"]] and allowed[tok.eot_id]
    for row in generate(params, cfg, prompts, hot, allowed=allowed).tokens:
        assert all(allowed[t] for t in row)


def test_top_k_and_top_p_keep_only_the_likeliest_ids():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 400, jnp.float32))
    allowed = np.ones(4, bool)
    key = jax.random.key(0)
    draw = lambda t, k, p: np.asarray(choose(logits, allowed, jnp.float32(t), jnp.int32(k), jnp.float32(p), key)[0])
    assert set(draw(1.0, 2, 1.0)) == {0, 1}
    assert set(draw(1.0, 0, 0.7)) == {0, 1}          # 0.5 < 0.7 <= 0.8
    assert set(draw(1.0, 0, 0.5)) == {0}
    assert set(draw(1.0, 0, 1.0)) == {0, 1, 2, 3}
    assert set(draw(0.0, 0, 1.0)) == {0}              # greedy
    frequencies = np.bincount(draw(1.0, 0, 1.0), minlength=4) / 400
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.07)


def held_out_perplexity(logits_of, params, cfg, tok) -> float:
    ids = tok.encode((REPO / "llama3_jax" / "model" / "model.py").read_text())[:8 * 64]  # code, not trained on
    tokens = jnp.asarray(np.asarray(ids, np.int32).reshape(8, 64))
    logp = jax.nn.log_softmax(logits_of(params, tokens, cfg)[:, :-1], axis=-1)
    return float(jnp.exp(-jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()))


def test_int8_and_bf16_perplexity_stay_close_and_int8_halves_memory(loaded):
    import dataclasses
    params, cfg, tok, _ = loaded
    fp32 = held_out_perplexity(score, prepare_params(params), cfg, tok)  # the inference path (a full prefill)
    assert abs(fp32 / held_out_perplexity(forward, params, cfg, tok) - 1) < 1e-5  # equals the training forward
    bf16_cfg = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16")
    bf16 = as_dtype(params, "bfloat16")
    int8 = prepare_params(bf16, "int8", embeddings=True)
    ppl_bf16 = held_out_perplexity(score, prepare_params(bf16), bf16_cfg, tok)
    ppl_int8 = held_out_perplexity(score, int8, bf16_cfg, tok)
    assert fp32 < cfg.vocab_size / 2  # trained: far below a uniform guess
    assert abs(ppl_bf16 / fp32 - 1) < 0.005
    assert abs(ppl_int8 / ppl_bf16 - 1) < 0.01
    assert param_bytes(int8) < 0.55 * param_bytes(prepare_params(bf16))


def test_int8_kv_cache_stores_numpy_quantized_vectors_and_decodes_like_float(loaded):
    params, cfg, tok, _ = loaded
    prompts = prompts_of(tok, (5, 17, 40))
    tokens = np.zeros((3, 40), np.int32)
    pad = np.asarray([40 - len(p) for p in prompts], np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, pad[i]:] = prompt
    prepared = prepare_params(params)

    def prefill(dtype):
        cache = jax.jit(lambda: empty_cache(cfg, 3, 64, dtype))()
        logits, cache = jax.jit(lambda p, t, c: forward_cached(p, t, c, jnp.int32(0), pad, cfg))(prepared, tokens,
                                                                                                   cache)
        return np.asarray(logits), jax.device_get(cache)

    fp_logits, fp = prefill(jnp.float32)
    q_logits, q = prefill(jnp.int8)
    # Layer 0's keys and values depend on the embeddings only: the int8 cache holds exactly
    # NumPy's symmetric per-vector quantization of the float cache's (one scale per token and head).
    for name in ("k", "v"):
        x = fp[name][0].astype(np.float64)
        scale = np.abs(x).max(-1, keepdims=True) / 127
        want = np.clip(np.round(x / np.where(scale > 0, scale, 1)), -127, 127)
        assert q[name][0].dtype == np.int8
        np.testing.assert_allclose(q[name + "_scale"][0], scale, rtol=1e-6)
        assert np.abs(q[name][0].astype(np.int64) - want).max() <= 1  # a rounding tie may fall either way
        assert np.mean(q[name][0] == want) > 0.999
    # Through every layer, the logits of real tokens stay close and pick the same next token.
    real = np.arange(40)[None, :] >= pad[:, None]
    assert np.abs(q_logits - fp_logits)[real].max() < 0.05 * np.abs(fp_logits)[real].max()
    assert np.mean(q_logits.argmax(-1)[real] == fp_logits.argmax(-1)[real]) > 0.97
    g_fp = generate(params, cfg, prompts, Sampling(max_new_tokens=24))
    g_q = generate(params, cfg, prompts, Sampling(max_new_tokens=24), cache_dtype="int8")
    agree = [a == b for x, y in zip(g_fp.tokens, g_q.tokens) for a, b in zip(x, y)]
    assert np.mean(agree) > 0.9, (g_fp.tokens, g_q.tokens)
    # Memory: int8 plus one float32 scale per head_dim-vector, against 4 bytes per element.
    for dtype in ("int8", "float32", "bfloat16"):
        arrays = jax.tree.leaves(jax.eval_shape(lambda: empty_cache(cfg, 3, 64, jnp.dtype(dtype))))
        assert sum(a.size * a.dtype.itemsize for a in arrays) == cache_bytes(cfg, 3, 64, dtype)
    assert cache_bytes(cfg, 1, 64, "int8") / cache_bytes(cfg, 1, 64, "float32") == (cfg.head_dim + 4) / (
        4 * cfg.head_dim)


def test_command_streams_writes_jsonl_and_rejects_bad_input_before_compiling(trained, tmp_path, capsys):
    run = str(trained / "run")
    assert cli.main([run, "--prompt", "def ", "--max-new-tokens", "8", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "import "}) + "\n" +
                       json.dumps({"prompt": [{"role": "user", "content": "hi"}], "id": 7}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main([run, "--prompts-file", str(prompts), "--out", str(out), "--max-new-tokens", "6",
                     "--quantize", "int8", "--kv-cache", "int8", "--temperature", "0.7", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [None, 7]
    assert all(len(r["tokens"]) == len(r["logprobs"]) <= 6 and r["finish"] in ("stop", "length") for r in rows)
    capsys.readouterr()
    for argv, message in [
        ([run, "--prompt", "x " * 600], "does not fit the cache of model.max_seq_len=512"),
        ([run, "--dtype", "float64"], "--dtype 'float64' unknown"),
        ([run, "--quantize", "int4"], "the one quantization is int8"),
        ([run, "--kv-cache", "int4"], "KV cache dtype 'int4' unknown"),
        ([run, "--tokenizer", str(REPO.parent / "shared" / "llama3-tokenizer" / "tokenizer.model")],
         "belongs to another model"),
    ]:
        assert cli.main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("# ")]
        assert len(errors) == 1 and message in errors[0], errors
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        Sampling(max_new_tokens=0).check()
