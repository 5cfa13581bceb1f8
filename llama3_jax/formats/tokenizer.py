"""The Llama 3 tokenizer (tiktoken BPE) and tiktoken `tokenizer.model` files.

`Tokenizer` reads a Meta Llama 3 `tokenizer.model` (lines `base64(token_bytes) rank`) and
encodes exactly like Meta's reference: the Llama 3 pre-tokenizer split pattern, byte-level BPE
by rank, and 256 special tokens from id `len(ranks)` in the Llama 3.1+ layout. The project's
own default tokenizer (`llama3_jax.formats.bpe.default_tokenizer`) is such a file too.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import AbstractSet, Literal

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llama3_jax.config import write_atomic

__all__ = [
    "LLAMA3_SPLIT_PATTERN",
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_TOKEN_NAMES",
    "Tokenizer",
    "byte_to_unicode",
    "read_tiktoken_file",
    "write_tiktoken_file",
]

# Llama 3 pre-tokenizer pattern (same as in Meta's reference code and tokenizer.json).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256

_NAMED_SPECIALS = (
    "begin_of_text",
    "end_of_text",
    "reserved_special_token_0",
    "reserved_special_token_1",
    "finetune_right_pad_id",
    "step_id",
    "start_header_id",
    "end_header_id",
    "eom_id",
    "eot_id",
    "python_tag",
)
# Llama 3.1+ layout: the named ones, then reserved_special_token_2 ... up to 256 in all.
SPECIAL_TOKEN_NAMES: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"reserved_special_token_{i}"
    for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
)
assert len(SPECIAL_TOKEN_NAMES) == NUM_SPECIAL_TOKENS

DIALOG_ROLES = ("system", "user", "assistant", "ipython")

# Meta's reference limits: tiktoken is given at most this many characters at a time ...
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ... and no run of more than this many consecutive whitespace / non-whitespace characters.
MAX_NO_WHITESPACES_CHARS = 25_000

# Positions p where the Llama 3 split pattern always has a pre-token boundary, whatever the
# surrounding text: an ASCII letter followed by an ASCII non-letter (no alternative of the
# pattern puts a letter before a non-letter inside one pre-token), or an ASCII digit followed
# by an ASCII non-digit (digits only ever occur in `\p{N}{1,3}`). The pattern has no
# look-behind and its only look-ahead, `(?!\S)`, sits in the whitespace alternatives, so
# encoding text[:p] and text[p:] separately gives exactly the ids of encoding text. Only
# ASCII is used so that Unicode-table differences between Python and tiktoken's regex
# engine cannot matter.
_SAFE_CUT = re.compile(
    r"(?<=[A-Za-z])(?=[\x00-\x40\x5b-\x60\x7b-\x7f])|(?<=[0-9])(?=[\x00-\x2f\x3a-\x7f])"
)
_WHITESPACE = re.compile(r"\s")
_NON_WHITESPACE = re.compile(r"\S")


class Tokenizer:
    """Llama 3 tokenizer over a tiktoken BPE file (Meta's `tokenizer.model` format).

    Attributes: `path`, `n_words` (vocabulary size including the 256 special tokens),
    `bos_id`, `eos_id` (end_of_text), `eot_id`, `eom_id`, `pad_id` (finetune_right_pad_id),
    `stop_ids`, `special_tokens` (`"<|name|>"` -> id), `model` (the `tiktoken.Encoding`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        ranks = _load_ranks(self.path)
        n_ranks = len(ranks)
        self.special_tokens: dict[str, int] = {
            f"<|{name}|>": n_ranks + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)
        }
        self.model = tiktoken.Encoding(
            name=f"llama3:{self.path.name}",
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=n_ranks + NUM_SPECIAL_TOKENS,
        )
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]
        self.stop_ids: set[int] = {self.eos_id, self.eom_id, self.eot_id}
        self._special_re = re.compile(
            "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
        )
        self._max_special_len = max(len(s) for s in self.special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, n_words={self.n_words})"

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self,
        text: str,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text`, optionally with begin_of_text / end_of_text around them.

        As in Meta's reference, special-token strings in `text` are encoded as ordinary
        text unless listed in `allowed_special` (or it is "all"); `disallowed_special`
        makes tiktoken raise on the ones listed. Long texts are handed to tiktoken in
        pieces, cut only where the ids cannot change (see `_pieces`).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        for piece in self._pieces(text):
            ids.extend(
                self.model.encode(
                    piece, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
            )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special ids decode to their `<|name|>` strings)."""
        return self.model.decode([int(i) for i in ids])

    def encode_dialog(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Llama 3 chat format: `<|begin_of_text|>`, then for each message
        `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`, then
        (if `add_generation_prompt`) the assistant header that prompts a reply.
        Message contents are plain text: special-token strings in them are not special."""
        ids = [self.bos_id]
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in DIALOG_ROLES:
                raise ValueError(f"unknown dialog role {role!r}; expected one of {DIALOG_ROLES}")
            if not isinstance(content, str):
                raise TypeError(f"message content must be a str, got {type(content).__name__}")
            ids.extend(self._header(role))
            ids.extend(self.encode(content.strip()))
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids.extend(self._header("assistant"))
        return ids

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    # ------------------------------------------------------------------ long inputs

    def _pieces(self, text: str) -> Iterable[str]:
        """Split `text` into consecutive pieces of at most `TIKTOKEN_MAX_ENCODE_CHARS`
        characters, cutting runs of more than `MAX_NO_WHITESPACES_CHARS` whitespace or
        non-whitespace characters, like Meta's reference. Unlike it, cuts are made only at
        `_SAFE_CUT` positions outside special-token strings, so tiktoken gives the same ids
        as for the whole text. A run with no such position stays whole, up to
        `TIKTOKEN_MAX_ENCODE_CHARS`; only beyond that (a single pre-token that long, e.g.
        a million spaces, on which tiktoken's regex engine gives up) is it cut anyway."""
        max_chars, max_run = TIKTOKEN_MAX_ENCODE_CHARS, MAX_NO_WHITESPACES_CHARS
        n = len(text)
        if n <= max_chars and n <= max_run:
            yield text
            return
        long_runs = _long_runs(text, max_run)
        pos, r = 0, 0
        while pos < n:
            hard = pos + max_chars
            limit = hard
            while r < len(long_runs) and long_runs[r][1] <= pos:
                r += 1
            if r < len(long_runs):
                run_start, run_end = long_runs[r]
                start = max(run_start, pos)
                if start < limit and run_end - start > max_run:
                    limit = min(limit, start + max_run)
            if limit >= n:
                yield text[pos:]
                return
            cut = self._last_cut(text, pos, limit)
            if cut is None:
                cut = self._next_cut(text, limit, min(hard, n))
            if cut is None:
                cut = n if hard >= n else self._forced_cut(text, pos, hard)
            yield text[pos:cut]
            pos = cut

    def _last_cut(self, text: str, lo: int, hi: int) -> int | None:
        """The last safe cut p with lo < p <= hi, or None."""
        window = 1024
        while True:
            start = max(lo + 1, hi - window)
            cuts = [m.start() for m in _SAFE_CUT.finditer(text, start, hi + 1)]
            for p in reversed(cuts):
                if not self._inside_special(text, p):
                    return p
            if start == lo + 1:
                return None
            window *= 16

    def _next_cut(self, text: str, lo: int, hi: int) -> int | None:
        """The first safe cut p with lo < p <= hi, or None."""
        for m in _SAFE_CUT.finditer(text, lo + 1, hi + 1):
            if not self._inside_special(text, m.start()):
                return m.start()
        return None

    def _forced_cut(self, text: str, lo: int, p: int) -> int:
        """p, or the start (else end) of a special-token string that p falls inside."""
        for m in self._special_re.finditer(
            text, max(0, p - self._max_special_len + 1), min(len(text), p + self._max_special_len)
        ):
            if m.start() < p < m.end():
                return m.start() if m.start() > lo else m.end()
        return p

    def _inside_special(self, text: str, p: int) -> bool:
        lo = max(0, p - self._max_special_len + 1)
        hi = min(len(text), p + self._max_special_len)
        return any(m.start() < p < m.end() for m in self._special_re.finditer(text, lo, hi))


def _long_runs(text: str, max_run: int) -> list[tuple[int, int]]:
    """Spans of the maximal runs of more than `max_run` whitespace or non-whitespace
    characters, in order. Only looks closely at blocks of `max_run // 2` characters that
    are all one kind (any such run covers a whole block), so ordinary text costs little."""
    n, step = len(text), max(1, max_run // 2)
    runs = []
    s = 0
    while s + step <= n:
        e = s + step
        for other in (_WHITESPACE, _NON_WHITESPACE):
            if other.search(text, s, e) is None:  # text[s:e] has no `other` character
                start = _run_start(text, s, other, step)
                m = other.search(text, e)
                end = m.start() if m else n
                if end - start > max_run:
                    runs.append((start, end))
                s = end
                break
        else:
            s = e
    return runs


def _run_start(text: str, pos: int, other: re.Pattern, step: int) -> int:
    """Start of the run that contains text[pos]: just after the last `other` before pos."""
    hi = pos
    while hi > 0:
        lo = max(0, hi - step)
        last = None
        for last in other.finditer(text, lo, hi):
            pass
        if last is not None:
            return last.start() + 1
        hi = lo
    return 0


def _load_ranks(path: pathlib.Path) -> dict[bytes, int]:
    expected = (
        "a tiktoken BPE file like Meta's Llama 3 tokenizer.model: "
        "one 'base64(token_bytes) rank' line per token, ranks 0..n-1, all 256 single bytes present"
    )
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path} (expected {expected})")
    if not path.is_file():
        raise ValueError(f"tokenizer path {path} is not a file (expected {expected})")
    data = path.read_bytes()
    try:
        # expected_hash makes tiktoken's path-keyed cache (in the temp dir) re-read a file
        # that has changed instead of returning the stale copy.
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except ValueError as e:
        raise ValueError(f"malformed tokenizer file {path}: {e} (expected {expected})") from e
    if not ranks:
        raise ValueError(f"malformed tokenizer file {path}: no tokens (expected {expected})")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"malformed tokenizer file {path}: ranks are not 0..{len(ranks) - 1} without "
            f"repeats (expected {expected})"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"malformed tokenizer file {path}: {len(missing)} single bytes have no token, "
            f"e.g. {bytes(missing[:4])!r} (expected {expected})"
        )
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's (GPT-2's) reversible table: printable Latin-1 bytes stand for
    themselves, the other bytes map in order to U+0100 upwards. Hugging Face tokenizer.json
    vocabularies spell token bytes with it."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tiktoken_file(path) -> dict[bytes, int]:
    """The ranks of a tiktoken BPE file, checked (see `Tokenizer`)."""
    return _load_ranks(pathlib.Path(path))


def write_tiktoken_file(ranks: Mapping[bytes, int], path) -> None:
    """Write `ranks` as `base64(token) rank` lines, atomically (temp file + rename)."""
    write_atomic(path, "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                               for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])).encode("ascii"))
