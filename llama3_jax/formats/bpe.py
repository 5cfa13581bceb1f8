"""Byte-level BPE through Hugging Face `tokenizers`: the project's default tokenizer, and
conversions between tiktoken `tokenizer.model` files and Hugging Face `tokenizer.json`.

`default_tokenizer()` builds the tokenizer for the default training run. That run must work
without downloading anything, and Meta's tokenizer may not be shipped with the project, so
we train a small byte-level BPE on the embedded default corpus (this Python's standard
library sources, see `llama3_jax.data.corpus`) with the same pre-tokenization as Llama 3,
and write it in Meta's tiktoken `tokenizer.model` format. The same `Tokenizer` class and
code path then serve both the real Llama 3 tokenizer and the default one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
from collections.abc import Sequence

from llama3_jax.config import ConfigError
from llama3_jax.data.corpus import default_corpus_files
from llama3_jax.formats.tokenizer import (LLAMA3_SPLIT_PATTERN, NUM_SPECIAL_TOKENS, Tokenizer, byte_to_unicode,
                                          read_tiktoken_file, write_tiktoken_file)


def load_tokenizer(path) -> Tokenizer:
    """A `Tokenizer`, with a malformed file reported as a ConfigError (bad user input)."""
    try:
        return Tokenizer(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_tokenizer_fits(path, cfg) -> Tokenizer:
    """The tokenizer at `path`, checked to have no more ids than the model's vocabulary."""
    return check_fits(load_tokenizer(path), cfg)


def check_fits(tok: Tokenizer, cfg, fix: str = "") -> Tokenizer:
    """`tok`, checked to have no more ids than the model's vocabulary; `fix` ends the error."""
    if tok.n_words > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.n_words} ids but the model's vocab_size is "
                          f"{cfg.vocab_size}{fix}")
    return tok


# Bytes of default-corpus text the default tokenizer is trained on: an evenly spread,
# deterministic sample of the sorted stdlib files (about a quarter of them). Training takes
# about a second on 2 cores; using all ~31 MB changes bytes/token by only ~3%.
DEFAULT_TRAIN_BYTES = 8_000_000
# Bump when the training recipe changes, so cached files are not reused across recipes.
_RECIPE_VERSION = "1"


def default_cache_dir() -> pathlib.Path:
    """`$LLAMA3_JAX_CACHE`, else `~/.cache/llama3_jax`."""
    env = os.environ.get("LLAMA3_JAX_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "llama3_jax"


def default_tokenizer(
    vocab_size: int = 2048, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """The project's own tokenizer for the default run: a byte-level BPE with
    `vocab_size - 256` ranks plus the 256 Llama 3 special tokens (so `n_words ==
    vocab_size`), trained on the default corpus with Llama 3 pre-tokenization, stored in
    tiktoken format in `cache_dir` and reused from there on later calls."""
    n_ranks = vocab_size - NUM_SPECIAL_TOKENS
    if n_ranks < 256:
        raise ValueError(
            f"vocab_size must be at least {256 + NUM_SPECIAL_TOKENS} "
            f"(256 byte tokens + {NUM_SPECIAL_TOKENS} special tokens), got {vocab_size}"
        )
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    files, root = _training_files(default_corpus_files(), DEFAULT_TRAIN_BYTES)
    texts, key = _read_training_texts(files, root, vocab_size)
    path = cache / f"default-bpe-{vocab_size}-{key}.model"
    if path.is_file():
        try:
            tok = Tokenizer(path)
            if tok.n_words == vocab_size:
                return tok
        except ValueError:
            pass  # damaged: train again and replace it
    ranks = _ranks_from_hf(_train_bpe(texts, n_ranks))
    if len(ranks) != n_ranks:
        raise ValueError(
            f"the default corpus sample yields only {len(ranks)} BPE tokens; "
            f"vocab_size={vocab_size} needs {n_ranks}"
        )
    write_tiktoken_file(ranks, path)
    return Tokenizer(path)


def _training_files(
    files: Sequence[pathlib.Path], budget: int
) -> tuple[list[pathlib.Path], pathlib.Path]:
    """Every k-th file of the sorted list, k chosen so the sample is about `budget` bytes."""
    if not files:
        raise ValueError("the default corpus is empty: no standard library .py files found")
    sizes = [f.stat().st_size for f in files]
    stride = max(1, round(sum(sizes) / budget))
    root = pathlib.Path(os.path.commonpath([str(f) for f in files]))
    return list(files[::stride]), root


def _read_training_texts(
    files: Sequence[pathlib.Path], root: pathlib.Path, vocab_size: int
) -> tuple[list[str], str]:
    """UTF-8 texts of `files` (others skipped) and a cache key over the recipe, the
    Python version, and the names and contents of the files used."""
    import tokenizers

    h = hashlib.sha256()
    h.update(
        f"recipe={_RECIPE_VERSION} vocab={vocab_size} python={platform.python_version()} "
        f"tokenizers={tokenizers.__version__}\n".encode()
    )
    texts = []
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib test files are deliberately in other encodings
        h.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(hashlib.sha256(data).digest())
        texts.append(text)
    return texts, h.hexdigest()[:16]





def _train_bpe(texts: Sequence[str], n_ranks: int):
    """Train a Hugging Face byte-level BPE with `n_ranks` tokens (the 256 bytes included),
    pre-tokenized like Llama 3 (the same Split + ByteLevel as Meta's tokenizer.json)."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return hf


def _ranks_from_hf(hf) -> dict[bytes, int]:
    """tiktoken ranks of a trained HF byte-level BPE: byte b gets rank b, and the token made
    by the i-th merge gets rank 256 + i, so tiktoken's lowest-rank-first merging applies the
    merges in the order BPE learned them."""
    model = json.loads(hf.to_str())["model"]
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    singles = {bytes(to_byte[c] for c in tok) for tok, _ in vocab[:256]}
    if singles != set(ranks):
        raise ValueError("trained BPE does not start with the 256 single-byte tokens")
    merged = [bytes(to_byte[c] for c in tok) for tok, _ in vocab[256:]]
    for token in merged:
        if token in ranks:
            raise ValueError(f"trained BPE has the token {token!r} twice")
        ranks[token] = len(ranks)
    # Every merged token must come from a merge of two earlier tokens, in vocab order.
    for i, merge in enumerate(model["merges"][: len(merged)]):
        a, b = merge if isinstance(merge, list) else merge.split(" ")
        left, right = bytes(to_byte[c] for c in a), bytes(to_byte[c] for c in b)
        if left + right != merged[i] or ranks[left] >= 256 + i or ranks[right] >= 256 + i:
            raise ValueError(f"trained BPE merge {i} does not match its vocabulary entry")
    return ranks


# ---------------------------------------------------------------- Hugging Face tokenizer.json

def is_tiktoken_file(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    lines = head.splitlines()[:5]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines)


def ranks_from_tokenizer_json(path) -> dict[bytes, int]:
    """tiktoken ranks (token bytes -> id) from a byte-level BPE tokenizer.json whose regular
    vocabulary is ids 0..n-1 (as Llama 3's)."""
    d = json.loads(pathlib.Path(path).read_text())
    model = d.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model:
        raise ConfigError("not a BPE tokenizer")
    inv = {c: b for b, c in byte_to_unicode().items()}
    ranks = {}
    for tok, i in model["vocab"].items():
        try:
            ranks[bytes(inv[c] for c in tok)] = i
        except KeyError:
            raise ConfigError(f"token {tok!r} is not byte-level BPE") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError("vocabulary ids are not 0..n-1")
    return ranks


def write_hf_tokenizer(tokenizer_model, out: pathlib.Path, model_max_length: int = 131072):
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) for a tiktoken
    tokenizer.model in Llama 3's format, and a copy of it as original/tokenizer.model.

    The BPE merges are every split (a, b) of a token into two tokens, ranked by the merged
    token's rank, which is the order tiktoken merges in; `ignore_merges` makes a piece that is
    itself a token encode as that token, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = load_tokenizer(tokenizer_model)
    ranks = read_tiktoken_file(tokenizer_model)
    b2u = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    merges = []
    for b, r in ranks.items():
        for k in range(1, len(b)):
            ra, rb = ranks.get(b[:k]), ranks.get(b[k:])
            if ra is not None and rb is not None:
                merges.append((r, ra, rb, text(b[:k]), text(b[k:])))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True,
                                fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda x: x[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if hf.token_to_id(s) != i:
            raise ConfigError(f"special token {s} would get id {hf.token_to_id(s)} instead of {i}")
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    hf.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": "<|end_of_text|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        **special_map, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s, i in specials},
    }, indent=2))
    (out / "original").mkdir(exist_ok=True)
    shutil.copyfile(tokenizer_model, out / "original" / "tokenizer.model")
