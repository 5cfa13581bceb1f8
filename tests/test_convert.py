"""`llama3-convert` (`python -m llama3_jax.convert`): train.py runs <-> Hugging Face <-> Meta.

Oracles: transformers' LlamaForCausalLM, and a small PyTorch version of Meta's reference forward
written here (complex-number rotary on adjacent pairs, llama3 frequency scaling, run model-parallel
over the consolidated.NN.pth shards as Meta's code does).
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import llama3_jax
from llama3_jax import Tokenizer
from llama3_jax.config import ModelConfig
from llama3_jax.formats import bpe, convert, hf, run
from llama3_jax.formats import meta as meta_format
from llama3_jax.formats.tokenizer import write_tiktoken_file

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENS = np.random.default_rng(0).integers(0, 2048, (2, 80)).astype(np.int32)  # 80 > 32 original ctx


# ------------------------------------------------------------------------------- helpers

def run_convert(*argv) -> int:
    return convert.main([str(a) for a in argv])


def checkpoint_params(path):
    """(model config, {name: numpy array}) of a run or converted checkpoint."""
    src = run.RunSource(path)
    return src.model, {k: src.whole(k) for k in src.dtypes}


def env():
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # train.py asks for the devices its mesh needs
    return e


def train_cmd(out, steps, *overrides, mesh=None):
    return [sys.executable, str(REPO / "train.py"), "--config", "debug-tiny", "--steps", str(steps),
            "--out", str(out), *(["--mesh", str(mesh)] if mesh else []), "train.sample_tokens=4", *overrides]


def ours_logits(path, tokens=TOKENS):
    return np.asarray(llama3_jax.load(path, dtype=jnp.float32)(jnp.asarray(tokens)))


def hf_logits(path, tokens=TOKENS):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def safetensors_dir(path) -> dict:
    out = {}
    for f in sorted(pathlib.Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def pth_dir(path) -> list[dict]:
    return [torch.load(f, map_location="cpu", weights_only=True)
            for f in sorted(pathlib.Path(path).glob("consolidated.*.pth"))]


def rope_of(cfg: ModelConfig):
    return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position)


def meta_reference_logits(meta_dir, tokens, rope_scaling=None):
    """Meta's reference forward (llama3 model.py numerics), model-parallel over the shards:
    column-parallel pieces (wq, wk, wv, w1, w3: dim 0) compute each shard's own heads / FFN
    columns, row-parallel ones (wo, w2: dim 1) are summed over shards, the vocab-parallel
    embedding and output are concatenated over shards, norms come from shard 0.
    rope_scaling: None or (factor, low_freq_factor, high_freq_factor, original_context)."""
    d = pathlib.Path(meta_dir)
    p = json.loads((d / "params.json").read_text())
    sd = [{k: v.float() for k, v in s.items()} for s in pth_dir(d)]
    n = len(sd)
    dim, n_heads = p["dim"], p["n_heads"]
    n_kv = p.get("n_kv_heads") or n_heads
    hd, eps, theta = dim // n_heads, p["norm_eps"], p["rope_theta"]
    local_heads, local_kv = n_heads // n, n_kv // n
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    b, s = tokens.shape

    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if rope_scaling is not None:
        factor, low, high, old = rope_scaling
        scaled = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                scaled.append(f)
            elif wavelen > old / low:
                scaled.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        freqs = torch.tensor(scaled, dtype=torch.float32)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)

    def rope(x):  # [b, s, h, hd]: adjacent feature pairs as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def rms_norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    h = torch.cat([t["tok_embeddings.weight"] for t in sd], 0)[tokens]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        x = rms_norm(h, sd[0][pre + "attention_norm.weight"])
        attn = 0
        for t in sd:
            q = rope((x @ t[pre + "attention.wq.weight"].T).view(b, s, local_heads, hd))
            k = rope((x @ t[pre + "attention.wk.weight"].T).view(b, s, local_kv, hd))
            v = (x @ t[pre + "attention.wv.weight"].T).view(b, s, local_kv, hd)
            k = k.repeat_interleave(local_heads // local_kv, dim=2)
            v = v.repeat_interleave(local_heads // local_kv, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + mask
            a = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, local_heads * hd)
            attn = attn + a @ t[pre + "attention.wo.weight"].T
        h = h + attn
        x = rms_norm(h, sd[0][pre + "ffn_norm.weight"])
        ffn = 0
        for t in sd:
            gate = torch.nn.functional.silu(x @ t[pre + "feed_forward.w1.weight"].T)
            ffn = ffn + (gate * (x @ t[pre + "feed_forward.w3.weight"].T)) @ t[pre + "feed_forward.w2.weight"].T
        h = h + ffn
    h = rms_norm(h, sd[0]["norm.weight"])
    return torch.cat([h @ t["output.weight"].T for t in sd], -1).numpy()


def make_hf(path, *, tied=False, seed=0, dtype=torch.float32):
    """A random transformers Llama with debug-tiny's shapes (llama3 rope scaling), saved."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            prm.add_(0.1 * torch.randn_like(prm) if "norm" in name else 0.05 * torch.randn_like(prm))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def make_meta(path, *, shards=1, dtype=torch.float32, tied=False, seed=0, theta=500000.0, scaled=True):
    """A random Meta directory: full tensors made in Meta's layout, then split as Meta's code
    shards them (dim 0: tok_embeddings, wq, wk, wv, w1, w3, output; dim 1: wo, w2)."""
    g = torch.Generator().manual_seed(seed)
    dim, layers, heads, kv, vocab, hd = 64, 2, 4, 2, 256, 16
    ffn = 32 * math.ceil(int(2 * 4 * dim / 3) / 32)
    full = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g)}
    for i in range(layers):
        pre = f"layers.{i}."
        for name, shape in [("attention.wq", (heads * hd, dim)), ("attention.wk", (kv * hd, dim)),
                            ("attention.wv", (kv * hd, dim)), ("attention.wo", (dim, heads * hd)),
                            ("feed_forward.w1", (ffn, dim)), ("feed_forward.w2", (dim, ffn)),
                            ("feed_forward.w3", (ffn, dim))]:
            full[pre + name + ".weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        full[pre + "attention_norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        full[pre + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    full["norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    full["output.weight"] = full["tok_embeddings.weight"].clone() if tied else \
        torch.randn(vocab, dim, generator=g) / math.sqrt(dim)
    path = pathlib.Path(path)
    path.mkdir(parents=True)
    for s in range(shards):
        sd = {}
        for k, v in full.items():
            if "norm" in k:
                sd[k] = v.clone()
            else:
                dim1 = k.endswith(("wo.weight", "w2.weight"))
                sd[k] = torch.chunk(v, shards, dim=1 if dim1 else 0)[s].clone()
        torch.save({k: v.to(dtype) for k, v in sd.items()}, path / f"consolidated.{s:02d}.pth")
    params = {"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv, "vocab_size": vocab,
              "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": theta,
              "use_scaled_rope": scaled}
    (path / "params.json").write_text(json.dumps(params))
    return path


# ------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_src(work):
    return make_hf(work / "hf_src")


@pytest.fixture(scope="module")
def from_hf(work, hf_src):
    assert run_convert("from-hf", hf_src, work / "from_hf") == 0
    return work / "from_hf"


@pytest.fixture(scope="module")
def runs(work, from_hf):
    """Three train.py runs at once: tied (one device), untied on a 4-device fsdp x tp mesh (a
    sharded checkpoint), and one initialised from the from-hf conversion with lr 0."""
    mesh = work / "mesh-fsdp2-tp2.toml"
    mesh.write_text("[mesh]\nfsdp = 2\ntp = 2\n")
    jobs = {
        "tied": train_cmd(work / "run_tied", 2),
        "untied": train_cmd(work / "run_untied", 2, "model.tie_embeddings=false", mesh=mesh),
        "init": train_cmd(work / "run_init", 1, "model.tie_embeddings=false", f"train.init_from={from_hf}",
                          "train.lr=0"),
    }
    procs = {k: subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, cmd in jobs.items()}
    for k, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"train.py ({k}) failed:\n{out[-3000:]}"
    return {k: work / f"run_{k}" for k in jobs}


# ------------------------------------------------------------------------------- CLI

def test_help_for_every_command(capsys):
    for cmd in ["to-hf", "to-meta", "from-hf", "from-meta"]:
        with pytest.raises(SystemExit) as e:
            run_convert(cmd, "--help")
        assert e.value.code == 0
        assert cmd in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_convert("--help")
    text = capsys.readouterr().out
    assert all(c in text for c in ["to-hf", "to-meta", "from-hf", "from-meta"])


def test_module_runs_as_a_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "llama3_jax.convert", "from-hf", str(tmp_path / "nope"),
                        str(tmp_path / "out")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr


# ------------------------------------------------------------------------------- to-hf

@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_to_hf_logits_match_llama3_jax_load(runs, work, kind):
    out = work / f"to_hf_{kind}"
    # The untied run also exercises sharded safetensors (tiny threshold) and a sharded checkpoint.
    extra = ["--max-shard-size", "100KB"] if kind == "untied" else []
    assert run_convert("to-hf", runs[kind], out, "--dtype", "float32", *extra) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == (kind == "tied")
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_parameters"]["factor"] == 8.0
    if kind == "untied":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"]) == set(safetensors_dir(out))
        assert "lm_head.weight" in index["weight_map"]
    else:
        assert "lm_head.weight" not in safetensors_dir(out)
    ours = ours_logits(runs[kind])
    np.testing.assert_allclose(hf_logits(out), ours, atol=1e-4, rtol=0)
    # The run's tokenizer (the project's BPE here) comes along and agrees with ours.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    mine = run.run_tokenizer(run.read_config(runs[kind])[0], runs[kind])
    bos, eos = mine.bos_id, mine.eos_id
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok(text).input_ids == mine.encode(text, bos=True)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], cfg["bos_token_id"]) == (bos, eos, bos)


def test_to_hf_step_and_dtype(runs, work):
    out = work / "to_hf_step1"
    assert run_convert("to-hf", runs["tied"], out, "--step", "1") == 0
    header = safetensors_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in header.values())
    _, step1 = checkpoint_params(runs["tied"] / "checkpoints" / "1")
    got = header["model.layers.1.mlp.down_proj.weight"]
    want = torch.from_numpy(np.asarray(step1["w2"][1]).T.copy()).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_export_reads_layer_blocks_not_whole_parameters(runs, from_hf):
    """train.py's checkpoint (chunked by device shard, so a chunk spans all layers) is read in
    blocks capped by --read-block-size; converted checkpoints (one chunk per layer) layer by
    layer. Either way the blocks are the stored parameter."""
    default = run.RunSource(runs["untied"])
    capped = run.RunSource(runs["untied"], read_block_bytes=1)
    for name in ("wq", "w2", "ffn_norm"):
        assert [b.shape[0] for _, b in default.blocks(name)] == [2]
        assert [b.shape[0] for _, b in capped.blocks(name)] == [1, 1]
        np.testing.assert_array_equal(np.concatenate([b for _, b in capped.blocks(name)]),
                                      next(default.blocks(name))[1])
    assert [b.shape[0] for _, b in run.RunSource(from_hf).blocks("w1")] == [1, 1]


# ------------------------------------------------------------------------------- to-meta

@pytest.mark.parametrize("kind,shards", [("tied", 1), ("untied", 2), ("untied", 4)])
def test_to_meta_logits_match_meta_reference(runs, work, kind, shards):
    out = work / f"to_meta_{kind}_{shards}"
    assert run_convert("to-meta", runs[kind], out, "--shards", shards, "--dtype", "float32") == 0
    params = json.loads((out / "params.json").read_text())
    cfg = run.read_config(runs[kind])[0].model
    assert len(pth_dir(out)) == shards
    # 4 shards > 2 kv heads: each kv head is repeated on 2 shards (as Meta's 405B MP16).
    assert params["n_kv_heads"] == max(shards, cfg.n_kv_heads)
    assert params["use_scaled_rope"] is True and (out / "tokenizer.model").exists()
    ref = meta_reference_logits(out, TOKENS, rope_scaling=rope_of(cfg))
    np.testing.assert_allclose(ref, ours_logits(runs[kind]), atol=1e-4, rtol=0)


def test_to_meta_then_from_meta_multi_shard(runs, work):
    meta = work / "to_meta_untied_2"
    if not meta.exists():
        assert run_convert("to-meta", runs["untied"], meta, "--shards", 2, "--dtype", "float32") == 0
    back = work / "back_from_meta2"
    assert run_convert("from-meta", meta, back) == 0
    _, want = checkpoint_params(runs["untied"])
    cfg, got = checkpoint_params(back)
    assert cfg.rope_original_max_position == 32 and cfg.rope_scaling_factor == 8.0 and not cfg.tie_embeddings
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


# ------------------------------------------------------------------------------- Meta -> ours -> HF

def test_meta_dir_from_meta_then_to_hf_matches_meta_reference(work):
    meta = make_meta(work / "meta_src", shards=2)
    ours, hf = work / "meta_src_ours", work / "meta_src_hf"
    assert run_convert("from-meta", meta, ours, "--rope-scaling-factor", 32) == 0
    assert run_convert("to-hf", ours, hf, "--dtype", "float32") == 0
    tokens = TOKENS % 256
    ref = meta_reference_logits(meta, tokens, rope_scaling=(32.0, 1.0, 4.0, 8192))
    got = hf_logits(hf, tokens)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours_logits(ours, tokens), ref, atol=1e-4, rtol=0)
    # Guard: the factor matters at these shapes, so the option above was really applied.
    assert np.abs(got - meta_reference_logits(meta, tokens, rope_scaling=(8.0, 1.0, 4.0, 8192))).max() > 1e-3
    assert json.loads((hf / "config.json").read_text())["rope_parameters"]["factor"] == 32.0
    # No tokenizer came with the Meta directory, so none goes out (not the project's default one).
    assert not (hf / "tokenizer.json").exists() and not (ours / "tokenizer.model").exists()


def test_from_meta_rope_factor_defaults(work):
    src = make_meta(work / "meta_rope", shards=1)
    assert meta_format.MetaSource(src).model.rope_scaling_factor == 8.0  # Meta's code
    assert meta_format.MetaSource(src, rope_scaling_factor=32).model.rope_scaling_factor == 32.0
    plain = make_meta(work / "meta_plain", shards=1, scaled=False)
    assert meta_format.MetaSource(plain).model.rope_scaling_factor is None
    # Llama 3.2 1B's shapes: factor 32 (params.json cannot say so).
    assert meta_format.meta_rope_defaults(dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                               vocab_size=128256))["rope_scaling_factor"] == 32.0


# ------------------------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("tied", [False, True])
def test_hf_roundtrip_bit_exact(work, tied):
    src = make_hf(work / f"rt_hf_{tied}", tied=tied, seed=3)
    mid, back = work / f"rt_hf_{tied}_ours", work / f"rt_hf_{tied}_back"
    assert run_convert("from-hf", src, mid) == 0
    assert run_convert("to-hf", mid, back, "--dtype", "float32") == 0
    a, b = safetensors_dir(src), safetensors_dir(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert hf.HFSource(back).model == hf.HFSource(src).model


def test_hf_bfloat16_roundtrip_bit_exact(work):
    src = make_hf(work / "rt_hf_bf16", dtype=torch.bfloat16, seed=4)
    mid, back = work / "rt_hf_bf16_ours", work / "rt_hf_bf16_back"
    assert run_convert("from-hf", src, mid) == 0  # stored as float32 (exact)
    assert run_convert("to-hf", mid, back) == 0  # bfloat16 by default
    a, b = safetensors_dir(src), safetensors_dir(back)
    assert set(a) == set(b) and all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shards,dtype", [(1, torch.float32), (2, torch.float32), (2, torch.bfloat16)])
def test_meta_roundtrip_bit_exact(work, shards, dtype):
    name = f"rt_meta_{shards}_{str(dtype)[6:]}"
    src = make_meta(work / name, shards=shards, dtype=dtype, tied=shards == 1, seed=5)
    mid, back = work / f"{name}_ours", work / f"{name}_back"
    assert run_convert("from-meta", src, mid) == 0
    assert run.read_config(mid)[0].model.tie_embeddings == (shards == 1)
    assert run_convert("to-meta", mid, back, "--shards", shards, "--dtype", str(dtype)[6:]) == 0
    a, b = pth_dir(src), pth_dir(back)
    assert len(a) == len(b) == shards
    for sa, sb in zip(a, b):
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.loads((src / "params.json").read_text()) == json.loads((back / "params.json").read_text())


def test_random_hf_streams_identical_files(work):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from convert_memory import random_hf  # the 8B memory benchmark's random weights
    src, mid, back = work / "rnd_hf", work / "rnd_ours", work / "rnd_back"
    random_hf("debug-tiny", src, max_shard_bytes=200_000)
    assert run_convert("from-hf", src, mid, "--dtype", "bfloat16") == 0
    assert run_convert("to-hf", mid, back, "--max-shard-size", "200KB") == 0
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in back.glob("*.safetensors"))
    for f in files + ["model.safetensors.index.json"]:
        assert (src / f).read_bytes() == (back / f).read_bytes(), f


# ------------------------------------------------------------------------------- converted checkpoints are runs

def test_init_from_and_load_read_converted_checkpoint(runs, from_hf, hf_src):
    """train.py train.init_from=OUT (lr 0, one step) keeps the converted weights exactly, and
    llama3_jax.load(OUT) gives transformers' logits."""
    _, converted = checkpoint_params(from_hf)
    _, trained = checkpoint_params(runs["init"])
    assert set(converted) == set(trained)
    for k in converted:
        np.testing.assert_array_equal(np.asarray(trained[k]), np.asarray(converted[k]), err_msg=k)
    np.testing.assert_allclose(ours_logits(from_hf), hf_logits(hf_src), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- FFN sizes for params.json

@pytest.mark.parametrize("dim,ffn", [(4096, 14336), (2048, 8192), (64, 100), (64, 1000), (64, 7), (8192, 28672),
                                     (3072, 8192), (64, 170), (256, 513)])
def test_meta_ffn_params_reproduce_explicit_ffn(dim, ffn):
    cfg = ModelConfig(dim=dim, n_heads=8, n_kv_heads=8, ffn_hidden=ffn)
    mo, mult = meta_format.meta_ffn_params(cfg)
    h = int(2 * 4 * dim / 3)
    if mult is not None:
        h = int(mult * h)
    assert mo * math.ceil(h / mo) == ffn  # Meta's formula, written out


def test_meta_params_keep_presets_values():
    from llama3_jax.config import load_config
    p = meta_format.meta_params(load_config("llama3.1-8b").model)
    assert (p["multiple_of"], p["ffn_dim_multiplier"], p["use_scaled_rope"]) == (1024, 1.3, True)
    assert "rope_scaling_factor" not in p  # 8 is what Meta's code assumes
    p = meta_format.meta_params(load_config("llama3.2-1b").model)
    assert "rope_scaling_factor" not in p  # 32 is what from-meta assumes for these shapes


# ------------------------------------------------------------------------------- tokenizer

def test_hf_tokenizer_from_meta_tokenizer_matches_reference(tmp_path):
    model = SHARED / "llama3-tokenizer" / "tokenizer.model"
    bpe.write_hf_tokenizer(model, tmp_path)
    import tokenizers
    ours = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = tokenizers.Tokenizer.from_file(str(SHARED / "llama3-tokenizer" / "tokenizer.json"))
    text = (REPO / "llama3_jax" / "config" / "schema.py").read_text()[:20000] + \
        " This is a test sentence.\n\n héllo wörld 你好 🙂 <|eot_id|> 12345  'll\t\t"
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert ids == Tokenizer(model).encode(text, allowed_special="all")
    assert ours.encode("This is a test sentence.").ids == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert (tmp_path / "original" / "tokenizer.model").read_bytes() == model.read_bytes()


def test_tokenizer_model_from_tokenizer_json_is_metas(tmp_path):
    ranks = bpe.ranks_from_tokenizer_json(SHARED / "llama3-tokenizer" / "tokenizer.json")
    write_tiktoken_file(ranks, tmp_path / "tokenizer.model")
    assert (tmp_path / "tokenizer.model").read_bytes() == (SHARED / "llama3-tokenizer" / "tokenizer.model").read_bytes()


# ------------------------------------------------------------------------------- bad input

def expect_error(capsys, *argv, match: str):
    assert run_convert(*argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_errors_for_wrong_kind_of_directory(tmp_path, capsys, hf_src, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, "to-hf", tmp_path / "missing", tmp_path / "o1", match="does not exist")
    expect_error(capsys, "to-hf", empty, tmp_path / "o2", match="no llama3_jax checkpoint")
    expect_error(capsys, "to-meta", hf_src, tmp_path / "o3", match="Hugging Face directory (convert it with from-hf)")
    expect_error(capsys, "from-hf", runs["tied"], tmp_path / "o4", match="no config.json")
    expect_error(capsys, "from-meta", hf_src, tmp_path / "o5", match="no params.json")
    expect_error(capsys, "to-hf", runs["tied"], tmp_path / "o6", "--step", 7, match="no checkpoint at step 7")
    expect_error(capsys, "to-meta", runs["tied"], tmp_path / "o7", "--shards", 3,
                 match="cannot split into 3 model-parallel shards")
    expect_error(capsys, "from-hf", hf_src, runs["tied"], match="already exists and is not empty")
    assert not [p for p in tmp_path.iterdir() if p.name != "empty"]  # nothing half-written


def test_errors_for_bad_hugging_face_dirs(tmp_path, capsys, hf_src):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(hf_src, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    expect_error(capsys, "from-hf", gpt2, tmp_path / "o1", match="not a Llama model")

    wrong = tmp_path / "wrong"
    shutil.copytree(hf_src, wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    expect_error(capsys, "from-hf", wrong, tmp_path / "o2", match="the config does not match the weights")
    (wrong / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    expect_error(capsys, "from-hf", wrong, tmp_path / "o3", match="missing")

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(hf_src).save_pretrained(sharded, max_shard_size="300KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    expect_error(capsys, "from-hf", sharded, tmp_path / "o4", match="missing shard")
    assert not (tmp_path / "o4").exists()


def test_errors_for_bad_meta_dirs(tmp_path, capsys):
    meta = make_meta(tmp_path / "m3", shards=4)
    (meta / "consolidated.02.pth").unlink()
    expect_error(capsys, "from-meta", meta, tmp_path / "o1", match="missing shard(s) consolidated.02.pth")
    (meta / "consolidated.03.pth").unlink()  # now 0, 1 of 4: only the shapes can tell
    expect_error(capsys, "from-meta", meta, tmp_path / "o2",
                 match="params.json does not match the weights (or shards are missing)")

    bad = make_meta(tmp_path / "bad", shards=1)
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    expect_error(capsys, "from-meta", bad, tmp_path / "o3", match="does not match the weights")
    (bad / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    expect_error(capsys, "from-meta", bad, tmp_path / "o4", match="does not match the weights")
    (bad / "consolidated.00.pth").write_bytes(b"not a torch file")
    (bad / "params.json").write_text(json.dumps(params))
    expect_error(capsys, "from-meta", bad, tmp_path / "o5", match="cannot read it as a PyTorch checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "m3"]
