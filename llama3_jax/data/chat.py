"""Post-training rows in TRL's conversational formats, tokenized in the Llama 3 chat format.

    SFT:          {"messages": [{"role": ..., "content": ...}, ...]}
    preferences:  {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}
    prompts:      {"prompt": [messages]}

from JSONL lines or Parquet rows. A conversation is `Tokenizer.encode_dialog(messages,
add_generation_prompt=False)`; the loss mask covers assistant content and its `<|eot_id|>`
(or, with `formatting=False`, the content alone, as DPO wants). Every row is read,
checked and tokenized once, before anything is compiled: a bad row is an error naming
its file and line, or (data.skip_bad_rows) counted, reported and left out.

SFT conversations are packed whole into rows (first-fit, padded; never split across
rows), with segment ids and positions as in pretraining. A preference pair is two rows,
chosen then rejected, each one sequence padded to seq_len. Both iterators are Grain
pipelines with the pretraining iterator's checkpointable state (`packing.DataIterator`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from llama3_jax.config import ConfigError, DataConfig
from llama3_jax.data.packing import DataIterator, _data_settings, _fingerprint, _MakeBatch, _pack_row
from llama3_jax.data.sources import configured_sources

ROLES = ("system", "user", "assistant", "ipython")
FORMATS = {"sft": ("messages",), "pairs": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


# ------------------------------------------------------------------------ reading rows

def read_rows(path) -> list[tuple[str, dict | str]]:
    """(where, row dict or the reason it is unreadable) for every row of a JSONL or Parquet file."""
    path = pathlib.Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid etc.
            raise ConfigError(f"{path}: cannot read as Parquet ({e})") from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, ValueError) as e:
                out.append((f"{path}:{n}", f"not a valid JSON line ({e})"))
    if not out:
        raise ConfigError(f"{path} holds no rows; give a JSONL file with one JSON object per line, or Parquet")
    return out


def _messages(row: dict, key: str, assistant_only: bool = False) -> list[dict]:
    """The row's list of messages under `key` (a bare string is one assistant message), or ValueError."""
    if key not in row:
        raise ValueError(f"missing field {key!r} (found: {sorted(row)})")
    value = row[key]
    if isinstance(value, str) and assistant_only:
        value = [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {key!r} must be a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"field {key!r}: each message needs exactly `role` and `content`, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"field {key!r}: unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"field {key!r}: message content must be a string")
        if assistant_only and m["role"] != "assistant":
            raise ValueError(f"field {key!r} holds a {m['role']!r} message; it holds only the assistant's answer")
    return value


def parse_row(row, kind: str) -> tuple[list[dict], ...]:
    """The conversations of a row of `kind` (sft: (messages,); pairs: (chosen, rejected) with
    the prompt in front; prompts: (prompt,)), or ValueError naming what is wrong."""
    if isinstance(row, str):
        raise ValueError(row)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if kind == "sft":
        msgs = _messages(row, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("the conversation has no assistant message, so nothing to learn")
        return (msgs,)
    prompt = _messages(row, "prompt")
    if kind == "prompts":
        if prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant message; it should end where the answer starts")
        return (prompt,)
    return tuple(prompt + _messages(row, k, assistant_only=True) for k in ("chosen", "rejected"))


# ------------------------------------------------------------------------ tokenizing

def chat_tokens(tokenizer, messages: Sequence[dict], formatting: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, answer mask) of a conversation: ids equal `encode_dialog(messages,
    add_generation_prompt=False)`; the mask marks assistant content and, if `formatting`,
    the `<|eot_id|>` that ends it."""
    ids, mask = [tokenizer.bos_id], [False]
    for m in messages:
        header = tokenizer.encode_dialog([m], add_generation_prompt=False)[1:]
        content = tokenizer.encode(m["content"].strip())
        head = len(header) - len(content) - 1  # <|start_header_id|> role <|end_header_id|> "\n\n"
        answer = m["role"] == "assistant"
        ids += header
        mask += [False] * head + [answer] * len(content) + [answer and formatting]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def as_example(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[n, 2] columns (token, next token, or -1 where the next token is not learned)."""
    x = np.full((len(ids), 2), -1, np.int32)
    x[:, 0] = ids
    x[:-1, 1] = np.where(mask[1:], ids[1:], -1)
    return x


def load_examples(data: DataConfig, tokenizer, kind: str, seq_len: int, formatting: bool = True):
    """Every row of the configured files as examples: (examples, skipped). An example is a
    tuple of [n, 2] arrays (one per conversation of the row); for prompts, (messages,). `skipped` lists (where, why)
    of the bad rows left out when data.skip_bad_rows is set; otherwise the first bad row
    is a ConfigError."""
    sources = configured_sources(data)
    if not sources:
        raise ConfigError("post-training needs data: set data.path to a JSONL or Parquet file")
    examples, skipped = [], []
    for source in sources:
        if source.kind not in ("auto", "jsonl", "parquet"):
            raise ConfigError(f"{source.path}: post-training rows are JSONL or Parquet, not {source.kind}")
        for where, row in read_rows(source.path):
            try:
                convs = parse_row(row, kind)
                encoded = [chat_tokens(tokenizer, c, formatting) for c in convs]
                longest = max(len(ids) for ids, _ in encoded)
                if kind != "prompts" and longest > seq_len:
                    raise ValueError(f"it is {longest} tokens, longer than data.seq_len={seq_len}; raise "
                                     "data.seq_len or shorten the row")
            except ValueError as e:
                if not data.skip_bad_rows:
                    raise ConfigError(f"{where}: {e}; fix the row, or set data.skip_bad_rows=true to skip bad "
                                      "rows") from None
                skipped.append((where, str(e)))
                continue
            examples.append(convs if kind == "prompts" else tuple(as_example(*e) for e in encoded))
    if not examples:
        raise ConfigError(f"no usable rows in {', '.join(s.path for s in sources)} ({len(skipped)} bad)")
    return examples, skipped


# ------------------------------------------------------------------------ iterators

class _PairRows:
    """Examples (a preference pair's chosen and rejected) -> one row each, a single sequence
    from position 0, padded to seq_len."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, examples):
        rows = []
        for x in examples:
            n = len(x)
            pad = np.zeros((self.seq_len, 2), np.int32)
            pad[:n] = x
            seg = np.zeros(self.seq_len, np.int32)
            seg[:n] = 1
            pos = np.where(seg > 0, np.arange(self.seq_len), 0).astype(np.int32)
            rows.append({"x": pad, "segment_ids": seg, "positions": pos})
        return rows


class _FlattenPairs(_MakeBatch):
    def __call__(self, pairs):
        return super().__call__([row for pair in pairs for row in pair])


def rows_batch(examples: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """A batch of one [n, 2] example per row, from position 0, padded to seq_len."""
    return _MakeBatch(len(examples), seq_len)(_PairRows(seq_len)(examples))


def pairs_batch(pairs: Sequence, seq_len: int) -> dict[str, np.ndarray]:
    """The batch of preference examples (as `load_examples` gives them), as the iterator makes it."""
    return rows_batch([x for pair in pairs for x in pair], seq_len)


def make_chat_iterator(examples: list, kind: str, data: DataConfig, *, global_batch: int, seq_len: int,
                       process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                       epoch_loop: bool = True) -> DataIterator:
    """This process's batches of SFT rows (kind "sft": whole conversations packed first-fit)
    or preference pairs (kind "pairs": rows 2i and 2i+1 are pair i's chosen and rejected)."""
    import grain

    rows = global_batch // process_count
    ds = grain.MapDataset.source([e if kind == "pairs" else {"x": e[0]} for e in examples])
    ds = ds[process_index::process_count].shuffle(seed=data.seed).repeat(None if epoch_loop else 1)
    if kind == "pairs":
        it = ds.map(_PairRows(seq_len)).to_iter_dataset()
        it = it.batch(rows // 2, drop_remainder=False, batch_fn=_FlattenPairs(rows, seq_len))
    else:
        it = grain.experimental.FirstFitPackIterDataset(ds.to_iter_dataset(), length_struct={"x": seq_len},
                                                        num_packing_bins=max(rows, 4), seed=data.seed)
        it = it.map(_pack_row).batch(rows, drop_remainder=False, batch_fn=_MakeBatch(rows, seq_len))
    if prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    settings = {**_data_settings(data), "rows_kind": kind, "examples": len(examples)}
    identity = {"data": _fingerprint(settings), "rows": rows, "seq_len": seq_len, "process_index": process_index,
                "process_count": process_count, "epoch_loop": epoch_loop, "worker_count": 0,
                "data_config": settings, "data_legacy": None}
    return DataIterator(it, rows=rows, seq_len=seq_len, identity=identity)
