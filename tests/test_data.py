"""Tests of the data pipeline (llama3_jax.data) with a tiny byte-level fake tokenizer."""

import json
import random
import string
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import functools

from llama3_jax import config
from llama3_jax.config import DataSource

# Most tests read rows in packing order to check the packing itself; the row shuffle is
# tested on its own below.
DataConfig = functools.partial(config.DataConfig, shuffle_rows=0)
from llama3_jax.data import make_iterator, resolve_kind

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class ByteTokenizer:
    """Token = UTF-8 byte value; BOS = 256, EOS = 257 (0 never occurs in our texts)."""

    bos_id = 256
    eos_id = 257

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos


TOK = ByteTokenizer()


# ----------------------------------------------------------------------------- helpers


def write_text_folder(root, docs, suffix=".txt"):
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        sub = root / f"part{i % 3}"  # nested: folders are searched recursively
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:04d}{suffix}").write_text(d, encoding="utf-8")
    return root


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def write_parquet(path, docs, field="text"):
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path,
                   row_group_size=max(1, len(docs) // 3))
    return path


def random_docs(rng, n, lo, hi, alphabet, tag=""):
    """n distinct documents of lo..hi characters from `alphabet`."""
    out = []
    for i in range(n):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))
        out.append(f"{tag}{i}|{body}" if tag else body)
    return out


def batches(it, n):
    return [it.next() for _ in range(n)]


def check_batch_format(b, rows, seq_len):
    assert set(b) == set(KEYS)
    for k in KEYS:
        assert b[k].shape == (rows, seq_len), k
        assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k


def pieces_of(batch_list):
    """Stream of (tokens, targets, loss_mask) per segment piece, in order, checking the
    per-row layout on the way: segments numbered 1, 2, ... contiguously, padding (0)
    only at the end, positions 0, 1, 2, ... inside every segment."""
    out = []
    for b in batch_list:
        for r in range(b["tokens"].shape[0]):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            n_real = int((seg > 0).sum())
            assert (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all(), seg
            pad = slice(n_real, None)
            assert (b["tokens"][r][pad] == 0).all() and (b["targets"][r][pad] == 0).all()
            assert (b["loss_mask"][r][pad] == 0).all() and (pos[pad] == 0).all()
            if n_real == 0:
                continue
            starts = [0] + [i for i in range(1, n_real) if seg[i] != seg[i - 1]]
            ends = starts[1:] + [n_real]
            assert list(seg[starts]) == list(range(1, len(starts) + 1)), seg
            for s, e in zip(starts, ends):
                np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
                out.append((b["tokens"][r][s:e], b["targets"][r][s:e], b["loss_mask"][r][s:e]))
    return out


def reconstruct(batch_list):
    """Documents (token lists, BOS..EOS) from the packed stream of one source, checking
    that targets are each token's successor in its document and loss_mask is 1 exactly
    where that successor exists. Returns (complete documents, trailing partial one)."""
    docs, cur = [], None
    stream = []  # (doc index, offset) of every token, to check targets afterwards
    for toks, tgts, mask in pieces_of(batch_list):
        toks = toks.tolist()
        # A segment holds one document's piece: BOS only first, EOS only last.
        assert TOK.bos_id not in toks[1:] and TOK.eos_id not in toks[:-1], toks
        if toks[0] == TOK.bos_id:
            assert cur is None, "a document started before the previous one ended"
            cur = []
            docs.append(cur)
        else:
            assert cur is not None, "a continuation piece without a started document"
        for j, t in enumerate(toks):
            stream.append((len(docs) - 1, len(cur), tgts[j], mask[j]))
            cur.append(t)
        if toks[-1] == TOK.eos_id:
            cur = None
    for d, off, tgt, m in stream:
        doc = docs[d]
        if off + 1 < len(doc):
            assert m == 1.0 and tgt == doc[off + 1], (d, off)
        elif cur is None or d != len(docs) - 1:  # the document's real last token (EOS)
            assert m == 0.0 and tgt == 0 and doc[off] == TOK.eos_id, (d, off)
    complete = docs if cur is None else docs[:-1]
    return complete, (None if cur is None else cur)


def as_token_doc(text):
    return TOK.encode(text, bos=True, eos=True)


def decode(doc):
    assert doc[0] == TOK.bos_id and doc[-1] == TOK.eos_id
    return bytes(doc[1:-1]).decode("utf-8")


def run_to_end(it, max_batches=10_000):
    out = []
    for _ in range(max_batches):
        try:
            out.append(it.next())
        except StopIteration:
            return out
    raise AssertionError("epoch_loop=False iterator did not stop")


# ------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Text folder (short docs, lowercase), JSONL (medium, digits), Parquet (long, upper)."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    a = random_docs(rng, 60, 5, 40, string.ascii_lowercase)
    b = random_docs(rng, 40, 100, 250, string.digits)
    c = random_docs(rng, 20, 400, 900, string.ascii_uppercase)
    return (
        DataSource(path=str(write_text_folder(root / "txt", a)), weight=0.5, glob="*.txt"),
        DataSource(path=str(write_jsonl(root / "b.jsonl", b)), weight=0.3),
        DataSource(path=str(write_parquet(root / "c.parquet", c)), weight=0.2),
    ), (a, b, c)


def source_of_tokens(toks):
    """0/1/2 for lowercase/digit/uppercase content bytes, -1 for BOS/EOS."""
    lab = np.full(toks.shape, -1)
    lab[(toks >= ord("a")) & (toks <= ord("z"))] = 0
    lab[(toks >= ord("0")) & (toks <= ord("9"))] = 1
    lab[(toks >= ord("A")) & (toks <= ord("Z"))] = 2
    return lab


def test_mixture_token_shares_match_weights(three_sources):
    sources, _ = three_sources
    data = DataConfig(sources=sources, seed=3)
    it = make_iterator(data, TOK, global_batch=8, seq_len=64)
    counts = np.zeros(3)
    unattributed = total = 0
    for b in batches(it, 150):
        check_batch_format(b, 8, 64)
        assert (b["segment_ids"] > 0).all(), "an endless mixed stream needs no padding"
        for toks, _, _ in pieces_of([b]):
            lab = source_of_tokens(toks)
            content = lab[lab >= 0]
            total += len(toks)
            if len(content) == 0:  # a lone BOS/EOS piece: count it against every source
                unattributed += len(toks)
                continue
            assert (content == content[0]).all(), "a document mixes sources"
            counts[content[0]] += len(toks)
    shares = counts / total
    assert unattributed / total < 0.01
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.02)


def test_packing_reconstructs_documents_exactly(tmp_path):
    rng = random.Random(1)
    # Lengths from 1 to ~3 rows, a unicode document, an empty one.
    docs = random_docs(rng, 45, 0, 100, string.ascii_letters + " \n", tag="d")
    docs += ["é ü 中文 — ünïcödé", ""]
    src = DataSource(path=str(write_text_folder(tmp_path / "docs", docs)))
    it = make_iterator(DataConfig(sources=(src,), seed=7), TOK, global_batch=3, seq_len=32,
                       epoch_loop=False)
    out = run_to_end(it)
    for b in out:
        check_batch_format(b, 3, 32)
    complete, partial = reconstruct(out)
    assert partial is None
    assert sorted(decode(d) for d in complete) == sorted(docs)
    # Only the final row may be short: at most one row of padding tokens in all.
    n_pad = sum(int((b["segment_ids"] == 0).sum()) for b in out)
    assert n_pad < 3 * 32 + 32
    # Some documents span rows and some rows hold several documents.
    assert any(b["segment_ids"].max() >= 3 for b in out)
    assert sum(len(d) for d in complete) == sum(len(as_token_doc(d)) for d in docs)


def test_packing_targets_cross_row_breaks_within_a_document(tmp_path):
    docs = ["x" * 100, "y" * 7]
    src = DataSource(path=str(write_text_folder(tmp_path / "d", docs)))
    it = make_iterator(DataConfig(sources=(src,)), TOK, global_batch=1, seq_len=16,
                       epoch_loop=False)
    out = run_to_end(it)
    complete, _ = reconstruct(out)  # checks targets/loss_mask token by token
    assert sorted(decode(d) for d in complete) == sorted(docs)
    first = out[0]
    # A row cut inside a document: the last token still predicts the next one.
    assert first["loss_mask"][0, -1] == 1.0
    assert first["targets"][0, -1] == out[1]["tokens"][0, 0]
    # The continuation restarts its positions as segment 1.
    assert out[1]["segment_ids"][0, 0] == 1 and out[1]["positions"][0, 0] == 0


def test_epochs_loop_and_reshuffle(tmp_path):
    docs = [f"doc{i:02d}" for i in range(12)]
    src = DataSource(path=str(write_text_folder(tmp_path / "d", docs)))
    it = make_iterator(DataConfig(sources=(src,), seed=5), TOK, global_batch=2, seq_len=16)
    complete, _ = reconstruct(batches(it, 40))
    order = [decode(d) for d in complete]
    assert len(order) >= 36
    epochs = [order[i:i + 12] for i in range(0, 36, 12)]
    for e in epochs:
        assert sorted(e) == docs  # every epoch sees every document once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # reshuffled each epoch
    # The seed decides the order; the same seed gives the same stream.
    it_same = make_iterator(DataConfig(sources=(src,), seed=5), TOK, global_batch=2, seq_len=16)
    it_other = make_iterator(DataConfig(sources=(src,), seed=6), TOK, global_batch=2, seq_len=16)
    assert [decode(d) for d in reconstruct(batches(it_same, 40))[0]] == order
    assert [decode(d) for d in reconstruct(batches(it_other, 40))[0]] != order


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("opts", [{"prefetch": 0}, {}, {"num_threads": 2, "prefetch": 3}])
def test_exact_resume_from_json_state(three_sources, opts):
    sources, _ = three_sources
    data = DataConfig(sources=sources, seed=11)
    kw = dict(global_batch=4, seq_len=48, **opts)
    it = make_iterator(data, TOK, **kw)
    head = batches(it, 9)  # crosses epochs of the text source (60 short docs)
    state = json.loads(json.dumps(it.get_state()))
    tail = batches(it, 30)

    resumed = make_iterator(data, TOK, **kw)
    resumed.set_state(state)
    assert_batches_equal(batches(resumed, 30), tail)
    # The state is a snapshot: taking it again later and resuming also works.
    state2 = json.loads(json.dumps(resumed.get_state()))
    more = batches(resumed, 5)
    again = make_iterator(data, TOK, **kw)
    again.set_state(state2)
    assert_batches_equal(batches(again, 5), more)
    # And a fresh iterator replays the same head.
    assert_batches_equal(batches(make_iterator(data, TOK, **kw), 9), head)
    for x in (it, resumed, again):
        x.close()


def test_exact_resume_when_rows_end_on_document_ends(tmp_path):
    # 14 and 6 characters = 16 and 8 tokens: rows of 16 end exactly where documents end,
    # so the packer's state holds no partial document.
    docs = [f"{i:02d}" + "q" * 12 for i in range(8)] + [f"{i:02d}" + "w" * 4 for i in range(8)]
    src = DataSource(path=str(write_text_folder(tmp_path / "d", docs)))
    data = DataConfig(sources=(src,), seed=1)
    ref = batches(make_iterator(data, TOK, global_batch=1, seq_len=16), 12)
    assert sum(b["segment_ids"].max() == 2 for b in ref) >= 2
    for k in range(1, 7):
        it = make_iterator(data, TOK, global_batch=1, seq_len=16)
        batches(it, k)
        state = json.loads(json.dumps(it.get_state()))
        resumed = make_iterator(data, TOK, global_batch=1, seq_len=16)
        resumed.set_state(state)
        assert_batches_equal(batches(resumed, 6), ref[k:k + 6])


def test_resume_with_worker_processes(three_sources):
    sources, _ = three_sources
    data = DataConfig(sources=sources, seed=2)
    kw = dict(global_batch=4, seq_len=32, worker_count=1)
    with make_iterator(data, TOK, **kw) as it:
        batches(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        tail = batches(it, 4)
    with make_iterator(data, TOK, **kw) as resumed:
        resumed.set_state(state)
        assert_batches_equal(batches(resumed, 4), tail)


def test_resume_refuses_a_different_pipeline(three_sources):
    sources, _ = three_sources
    it = make_iterator(DataConfig(sources=sources), TOK, global_batch=4, seq_len=32)
    it.next()
    state = it.get_state()
    other = make_iterator(DataConfig(sources=sources), TOK, global_batch=4, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        other.set_state(state)
    with pytest.raises(ValueError, match="get_state"):
        other.set_state({"foo": 1})


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path):
    docs = [f"document number {i} " + "z" * (i % 17) for i in range(50)]
    src = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", docs)))
    data = DataConfig(sources=(src,), seed=4)

    def read(index, count):
        it = make_iterator(data, TOK, global_batch=4, seq_len=24, process_index=index,
                           process_count=count, epoch_loop=False)
        out = run_to_end(it)
        for b in out:
            check_batch_format(b, 4 // count, 24)
        complete, partial = reconstruct(out)
        assert partial is None
        return [decode(d) for d in complete]

    p0, p1, single = read(0, 2), read(1, 2), read(0, 1)
    assert len(set(p0)) == len(p0) and len(set(p1)) == len(p1)
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == sorted(single) == sorted(docs)
    assert abs(len(p0) - len(p1)) <= 1
    # Endless streams of the two processes also never share a document.
    it0 = make_iterator(data, TOK, global_batch=4, seq_len=24, process_index=0, process_count=2)
    it1 = make_iterator(data, TOK, global_batch=4, seq_len=24, process_index=1, process_count=2)
    d0 = {decode(d) for d in reconstruct(batches(it0, 30))[0]}
    d1 = {decode(d) for d in reconstruct(batches(it1, 30))[0]}
    assert d0 and d1 and not d0 & d1


def test_each_source_kind_reads_its_documents(three_sources):
    sources, (a, b, c) = three_sources
    for src, docs in zip(sources, (a, b, c)):
        it = make_iterator(DataConfig(sources=(src,)), TOK, global_batch=2, seq_len=128,
                           epoch_loop=False)
        complete, _ = reconstruct(run_to_end(it))
        assert sorted(decode(d) for d in complete) == sorted(docs)


def test_resolve_kind():
    assert resolve_kind(DataSource("a.jsonl")) == "jsonl"
    assert resolve_kind(DataSource("a.JSON")) == "jsonl"
    assert resolve_kind(DataSource("a.parquet")) == "parquet"
    assert resolve_kind(DataSource("a.txt")) == "text"
    assert resolve_kind(DataSource("folder")) == "text"
    assert resolve_kind(DataSource("a.txt", kind="jsonl")) == "jsonl"


def test_jsonl_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\n{"text": "one"}\n\n   \n{"text": "two"}\r\n{"text": "three"}', encoding="utf-8")
    it = make_iterator(DataConfig(sources=(DataSource(str(p)),)), TOK, global_batch=1,
                       seq_len=8, epoch_loop=False)
    complete, _ = reconstruct(run_to_end(it))
    assert sorted(decode(d) for d in complete) == ["one", "three", "two"]


def test_default_corpus_source():
    it = make_iterator(DataConfig(), TOK, global_batch=2, seq_len=64)
    out = batches(it, 2)
    for b in out:
        check_batch_format(b, 2, 64)
        assert (b["segment_ids"] > 0).all()
        assert b["tokens"].min() >= 0 and b["tokens"].max() <= TOK.eos_id
    assert out[0]["tokens"][0, 0] == TOK.bos_id
    assert not np.array_equal(out[0]["tokens"], out[1]["tokens"])


# ------------------------------------------------------------------------------ errors


def make(sources, **kw):
    kw.setdefault("global_batch", 2)
    kw.setdefault("seq_len", 16)
    return make_iterator(DataConfig(sources=tuple(sources)), TOK, **kw)


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*path"):
        make([DataSource(str(missing))])


def test_error_source_without_documents(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*yields no documents.*glob"):
        make([DataSource(str(empty))])
    write_text_folder(tmp_path / "txt", ["a", "b"])
    with pytest.raises(ValueError, match=r"no files match glob '\*\.md'"):
        make([DataSource(str(tmp_path / "txt"), glob="*.md")])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl.*yields no documents"):
        make([DataSource(str(blank))])
    no_rows = write_parquet(tmp_path / "none.parquet", [])
    with pytest.raises(ValueError, match=r"none\.parquet.*yields no documents"):
        make([DataSource(str(no_rows))])


def test_error_unknown_kind(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ["x"])
    with pytest.raises(ValueError, match=r"unknown kind 'csv'.*auto, text, jsonl, parquet"):
        make([DataSource(str(p), kind="csv")])


def test_error_jsonl_first_line_without_field(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", ["a", "b"], field="content")
    with pytest.raises(ValueError, match=r"first\.jsonl:1: .*no field 'text'.*content.*field"):
        make([DataSource(str(first))])
    assert make([DataSource(str(first), field="content")]).next()["tokens"].shape == (2, 16)


def test_error_parquet_without_column(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", ["a", "b"], field="body")
    with pytest.raises(ValueError, match=r"d\.parquet.*no column 'text'.*body"):
        make([DataSource(str(p))])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_error_non_positive_weight(tmp_path, weight):
    p = write_jsonl(tmp_path / "d.jsonl", ["x", "y"])
    with pytest.raises(ValueError, match=r"d\.jsonl.*weight must be a positive number"):
        make([DataSource(str(p)), DataSource(str(p), weight=weight)])


def test_error_batch_not_divisible_and_too_few_documents(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ["only one"])
    with pytest.raises(ValueError, match=r"global_batch=5 is not divisible.*2"):
        make([DataSource(str(p))], global_batch=5, process_count=2, process_index=0)
    with pytest.raises(ValueError, match=r"1 document.*2 processes"):
        make([DataSource(str(p))], global_batch=4, process_count=2, process_index=1)


def test_row_shuffle_spreads_long_documents_and_resumes_exactly(tmp_path):
    # One very long document and many short ones: without the row shuffle the long one
    # fills many consecutive batches.
    (tmp_path / "long.txt").write_text("L" * 4000)
    for i in range(40):
        (tmp_path / f"s{i:02d}.txt").write_text(string.ascii_lowercase[i % 26] * 30)
    src = DataSource(str(tmp_path))
    def longest_run_of_long_rows(shuffle_rows):
        data = config.DataConfig(sources=(src,), seed=0, shuffle_rows=shuffle_rows)
        it = make_iterator(data, TOK, global_batch=2, seq_len=16, prefetch=0)
        batches = [next(it) for _ in range(200)]  # 400 rows: more than one epoch (~330)
        is_long = [bool((b["tokens"][r] == ord("L")).all()) for b in batches for r in range(2)]
        best = run = 0
        for flag in is_long:
            run = run + 1 if flag else 0
            best = max(best, run)
        return best, batches, it, data

    plain, _, _, _ = longest_run_of_long_rows(0)
    shuffled, batches, it, data = longest_run_of_long_rows(512)
    assert plain >= 200 and shuffled < 20, (plain, shuffled)
    for batch in batches:  # packing invariants still hold row by row
        for r in range(2):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            starts = np.r_[True, seg[1:] != seg[:-1]]
            assert (pos[starts] == 0).all() and (pos[~starts] == pos[np.r_[False, ~starts[1:]].nonzero()[0] - 1] + 1).all()
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(30)]  # crosses window boundaries
    again = make_iterator(data, TOK, global_batch=2, seq_len=16, prefetch=0)
    again.set_state(state)
    for a, b in zip(want, (next(again) for _ in range(30))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------ data shards


def test_sharded_batches_open_each_source_once(tmp_path, monkeypatch):
    from llama3_jax.data import ShardedBatches, sources
    src = DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(40)])))
    indexed = []
    real = sources._line_spans
    monkeypatch.setattr(sources, "_line_spans", lambda path, *a: indexed.append(path) or real(path, *a))
    batches_ = ShardedBatches(DataConfig(sources=(src,), shards=8), TOK, global_batch=8, seq_len=16)
    assert len(batches_.iterators) == 8 and indexed == [str(tmp_path / "d.jsonl")]
    check_batch_format(next(batches_), 8, 16)


def test_sharded_batches_resume_exactly_on_another_process_count(three_sources):
    """What data.shards is for: a run saved by one process resumes on two (and back) and
    reads exactly the global batches the uninterrupted run reads."""
    from llama3_jax.data import ShardedBatches
    sources, _ = three_sources
    data = DataConfig(sources=sources, seed=3, shards=4)
    kw = dict(global_batch=8, seq_len=32, prefetch=0)
    one = ShardedBatches(data, TOK, **kw)
    head = [next(one) for _ in range(3)]
    state = json.loads(json.dumps(one.get_state()))  # process 0 of 1 holds every shard
    want = [next(one) for _ in range(4)]

    two = [ShardedBatches(data, TOK, process_index=i, process_count=2, **kw) for i in range(2)]
    for p in two:
        p.set_state(state)
        assert len(p.iterators) == 2  # shards 2i and 2i+1
    got = []
    for _ in range(2):
        parts = [next(p) for p in two]  # rows of process 0, then process 1: the global batch
        got.append({k: np.concatenate([parts[0][k], parts[1][k]]) for k in KEYS})
    assert_batches_equal(got, want[:2])
    merged = {**two[0].get_state(), **two[1].get_state()}  # what gather_state collects
    back = ShardedBatches(data, TOK, **kw)
    back.set_state(json.loads(json.dumps(merged)))
    assert_batches_equal([next(back) for _ in range(2)], want[2:])
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(head, want))


def test_sharded_batches_refuse_a_shard_count_that_does_not_fit(three_sources):
    from llama3_jax.config import ConfigError
    from llama3_jax.data import ShardedBatches
    sources, _ = three_sources
    with pytest.raises(ConfigError, match="data.shards=3 must be a multiple of the 2 process"):
        ShardedBatches(DataConfig(sources=sources, shards=3), TOK, global_batch=6, seq_len=32, process_count=2)


def test_row_shuffle_windows_kept_on_disk_restore_exactly_without_reading_them_again(tmp_path):
    """data.window_cache: a restore takes the shuffle's window from its file (no document of
    it tokenized again) and goes on exactly as an uninterrupted iterator; a spoilt file is
    read around."""
    # ~11 tokens each: a window of 32 rows of 16 tokens holds ~45 documents
    write_text_folder(tmp_path / "docs", [string.ascii_lowercase[i % 26] * (3 + i % 13) for i in range(300)])
    data = config.DataConfig(sources=(DataSource(str(tmp_path / "docs")),), seed=0, shuffle_rows=32)
    cache = tmp_path / "windows"

    class Counting(ByteTokenizer):
        calls = 0

        def encode(self, text, bos=False, eos=False):
            Counting.calls += 1
            return super().encode(text, bos, eos)

    def make(tok=TOK, kept=cache):
        return make_iterator(data, tok, global_batch=2, seq_len=16, window_cache=kept)

    it = make()
    states, want = [], []
    for _ in range(70):  # over four windows of 32 rows
        states.append(json.loads(json.dumps(it.get_state())))
        want.append(next(it))
    it.close()
    time.sleep(0.5)  # the files are written in the background
    assert 1 <= len(list(cache.glob("*.npz"))) <= 2  # the newest windows only
    for at in (0, 40, 53, 66):  # the last two windows (from row 96) are kept: restores there read no window
        Counting.calls = 0
        again = make(Counting())
        again.set_state(states[at])
        got = [next(again)]
        reads = Counting.calls  # the restore's documents
        got += [next(again) for _ in range(69 - at)]
        assert again.get_state() == it.get_state() and again.bad_rows() == it.bad_rows()
        again.close()
        time.sleep(0.5)
        for a, b in zip(want[at:], got):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
                assert a[k].dtype == b[k].dtype
        if at >= 48:
            assert reads < 10, reads
        else:
            assert reads > 40, reads
    for f in cache.glob("*.npz"):
        f.write_bytes(b"spoilt")
    again = make()
    again.set_state(states[53])
    for a in want[53:]:
        b = next(again)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
