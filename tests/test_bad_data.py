"""Bad rows met mid-run: skipped exactly, counted in the iterator state, logged once each.

The oracles read the files directly (which lines or files a reader must reject), and the
token stream is compared with that of the same data with the bad rows removed.
"""

import dataclasses
import functools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import TOK, run_to_end

from llama3_jax import config
from llama3_jax.data import sources
from llama3_jax.config import ConfigError, DataSource
from llama3_jax.data import ShardedBatches, check_bad_rows, make_iterator

DataConfig = functools.partial(config.DataConfig, shuffle_rows=0)


def bad_lines(path, field="text"):
    """1-based numbers of the non-blank lines of a JSONL file that hold no text document."""
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            ok = isinstance(obj, dict) and isinstance(obj.get(field), str)
        except ValueError:  # UnicodeDecodeError included
            ok = False
        if not ok:
            out.append(n)
    return out


def documents_of(batches):
    """The documents in the batches, as sorted token strings (BOS 256 starts each)."""
    tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    return sorted(bytes(d.astype(np.uint8)) for d in np.split(tokens, np.flatnonzero(tokens == 256)[1:]))


def logged_rows(caplog, name):
    msgs = [r.getMessage() for r in caplog.records if r.name == "llama3_jax.data"]
    msgs = [m for m in msgs if "skipped a bad row" in m]
    assert all("\n" not in m for m in msgs)  # one line each, no traceback
    return [m for m in msgs if name in m]


def one_pass(sources, **kw):
    it = make_iterator(DataConfig(sources=tuple(sources)), TOK, global_batch=1, seq_len=16, epoch_loop=False, **kw)
    return run_to_end(it), it.bad_rows()


def write_dirty_jsonl(path, good, rng):
    """`good` documents as JSONL lines, with bad lines of every kind and blank lines between."""
    bad = [b"not json", b'{"body": "no text field"}', b'{"text": 7}', b'{"text": null}', b"[1, 2]",
           b'{"text": "caf\xe9, Latin-1"}', b'{"text": "cut short']
    lines = [json.dumps({"id": i, "text": d}).encode() for i, d in enumerate(good)]
    for b in bad + [b"", b"  \r"]:
        lines.insert(rng.randint(0, len(lines)), b)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("num_threads", [0, 2])
def test_bad_jsonl_lines_are_skipped_exactly_counted_and_logged_once(tmp_path, caplog, num_threads):
    import random
    good = [f"document {i} " * (i % 5 + 1) for i in range(60)]
    dirty = write_dirty_jsonl(tmp_path / "dirty.jsonl", good, random.Random(num_threads))
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": d}) + "\n" for d in good))
    want_bad = bad_lines(dirty)
    assert len(want_bad) == 7
    with caplog.at_level(logging.WARNING, logger="llama3_jax.data"):
        got, counts = one_pass([DataSource(str(dirty))], num_threads=num_threads)
    want, clean_counts = one_pass([DataSource(str(clean))])
    assert documents_of(got) == documents_of(want)  # the same tokens: nothing of a bad line, all of the rest
    n = len(want_bad)
    assert counts == (n, len(good) + n, n) and clean_counts == (0, len(good), 0)
    logged = logged_rows(caplog, "dirty.jsonl:")
    assert sorted(int(m.split("dirty.jsonl:")[1].split(":")[0]) for m in logged) == want_bad
    assert any("not UTF-8" in m for m in logged) and any("not valid JSON" in m for m in logged)
    assert any("no field 'text'" in m for m in logged) and any("is a int" in m for m in logged)


def test_bad_parquet_text_is_skipped_and_a_non_text_column_refused(tmp_path, caplog):
    good = [f"row {i} " * (i % 3 + 1) for i in range(20)]
    raw = [d.encode() for d in good]
    raw.insert(5, b"caf\xe9 latin-1")  # Arrow does not check the bytes of a string column
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()).view(pa.string())}), tmp_path / "dirty.parquet")
    pq.write_table(pa.table({"text": good, "n": list(range(20))}), tmp_path / "clean.parquet")
    with caplog.at_level(logging.WARNING, logger="llama3_jax.data"):
        got, counts = one_pass([DataSource(str(tmp_path / "dirty.parquet"))])
    want, _ = one_pass([DataSource(str(tmp_path / "clean.parquet"))])
    assert documents_of(got) == documents_of(want) and counts == (1, 21, 1)
    assert [m.split(": ")[1] for m in logged_rows(caplog, "dirty.parquet")] == [f"{tmp_path / 'dirty.parquet'}:row 5"]
    with pytest.raises(ConfigError, match=r"clean\.parquet: column 'n' holds int64 values, not text"):
        one_pass([DataSource(str(tmp_path / "clean.parquet"), field="n")])


def test_a_latin1_text_file_is_reported_and_skipped(tmp_path, caplog):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain utf-8 text " * 20)
    (folder / "b.txt").write_bytes("caf\u00e9 na\u00efve ".encode("latin-1") * 20)
    (folder / "c.txt").write_text("caf\u00e9 in utf-8 " * 20)
    undecodable = []
    for p in sorted(folder.iterdir()):
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            undecodable.append(p.name)
    assert undecodable == ["b.txt"]
    with caplog.at_level(logging.WARNING, logger="llama3_jax.data"):
        got, counts = one_pass([DataSource(str(folder))])
    # BOS, the file's bytes, EOS (256 and 257 as uint8: 0 and 1)
    assert documents_of(got) == sorted(b"\0" + (folder / n).read_bytes() + b"\1" for n in ("a.txt", "c.txt"))
    assert counts == (1, 3, 1)
    logged = logged_rows(caplog, "b.txt")
    assert len(logged) == 1 and "not UTF-8" in logged[0]
    from llama3_jax.data import open_sources
    from llama3_jax.data.report import describe_sources, format_report
    opened = open_sources(DataConfig(sources=(DataSource(str(folder)),)))
    report = format_report(describe_sources(opened, TOK, run_tokens=1000))
    assert any("1 of its 3 documents cannot be read and will be skipped" in line and "b.txt" in line
               for line in report)

    # A source of nothing but bad rows is refused, by the report and by the pipeline (which
    # would otherwise skip row after row forever).
    only = tmp_path / "only"
    only.mkdir()
    (only / "b.txt").write_bytes((folder / "b.txt").read_bytes())
    cfg = DataConfig(sources=(DataSource(str(only)),))
    with pytest.raises(ConfigError, match=r"cannot be read: all of its 1 document.*b\.txt: not UTF-8"):
        describe_sources(open_sources(cfg), TOK, run_tokens=1000)
    with pytest.raises(ConfigError, match=r"none of this shard's 1 document\(s\) can be read .*b\.txt"):
        make_iterator(cfg, TOK, global_batch=1, seq_len=16).next()


@pytest.mark.parametrize("kw", [dict(prefetch=0, shards=2), dict(prefetch=2, num_threads=2, shards=2),
                                dict(prefetch=0, worker_count=1, shards=1)], ids=["plain", "threads", "worker"])
def test_bad_row_counts_resume_with_the_iterator(tmp_path, caplog, kw):
    """Counts and batches after a resume equal those of an iterator never interrupted,
    whatever the prefetching; the row shuffle and the mixing of two sources included."""
    import random
    dirty = write_dirty_jsonl(tmp_path / "dirty.jsonl", [f"d{i} " * (i % 4 + 1) for i in range(40)],
                              random.Random(1))
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"text": f"clean {i}"}) + "\n" for i in range(50)))
    kw = dict(kw)
    cfg = DataConfig(sources=(DataSource(str(dirty)), DataSource(str(clean))), shuffle_rows=8, shards=kw.pop("shards"))
    make = functools.partial(ShardedBatches, cfg, TOK, global_batch=8, seq_len=16, **kw)
    with caplog.at_level(logging.WARNING, logger="llama3_jax.data"):
        full = make()
        for _ in range(6):
            next(full)
        state, at_save = json.loads(json.dumps(full.get_state())), full.bad_rows()
        rest, rest_counts = [], []
        for _ in range(20):  # several epochs of the dirty file
            rest.append(next(full))
            rest_counts.append(full.bad_rows())
        resumed = make()
        resumed.set_state(state)
        assert resumed.bad_rows() == at_save and 0 < at_save[0] < at_save[1]
        for want, want_counts in zip(rest, rest_counts):
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
            assert resumed.bad_rows() == want_counts
    bad, _, distinct = rest_counts[-1]
    assert distinct == len(bad_lines(dirty)) and bad > 2 * distinct  # every bad row met, several times over
    assert [c[2] for c in rest_counts] == sorted(c[2] for c in rest_counts)
    if "worker_count" not in kw:  # a worker process logs on its own stderr
        assert len(logged_rows(caplog, "dirty.jsonl:")) == distinct  # once each, however often it is read
    for it in full.iterators + resumed.iterators:
        it.close()


def test_too_many_bad_rows_is_one_line_naming_the_fix():
    cfg = DataConfig(max_bad_row_fraction=0.01)
    assert check_bad_rows(500, 1000, 10, cfg) is None  # ten different bad rows never stop a run
    assert check_bad_rows(20, 2000, 11, cfg) is None  # nor 1% of the reads
    msg = check_bad_rows(21, 2000, 11, cfg)
    assert "21 of the 2000" in msg and "data.max_bad_row_fraction" in msg and "\n" not in msg
    for wrong in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="max_bad_row_fraction"):
            sources.check_data(dataclasses.replace(cfg, max_bad_row_fraction=wrong), global_batch=2)


def test_resume_after_raising_the_limit_and_from_a_state_without_counts(tmp_path):
    """The fix the stop message names (raise data.max_bad_row_fraction) resumes the same
    stream, and so does a state saved before the counts existed (they restart at 0)."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join((json.dumps({"text": f"doc {i}"}) if i % 5 else "{bad") + "\n" for i in range(60)))
    cfg = DataConfig(sources=(DataSource(str(path)),), shuffle_rows=4)
    kw = dict(global_batch=2, seq_len=16, prefetch=0)
    it = ShardedBatches(cfg, TOK, **kw)
    for _ in range(5):
        next(it)
    state, at_save = it.get_state(), it.bad_rows()
    want = [next(it) for _ in range(10)]

    def without_counts(s):
        if isinstance(s, dict):
            return {k: without_counts(v) for k, v in s.items() if not k.startswith("llama3_jax_")}
        return [without_counts(v) for v in s] if isinstance(s, list) else s

    old = without_counts(state)
    assert old != state
    assert at_save[0] > 0
    for cfg2, st, counts in ((dataclasses.replace(cfg, max_bad_row_fraction=0.5), state, at_save),
                             (cfg, old, (0, 0, 0))):
        back = ShardedBatches(cfg2, TOK, **kw)
        back.set_state(st)
        assert back.bad_rows() == counts
        for w in want:
            np.testing.assert_array_equal(next(back)["tokens"], w["tokens"])
