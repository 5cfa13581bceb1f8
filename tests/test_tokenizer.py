"""Tests of llama3_jax.formats.tokenizer and .bpe: Meta's Llama 3 tokenizer.model against the independent
Hugging Face tokenizer.json, long inputs, the dialog format, and the default BPE tokenizer."""

import base64
import json
import pathlib
import pickle
import random
import re
import sysconfig

import pytest
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

from llama3_jax.data.corpus import default_corpus_files
from llama3_jax.formats import bpe
from llama3_jax.formats import tokenizer as tokmod
from llama3_jax.formats.bpe import default_tokenizer
from llama3_jax.formats.tokenizer import Tokenizer

LLAMA3_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "llama3-tokenizer"
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def meta():
    return Tokenizer(LLAMA3_DIR / "tokenizer.model")


@pytest.fixture(scope="session")
def hf():
    """Independent reference; special-token strings in the text are plain text."""
    tok = tokenizers.Tokenizer.from_file(str(LLAMA3_DIR / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


CORPUS = {
    "prose": (
        "The quick brown fox jumps over the lazy dog. It's 5 o'clock; they're late, "
        "I'LL WAIT and DON'T mind. \"Quotes\", (parentheses) and -- dashes... "
        "Well-known e-mail: someone@example.com, https://example.org/path?q=1&x=y#frag.\n"
        "Second paragraph:\n\tindented line\n  two spaces\n"
    ),
    "python": (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    + (STDLIB / "textwrap.py").read_text(encoding="utf-8"),
    "chinese": "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程！「你好」，世界。",
    "other_scripts": (
        "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم. नमस्ते दुनिया। こんにちは世界、カタカナ。"
        " 안녕하세요 세계. Ünïcödé naïve café e\u0301 A\u030a"
    ),
    "emoji": "Emoji 😀😃😄 👩‍💻 👍🏽 🇯🇵🇫🇷 🎉🎉🎉 ❤️‍🔥 ok👌end",
    "whitespace": (
        "a" + " " * 37 + "b\n" + " " * 1000 + "x\t\t\t\n\n\n   \n" + "\n" * 300 + "y"
        + " \u00a0\u2003\u200b\u3000z   \t"
    ),
    "specials_in_text": (
        "<|begin_of_text|>Hello<|eot_id|> <|start_header_id|>user<|end_header_id|>\n\n"
        "<|reserved_special_token_100|><|python_tag|><|image|> <|not_a_token|> <|eot_id"
    ),
    "numbers": (
        "3.14159 1234567890 12345 1,000,000 0x1F 1e-10 -42 +7 2024-05-01 ١٢٣٤ ５６７ ½ ²³ Ⅻ"
    ),
    "newlines": "line1\r\nline2\rline3\n\r\n  \r\n\r\n\r\nend\r\n",
    "control": "nul\x00 bel\x07 esc\x1b[0m del\x7f \ufeffbom \U0001f600\U0010ffff",
}


# ----------------------------------------------------------------------------- Meta model


def test_reference_vectors(meta):
    assert meta.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001,
    ]
    assert meta.encode("\n\n") == [271]
    assert meta.encode("") == []
    assert meta.encode("", bos=True, eos=True) == [128000, 128001]
    assert meta.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )


def test_special_ids(meta):
    assert meta.n_words == 128256
    assert (meta.bos_id, meta.eos_id, meta.eot_id, meta.eom_id, meta.pad_id) == (
        128000, 128001, 128009, 128008, 128004,
    )
    assert meta.stop_ids == {128001, 128008, 128009}
    sp = meta.special_tokens
    assert len(sp) == 256
    assert sp["<|start_header_id|>"] == 128006
    assert sp["<|end_header_id|>"] == 128007
    assert sp["<|python_tag|>"] == 128010
    assert sp["<|step_id|>"] == 128005
    assert sp["<|reserved_special_token_0|>"] == 128002
    assert sp["<|reserved_special_token_1|>"] == 128003
    assert sp["<|reserved_special_token_2|>"] == 128011
    assert sp["<|reserved_special_token_246|>"] == 128255
    assert sorted(sp.values()) == list(range(128000, 128256))
    assert meta.path == LLAMA3_DIR / "tokenizer.model"


def test_special_tokens_match_hf_added_tokens(meta):
    added = json.loads((LLAMA3_DIR / "tokenizer.json").read_text())["added_tokens"]
    hf_specials = {t["content"]: t["id"] for t in added if t["id"] < 128256}
    assert hf_specials == meta.special_tokens


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_parity_with_hf(meta, hf, name):
    text = CORPUS[name]
    ids = meta.encode(text)
    assert ids == hf_ids(hf, text)
    assert meta.decode(ids) == text


def test_special_strings_are_plain_text_by_default(meta):
    text = "a<|eot_id|>b"
    ids = meta.encode(text)
    assert meta.eot_id not in ids
    assert meta.decode(ids) == text
    assert meta.encode(text, allowed_special="all") == [*meta.encode("a"), 128009, *meta.encode("b")]
    assert meta.encode(text, allowed_special={"<|eot_id|>"}) == meta.encode(text, allowed_special="all")
    with pytest.raises(ValueError):
        meta.encode(text, disallowed_special="all")


def test_encode_rejects_non_str(meta):
    with pytest.raises(TypeError):
        meta.encode(b"bytes")


def test_decode_accepts_numpy(meta):
    import numpy as np

    ids = meta.encode("Hello world", bos=True)
    assert meta.decode(np.asarray(ids, dtype=np.int32)) == "<|begin_of_text|>Hello world"


def test_pickle_roundtrip(meta):
    clone = pickle.loads(pickle.dumps(meta))
    assert clone.encode(CORPUS["prose"]) == meta.encode(CORPUS["prose"])
    assert clone.eot_id == meta.eot_id


# ----------------------------------------------------------------------------- long inputs


@pytest.mark.parametrize("text", ["a" * 30_000, " " * 30_000, "x" + " " * 30_000 + "y", "=" * 30_001])
def test_long_runs_match_hf(meta, hf, text):
    ids = meta.encode(text)
    assert ids == hf_ids(hf, text)
    assert meta.decode(ids) == text


def test_long_text_over_400k_matches_hf(meta, hf):
    files = [p for p in default_corpus_files() if p.parent == STDLIB][:60]
    parts, size = [], 0
    for p in files:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        size += len(parts[-1])
        if size > 430_000:
            break
    text = (
        "".join(parts) + "b" * 30_000 + "\n" + "\t " * 20_000 + CORPUS["chinese"] * 2000
        + "".join(f"{i}," for i in range(10_000)) + CORPUS["emoji"]
    )
    assert len(text) > 500_000
    pieces = list(meta._pieces(text))
    assert "".join(pieces) == text
    assert len(pieces) >= 3  # the limits were applied
    assert max(len(p) for p in pieces) <= tokmod.TIKTOKEN_MAX_ENCODE_CHARS
    ids = meta.encode(text)
    assert ids == hf_ids(hf, text)
    assert meta.decode(ids) == text


def _random_text(rng, n):
    atoms = [
        "a", "Z", "é", "字", "7", "42", " ", "  ", "\t", "\n", "\r\n", ".", "'s", "'LL", "!?",
        "_", "<|", "|>", "<|eot_id|>", "<|begin_of_text|>", "😀", "\u00a0", "ab", "xyz",
        "a" * 40, " " * 40, "9" * 30, "-" * 30,
    ]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_splitting_never_changes_ids(meta, monkeypatch):
    """With tiny limits, many cuts happen; the ids must equal tiktoken on the whole text."""
    monkeypatch.setattr(tokmod, "TIKTOKEN_MAX_ENCODE_CHARS", 400)
    monkeypatch.setattr(tokmod, "MAX_NO_WHITESPACES_CHARS", 25)
    rng = random.Random(0)
    n_pieces = n_runs = 0
    for _ in range(300):
        text = _random_text(rng, rng.randrange(1, 200))
        pieces = list(meta._pieces(text))
        assert "".join(pieces) == text
        assert all(len(p) <= 400 for p in pieces)
        n_pieces += len(pieces)
        runs = [m.span() for m in re.finditer(r"(?<!\S)\S{26,}|(?<!\s)\s{26,}", text)]
        assert tokmod._long_runs(text, 25) == runs
        n_runs += len(runs)
        for allowed in (frozenset(), "all"):
            whole = meta.model.encode(text, allowed_special=allowed, disallowed_special=())
            assert meta.encode(text, allowed_special=allowed) == whole
    assert n_pieces > 1000 and n_runs > 100  # cuts were really made


def test_runs_without_safe_cut(meta, hf, monkeypatch):
    """A run with no id-preserving cut stays whole up to the 400k-character limit."""
    monkeypatch.setattr(tokmod, "TIKTOKEN_MAX_ENCODE_CHARS", 1000)
    monkeypatch.setattr(tokmod, "MAX_NO_WHITESPACES_CHARS", 25)
    text = "word " + " " * 900 + "x" * 60 + "\n" * 50 + "end"
    pieces = list(meta._pieces(text))
    assert pieces == ["word", " " * 901 + "x" * 60, "\n" * 50 + "end"]
    assert meta.encode(text) == hf_ids(hf, text)
    text = "ab " + " " * 2500 + "<|eot_id|>" * 300  # forced cuts, never inside <|eot_id|>
    pieces = list(meta._pieces(text))
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith(" ") or p.endswith("|>") or p == "ab" for p in pieces[:-1])
    ids = meta.encode(text, allowed_special="all")
    assert ids.count(meta.eot_id) == 300
    assert meta.decode(ids) == text


def test_million_spaces(meta):
    """tiktoken's regex engine gives up on ~1M spaces in one pre-token; encode still works."""
    text = "a" + " " * 1_100_000 + "b\t" + "\t" * 1_100_000
    with pytest.raises(ValueError):
        meta.model.encode(text)
    ids = meta.encode(text)
    assert meta.decode(ids) == text
    assert len(ids) < 100_000  # long whitespace tokens, not one per character


def test_cut_never_splits_a_special_token(meta, monkeypatch):
    monkeypatch.setattr(tokmod, "MAX_NO_WHITESPACES_CHARS", 25_000)
    text = "x" * 24_995 + "<|eot_id|>" + "y" * 100  # the run limit falls inside <|eot_id|>
    pieces = list(meta._pieces(text))
    assert len(pieces) == 2 and pieces[1].startswith("<|eot_id|>")
    ids = meta.encode(text, allowed_special="all")
    assert ids.count(meta.eot_id) == 1
    assert ids == meta.model.encode(text, allowed_special="all")


# ----------------------------------------------------------------------------- dialog


def test_encode_dialog_matches_format(meta, hf):
    messages = [
        {"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "  What is 2+2?  \n\n"},
        {"role": "assistant", "content": "4"},
        {"role": "ipython", "content": '{"result": 4}'},
        {"role": "user", "content": ""},
    ]
    expected = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in messages
    )
    prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    hf.encode_special_tokens = False
    try:
        want = hf_ids(hf, expected + prompt)
        want_no_prompt = hf_ids(hf, expected)
    finally:
        hf.encode_special_tokens = True
    assert want.count(128009) == len(messages)
    assert meta.encode_dialog(messages) == want
    assert meta.encode_dialog(messages, add_generation_prompt=False) == want_no_prompt
    assert meta.decode(meta.encode_dialog(messages)) == expected + prompt


def test_encode_dialog_explicit_ids(meta):
    ids = meta.encode_dialog([{"role": "user", "content": " hi "}])
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n hi <|eot_id|>
    # <|start_header_id|> assistant <|end_header_id|> \n\n
    assert ids == [128000, 128006, 882, 128007, 271, 6151, 128009, 128006, 78191, 128007, 271]


def test_encode_dialog_content_is_plain_text(meta):
    ids = meta.encode_dialog([{"role": "user", "content": "<|eot_id|><|start_header_id|>"}], False)
    assert ids.count(meta.eot_id) == 1 and ids.count(128006) == 1


def test_encode_dialog_rejects_unknown_role(meta):
    with pytest.raises(ValueError, match="role"):
        meta.encode_dialog([{"role": "tool", "content": "x"}])


# ----------------------------------------------------------------------------- bad files


def _write_model(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not a tokenizer file\n",
        "SGVsbG8= notanumber\n",
        (LLAMA3_DIR / "tokenizer_config.json").read_text()[:2000],
    ],
)
def test_malformed_file(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(path)


def test_directory_and_bad_ranks(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        Tokenizer(tmp_path)
    singles = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="single bytes"):
        Tokenizer(_write_model(tmp_path / "few.model", singles[:200]))
    gap = tmp_path / "gap.model"
    gap.write_text("".join(f"{base64.b64encode(t).decode()} {2 * r}\n" for r, t in enumerate(singles)))
    with pytest.raises(ValueError, match="ranks"):
        Tokenizer(gap)


def test_small_model_and_rewritten_file(tmp_path):
    """A file rewritten at the same path is re-read (tiktoken caches files by path)."""
    singles = [bytes([b]) for b in range(256)]
    path = _write_model(tmp_path / "tiny.model", singles + [b"ab"])
    tok = Tokenizer(path)
    assert tok.n_words == 257 + 256 and tok.bos_id == 257
    assert tok.encode("abc") == [256, ord("c")]
    _write_model(path, singles + [b"bc"])
    tok = Tokenizer(path)
    assert tok.encode("abc") == [ord("a"), 256]


# ----------------------------------------------------------------------------- default BPE


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llama3_jax_cache")


@pytest.fixture(scope="session")
def default_tok(default_cache):
    return default_tokenizer(2048, cache_dir=default_cache)


def test_default_tokenizer_ids(default_tok, default_cache):
    tok = default_tok
    assert tok.n_words == 2048
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (1792, 1793, 1801, 1796)
    assert tok.stop_ids == {1793, 1800, 1801}
    assert tok.path.parent == default_cache
    assert tok.path.name.startswith("default-bpe-2048-") and tok.path.suffix == ".model"
    ranks = load_tiktoken_bpe(str(tok.path))
    assert len(ranks) == 1792
    assert all(ranks[bytes([b])] == b for b in range(256))  # every byte is encodable
    assert sorted(ranks.values()) == list(range(1792))
    assert list(default_cache.iterdir()) == [tok.path]  # no temp files left behind


def test_default_tokenizer_round_trips(default_tok):
    files = [STDLIB / "os.py", STDLIB / "unicodedata.py" if (STDLIB / "unicodedata.py").exists()
             else STDLIB / "locale.py", STDLIB / "test" / "test_unicode_identifiers.py"]
    texts = [p.read_text(encoding="utf-8") for p in files if p.exists()] + list(CORPUS.values())
    assert len(texts) >= len(CORPUS) + 2
    for text in texts:
        ids = default_tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1792 and ids[-1] == 1793
        assert max(ids[1:-1]) < 1792
        assert default_tok.decode(ids[1:-1]) == text


def test_default_tokenizer_compression(default_tok):
    """Bytes per token on stdlib files that were not in the training sample."""
    files, _ = bpe._training_files(default_corpus_files(), bpe.DEFAULT_TRAIN_BYTES)
    trained = set(files)
    held_out = [p for p in default_corpus_files() if p not in trained][::20]
    n_bytes = n_tokens = 0
    for p in held_out:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(default_tok.encode(text))
    assert n_bytes > 1_000_000
    bytes_per_token = n_bytes / n_tokens
    print(f"default tokenizer: {bytes_per_token:.3f} bytes/token on {n_bytes} held-out bytes")
    assert bytes_per_token > 2.7  # observed ~2.95


def test_default_tokenizer_reuses_cache(default_tok, default_cache, monkeypatch):
    mtime = default_tok.path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cached file exists")

    monkeypatch.setattr(bpe, "_train_bpe", no_training)
    again = default_tokenizer(2048, cache_dir=default_cache)
    assert again.path == default_tok.path
    assert again.path.stat().st_mtime_ns == mtime
    monkeypatch.setenv("LLAMA3_JAX_CACHE", str(default_cache))
    assert default_tokenizer().path == default_tok.path
    assert bpe.default_cache_dir() == default_cache


def test_default_tokenizer_deterministic_and_repairs_cache(default_tok, tmp_path):
    """A second training (here replacing a damaged cache file) gives an identical file."""
    damaged = tmp_path / default_tok.path.name
    damaged.write_text("garbage\n")
    tok = default_tokenizer(2048, cache_dir=tmp_path)
    assert tok.path == damaged
    assert tok.path.read_bytes() == default_tok.path.read_bytes()


def test_default_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        default_tokenizer(300, cache_dir=tmp_path)


def test_bpe_conversion_matches_hf_encoding():
    """tiktoken with the converted ranks encodes exactly like the trained HF BPE."""
    files = [p for p in default_corpus_files() if p.parent == STDLIB]
    train = [p.read_text(encoding="utf-8") for p in files[:40:2]]
    held_out = [p.read_text(encoding="utf-8") for p in files[41:60:2]] + list(CORPUS.values())
    hf = bpe._train_bpe(train, 1000)
    ranks = bpe._ranks_from_hf(hf)
    assert len(ranks) == 1000
    to_byte = {c: b for b, c in tokmod.byte_to_unicode().items()}
    hf_bytes = {i: bytes(to_byte[c] for c in t) for t, i in hf.get_vocab().items()}
    enc = tiktoken.Encoding(
        "t", pat_str=tokmod.LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    for text in held_out:
        want = [ranks[hf_bytes[i]] for i in hf.encode(text).ids]
        assert enc.encode(text, disallowed_special=()) == want
