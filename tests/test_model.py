"""The model against Hugging Face transformers' LlamaForCausalLM, the independent oracle."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import llama3_jax
from llama3_jax.config import load_config
from llama3_jax.formats.hf import config_from_hf, hf_to_meta_qk, meta_to_hf_qk
from llama3_jax.model import param_count


def make_hf(tmp_path, *, heads=4, kv_heads=2, tied=False, scaling=True, layers=2, seed=0):
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1; perturb them so their weights are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scaling", [False, True])
def test_logits_match_transformers(tmp_path, heads, kv_heads, tied, scaling):
    ref = make_hf(tmp_path, heads=heads, kv_heads=kv_heads, tied=tied, scaling=scaling)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 80)).astype(np.int32)  # 80 > 32 original ctx
    model = llama3_jax.load(tmp_path, dtype=jnp.float32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert ours.dtype == np.float32 and ours.shape == (2, 80, 300)
    np.testing.assert_allclose(ours, hf_logits(ref, tokens), atol=1e-4, rtol=0)


def test_old_rope_scaling_spelling_loads(tmp_path):
    ref = make_hf(tmp_path, scaling=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")  # released 3.1 checkpoints: rope_theta + rope_scaling
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert config_from_hf(cfg).rope_scaling_factor == 8.0
    tokens = np.arange(100, dtype=np.int32)[None] % 300
    ours = np.asarray(llama3_jax.load(tmp_path, dtype=jnp.float32)(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(ref, tokens), atol=1e-4, rtol=0)


def test_scaling_matters_beyond_original_context(tmp_path):
    # Guards the test above: without scaling the long-sequence logits must differ.
    make_hf(tmp_path, scaling=True)
    tokens = jnp.asarray(np.arange(100, dtype=np.int32)[None] % 300)
    scaled = llama3_jax.load(tmp_path, dtype=jnp.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = llama3_jax.load(tmp_path, dtype=jnp.float32)
    assert np.abs(np.asarray(scaled(tokens)) - np.asarray(plain(tokens)))[0, 40:].max() > 1e-3


def test_packed_documents_equal_separate_runs(tmp_path):
    make_hf(tmp_path, heads=4, kv_heads=2)
    model = llama3_jax.load(tmp_path, dtype=jnp.float32)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 300, 30), rng.integers(0, 300, 50)
    packed = jnp.asarray(np.concatenate([a, b])[None].astype(np.int32))
    seg = jnp.asarray(np.r_[np.ones(30), 2 * np.ones(50)][None].astype(np.int32))
    pos = jnp.asarray(np.r_[np.arange(30), np.arange(50)][None].astype(np.int32))
    out = np.asarray(model(packed, segment_ids=seg, positions=pos))
    alone_a = np.asarray(model(jnp.asarray(a[None].astype(np.int32))))
    alone_b = np.asarray(model(jnp.asarray(b[None].astype(np.int32))))
    np.testing.assert_allclose(out[:, :30], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 30:], alone_b, atol=1e-5)
    # Without the segment ids the second document would see the first.
    mixed = np.asarray(model(packed, positions=pos))
    assert np.abs(mixed[:, 30:] - alone_b).max() > 1e-3


def test_qk_permutation_pair_inverts_and_matches_rotary_layouts():
    w = np.random.default_rng(0).standard_normal((4 * 8, 16)).astype(np.float32)
    np.testing.assert_array_equal(hf_to_meta_qk(meta_to_hf_qk(w, 4), 4), w)
    # Meta row (head h, pair i, half j) -> HF row h*hd + j*hd/2 + i.
    hf = meta_to_hf_qk(w, 4)
    np.testing.assert_array_equal(hf[8 + 4 + 1], w[8 + 2 * 1 + 1])


@pytest.mark.parametrize("name,published", [
    ("llama3-8b", 8.03e9), ("llama3.1-8b", 8.03e9), ("llama3-70b", 70.6e9), ("llama3.1-70b", 70.6e9),
    ("llama3.1-405b", 405.9e9), ("llama3.2-1b", 1.24e9), ("llama3.2-3b", 3.21e9)])
def test_parameter_counts_match_published(name, published):
    import flax.nnx as nnx
    from llama3_jax.model import Llama
    cfg = load_config(name).model
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))  # shapes only, no memory
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == param_count(cfg)
    assert f"{counted:.3g}" == f"{published:.3g}"


def test_ffn_sizes_follow_reference_formula():
    want = {"llama3-8b": 14336, "llama3-70b": 28672, "llama3.1-405b": 53248,
            "llama3.2-1b": 8192, "llama3.2-3b": 8192}
    assert {n: load_config(n).model.ffn_dim for n in want} == want


def test_program_size_does_not_grow_with_depth():
    """Layers run as one scan: the compiled train-step program for 32 layers is the size of
    the 2-layer one, so compile time does not grow with depth (timings:
    benchmarks/compile_time.py)."""
    from llama3_jax.model import forward, param_shapes

    def compiled_ops(n_layers):
        cfg = load_config("debug-tiny", [f"model.n_layers={n_layers}"]).model
        params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(cfg).items()}
        tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
        fn = jax.jit(jax.grad(lambda p, t: forward(p, t, cfg).mean()))
        text = fn.lower(params, tokens).compile().as_text()
        return sum(1 for line in text.splitlines() if " = " in line)
    small, deep = compiled_ops(2), compiled_ops(32)
    # Unrolled, 32 layers would be ~16x the ops; the scan keeps it within a few fusions.
    assert abs(deep - small) <= 0.02 * small, (small, deep)


def attention_inputs(first_doc, second_doc, seed):
    """GQA q/k/v (8 query heads, 2 kv heads) for two packed documents, with their ids."""
    rng = np.random.default_rng(seed)
    s = first_doc + second_doc
    q, k, v = (jnp.asarray(rng.standard_normal((2, s, h, 16)), jnp.float32) for h in (8, 2, 2))
    seg = jnp.asarray(np.r_[np.ones(first_doc), 2 * np.ones(second_doc)][None].repeat(2, 0), jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(first_doc), np.arange(second_doc)][None].repeat(2, 0), jnp.int32)
    return q, k, v, seg, pos


def test_attention_implementations_agree():
    from llama3_jax.model.attention import attention
    q, k, v, seg, pos = attention_inputs(10, 14, seed=0)
    ref = attention(q, k, v, seg, seg, pos, pos, impl="xla")
    out = attention(q, k, v, seg, seg, pos, pos, impl="jax_nn")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="choose one of xla, xla_chunked, jax_nn"):
        attention(q, k, v, seg, seg, pos, pos, impl="flash")


def test_chunked_attention_equals_reference_values_and_gradients():
    from llama3_jax.model.attention import chunked_attention, xla_attention
    q, k, v, seg, pos = attention_inputs(40, 24, seed=1)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, seg, seg, pos, pos)))
    chunked = lambda *a: chunked_attention(*a, chunk=16)  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v, seg, seg, pos, pos), xla_attention(q, k, v, seg, seg, pos, pos),
                               atol=1e-6)
    g_ref = jax.grad(lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_chk, g_ref):  # dk, dv sum over query blocks in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def grads_of(cfg, params, batch):
    from llama3_jax.model import loss_sum
    return jax.jit(jax.value_and_grad(loss_sum), static_argnums=2)(params, batch, cfg)


@pytest.fixture(scope="module")
def small_step():
    """debug-tiny (untied) parameters and a packed batch of 2 x 64 tokens."""
    cfg = load_config("debug-tiny", ["model.tie_embeddings=false"]).model
    model = llama3_jax.Llama(cfg, rngs=__import__("flax").nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, (2, 65)).astype(np.int32)
    seg = np.repeat(np.r_[np.ones(40), 2 * np.ones(24)][None], 2, 0).astype(np.int32)
    pos = np.repeat(np.r_[np.arange(40), np.arange(24)][None], 2, 0).astype(np.int32)
    batch = dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=seg, positions=pos,
                 loss_mask=np.ones((2, 64), np.float32))
    return cfg, model.param_arrays(), {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_loss_equals_the_whole_loss_and_its_gradients(small_step, chunk):
    import dataclasses
    cfg, params, batch = small_step
    want_loss, want = grads_of(cfg, params, batch)
    loss, got = grads_of(dataclasses.replace(cfg, loss_chunk=chunk), params, batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-5, err_msg=name)


def test_chunked_loss_never_holds_the_whole_logits(small_step):
    """The compiled program of a chunked loss has no [2, 64, vocab] array; the plain one has."""
    import dataclasses
    cfg, params, batch = small_step
    from llama3_jax.model import loss_sum

    def text(c):
        return jax.jit(jax.grad(loss_sum), static_argnums=2).lower(params, batch, c).compile().as_text()
    assert "f32[2,64,2048]" in text(cfg)
    assert "f32[2,64,2048]" not in text(dataclasses.replace(cfg, loss_chunk=16))


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_qkv_proj", "save_attn_out"])
def test_remat_policies_keep_the_gradients(small_step, remat):
    import dataclasses
    cfg, params, batch = small_step
    _, want = grads_of(dataclasses.replace(cfg, remat="none"), params, batch)
    _, got = grads_of(dataclasses.replace(cfg, remat=remat), params, batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-5, err_msg=name)
