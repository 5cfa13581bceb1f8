"""URL-level dedup and the token-distribution KL filter (llama3_jax.curate) on a planted
corpus: documents that share a URL (with and without dates, in one input file or across
tasks), documents without a URL, exact copies under other URLs, and outliers (prose with a
base64 blob, a long run of one rare word, symbol junk). The pipeline runs once (local
executor, 2 tasks in this process, only these stages and the labels they need); the tests
check it against a plain-Python URL oracle and a NumPy KL computed here."""

import base64
import datetime
import json
import random
import re

import dill
import numpy as np
import pytest
import xxhash
from test_curate import EN, code, math, one_line_error, prose, write_jsonl

from llama3_jax.curate import cli
from llama3_jax.curate import config as cc
from llama3_jax.formats.bpe import default_tokenizer

THRESHOLD = 2.0  # nats; the corpus is small, so an outlier's words are at most log(N / n) from it


def blob(rng):  # URL-safe: with + and /, our domain rules call it math
    return "\n".join(base64.urlsafe_b64encode(rng.randbytes(57)).decode() for _ in range(14))


def rare_run(rng):
    word = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(10))
    return " ".join([word] * 220)


def glyphs(rng):  # (a hex dump would do, but py3langid calls it "zxx": multilingual)
    return " ".join("".join(rng.choice("▓▒░█▄▀■□▪▫◆◇○●◎") for _ in range(rng.randint(3, 9))) for _ in range(200))


def day(rng):
    return datetime.date(2015, 1, 1) + datetime.timedelta(days=rng.randrange(3000))


def planted(seed=0):
    """Three input files of rows (id, text, [url], [date]) and what was planted: `kind` and
    `group` (copies of a URL) per id."""
    rng = random.Random(seed)
    files, info = [[], [], []], {}

    def add(kind, text, f=None, group=None, **meta):
        row = {"id": f"{kind}-{len(info)}", "text": text, **meta}
        files[rng.randrange(3) if f is None else f].append(row)
        info[row["id"]] = {"kind": kind, "group": group, **meta, "text": text}
        return row

    for i in range(150):
        add("normal", prose(rng, EN), url=f"https://example.org/{i}", date=str(day(rng)))
    for i in range(20):
        add("normal", prose(rng, EN))  # no URL: passes
    for i in range(15):
        add("math", math(rng), url=f"https://math.example.org/{i}")
    for i in range(12):
        add("code", code(rng), url=f"https://code.example.org/{i}")
    for g in range(24):  # same URL, other dates (another day each), anywhere in the input
        days = rng.sample(range(3000), rng.choice((2, 3, 4)))
        for k, d in enumerate(days):
            when = datetime.date(2015, 1, 1) + datetime.timedelta(days=d)
            add("url_copy", prose(rng, EN), group=f"dated-{g}", url=f"https://news.example.com/{g}",
                date=f"{when}T{rng.randrange(24):02d}:00:00Z" if k % 2 else str(when))
    for g in range(5):  # one copy without a date (or an unreadable one): a dated copy wins
        f = rng.randrange(3)
        add("url_copy", prose(rng, EN), f, group=f"mixed-{g}", url=f"https://blog.example.com/{g}",
            **({"date": "yesterday"} if g % 2 else {}))
        for _ in range(2):
            add("url_copy", prose(rng, EN), group=f"mixed-{g}", url=f"https://blog.example.com/{g}",
                date=str(day(rng)))
    for g in range(4):  # no dates at all, all in one file (one task): the first is kept
        f = rng.randrange(3)
        for _ in range(3):
            add("url_copy", prose(rng, EN), f, group=f"undated-{g}", url=f"https://wiki.example.com/{g}")
    normals = [r for fs in files for r in fs if info[r["id"]]["kind"] == "normal" and "url" in r]
    for i, r in enumerate(rng.sample(normals, 6)):  # the same text under another URL: exact dedup's
        add("exact_copy", r["text"], url=f"https://mirror.example.net/{i}", date=str(day(rng)))
    for make in (blob, rare_run, glyphs):
        for i in range(6):
            text = "\n".join([prose(rng, EN, 2), make(rng)])
            add("outlier", text, url=f"https://spam.example.com/{make.__name__}/{i}", date=str(day(rng)))
    for fs in files:
        rng.shuffle(fs)
    return files, info


def url_oracle(files, info):
    """The ids URL dedup must remove: of each URL's copies, all but the one with the latest
    date (dates compare as ISO strings by the day; no date is oldest), on a tie the first in
    its file (the planted ties all sit in one file)."""
    position = {r["id"]: (f, i) for f, rows in enumerate(files) for i, r in enumerate(rows)}
    groups = {}
    for i, d in info.items():
        if d.get("url"):
            groups.setdefault(d["url"], []).append(i)
    removed = set()
    for ids in groups.values():
        def when(i):
            date = info[i].get("date", "")
            return date[:10] if re.fullmatch(r"\d{4}-\d\d-\d\d.*", date) else ""
        keep = max(ids, key=lambda i: (when(i), tuple(-x for x in position[i])))
        removed |= set(ids) - {keep}
    return removed, {u: ids for u, ids in groups.items() if len(ids) > 1}


def read_rows(folder):
    rows = {}
    for path in sorted(folder.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["id"]] = dict(row, folder=path.parent.name)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    files, info = planted()
    (root / "in").mkdir()
    for k, rows in enumerate(files):  # three files over two tasks
        write_jsonl(root / "in" / f"part{k}.jsonl", rows)
    cfg = root / "curate.toml"
    off = "".join(f"[{s}]\nenabled = false\n" for s in ("minhash", "line_dedup", "length", "repetition", "symbols",
                                                        "dirty_words"))
    cfg.write_text(f'[input]\npath = "{root / "in"}"\n[output]\npath = "{root / "out"}"\nkeep_removed = true\n'
                   f'[executor]\ntasks = 2\nworkers = 1\n{off}[kl]\nthreshold = {THRESHOLD}\n')
    assert cli.main([str(cfg)]) == 0
    out = root / "out"
    return {"files": files, "info": info, "out": out, "cfg": cfg, "outputs": read_rows(out),
            "removed": read_rows(out / ".curate" / "removed"),
            "report": json.loads((out / "report.json").read_text())}


def test_url_dedup_keeps_the_latest_copy_of_each_url(run):
    info, outputs, removed = run["info"], run["outputs"], run["removed"]
    want, groups = url_oracle(run["files"], info)
    assert len(groups) == 24 + 5 + 4 and len(want) == sum(len(g) - 1 for g in groups.values())
    task = {r["id"]: k % 2 for k, rows in enumerate(run["files"]) for r in rows}  # files[rank::2]
    assert sum(len({task[i] for i in ids}) == 2 for ids in groups.values()) >= 10  # copies in both tasks
    assert {i for i, r in removed.items() if r["folder"] == "url_dedup"} == want
    for url, ids in groups.items():
        kept = [i for i in ids if i not in want]
        assert len(kept) == 1 and kept[0] in outputs, url
        assert outputs[kept[0]]["metadata"]["url_duplicates"] == len(ids) - 1
    no_url = [i for i, d in info.items() if "url" not in d]
    assert len(no_url) == 20 and all(i in outputs for i in no_url)
    stage = {s["stage"]: s for s in run["report"]["stages"]}["url_dedup"]
    assert stage["removed_by"] == {"url_dedup": len(want)}
    assert stage["clusters"] == {"clusters": len(groups), "documents": sum(map(len, groups.values()))}
    assert stage["without_url"] == 20
    assert stage["undated"] == 12 + 5 + 12 + 15  # the undated and mixed groups' copies, math, code


def test_exact_dedup_after_url_dedup_sees_the_same_stream(run):
    info, outputs, removed = run["info"], run["outputs"], run["removed"]
    exact = {i for i, r in removed.items() if r["folder"] == "exact_dedup"}
    assert len(exact) == 6
    for i in exact:  # the other copy of its text (datatrove picks which) is kept
        assert [j for j, d in info.items() if d["text"] == info[i]["text"] and j != i and j in outputs], i
    texts = [o["text"] for o in outputs.values()] + [r["text"] for r in removed.values() if r["folder"] == "kl"]
    assert len(texts) == len(set(texts))


def units(text):
    """The KL filter's words, computed here: \\w+ or symbol runs, lower-cased, in 16-character
    pieces, xxhash64 into 2^20 buckets."""
    return [xxhash.xxh64_intdigest(w[i:i + 16]) % (1 << 20)
            for w in re.findall(r"\w+|[^\w\s]+", text.lower()) for i in range(0, len(w), 16)]


def kl_oracle(docs, alpha=1.0):
    """{id: KL(doc || its category's corpus)} with NumPy, over the documents that reached the
    filter (each category's corpus is its documents)."""
    counts = {d: np.bincount(np.concatenate([units(t) for _, t, c in docs if c == d]), minlength=1 << 20)
              for d in {c for _, _, c in docs}}
    out = {}
    for i, text, d in docs:
        c = np.bincount(units(text), minlength=1 << 20)
        C = counts[d]
        q = (C + alpha) / (C.sum() + alpha * (np.count_nonzero(C) + 1))
        m = c > 0
        p = c[m] / c.sum()
        out[i] = float(np.sum(p * np.log(p / q[m])))
    return out


def test_kl_scores_match_numpy_and_remove_the_outliers(run):
    info, outputs, removed, report = run["info"], run["outputs"], run["removed"], run["report"]
    by_kl = {i: r for i, r in removed.items() if r["folder"] == "kl"}
    scored = {**{i: o for i, o in outputs.items() if o["metadata"]["domain"] in ("general", "math")}, **by_kl}
    assert all("kl" not in o["metadata"] for o in outputs.values() if o["metadata"]["domain"] == "code")
    want = kl_oracle([(i, o["text"], o["metadata"]["domain"]) for i, o in scored.items()])
    assert set(want) == set(scored) and len(want) > 200
    for i, o in scored.items():
        assert o["metadata"]["kl"] == pytest.approx(want[i], abs=1e-4), i
    outliers = [i for i, d in info.items() if d["kind"] == "outlier"]
    assert len(outliers) == 18 and all(i in by_kl for i in outliers)
    assert {i for i in by_kl} == {i for i in scored if want[i] > THRESHOLD}
    normal = [i for i in scored if info[i]["kind"] != "outlier"]
    assert sum(i in by_kl for i in normal) <= 0.02 * len(normal)
    stage = {s["stage"]: s for s in report["stages"]}["kl"]
    assert stage["removed_by"] == {"kl_divergence": len(by_kl)}
    summary = stage["kl"]
    assert summary["threshold"] == THRESHOLD and summary["unit"] == "words"
    for d, s in summary["by_domain"].items():
        x = np.array([want[i] for i, o in scored.items() if o["metadata"]["domain"] == d])
        assert s["docs"] == len(x) and s["removed"] == int((x > THRESHOLD).sum())
        assert s["max"] == pytest.approx(x.max(), abs=1e-4)
        for q, v in s["quantiles"].items():  # histogram bins of 0.01 nats: the bin's upper edge
            assert 0 <= v - np.quantile(x, float(q), method="inverted_cdf") <= 0.0101, (d, q)
    assert set(summary["by_domain"]) == {"general", "math"}


def test_the_report_adds_up(run):
    report, info = run["report"], run["info"]
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["read", "url_dedup", "exact_dedup", "domain", "language", "kl", "output"]
    for s in stages:
        assert s["docs_in"] == s["docs_out"] + s["docs_removed"] == s["docs_out"] + sum(s["removed_by"].values())
        assert s["tokens_in"] == s["tokens_out"] + s["tokens_removed"]
    for a, b in zip(stages, stages[1:]):
        assert (b["docs_in"], b["tokens_in"]) == (a["docs_out"], a["tokens_out"]), b["stage"]
    assert stages[0]["docs_in"] == len(info) and stages[-1]["docs_out"] == len(run["outputs"])
    assert set(report["disabled"]) == {"minhash_dedup", "line_dedup", "length", "repetition", "symbols",
                                       "dirty_words", "quality"}


def test_kl_on_tokens_by_the_steps_alone(tmp_path):
    from datatrove.data import Document

    from llama3_jax.curate.kl import KLCount, KLFilter, KLMerge, Units
    from llama3_jax.curate.steps import TokenCounter
    tok = default_tokenizer(2048)
    rng = random.Random(3)
    tasks = [[prose(rng, EN) for _ in range(12)] + ["\n".join([prose(rng, EN, 1), blob(rng)])] for _ in range(2)]
    tasks[1].append(code(rng))  # code: not counted, not scored
    labels = [["general"] * 13, ["general"] * 13 + ["code"]]
    u = Units("tokens", TokenCounter(tok.path))
    for rank, task in enumerate(tasks):
        docs = [Document(text=t, id=f"{rank}-{i}", metadata={"domain": d})
                for i, (t, d) in enumerate(zip(task, labels[rank]))]
        assert len(list(KLCount(str(tmp_path), u, ["general"])(docs, rank, 2))) == len(task)
    list(KLMerge(str(tmp_path))(None, 0, 1))
    f = dill.loads(dill.dumps(KLFilter(str(tmp_path), u, 0.0, 0.5, ["general"])))  # as Slurm or Ray ships it
    general = [t for task in tasks for t in task[:13]]
    C = np.bincount(np.concatenate([tok.encode(t) for t in general]))
    q = (C + 0.5) / (C.sum() + 0.5 * (np.count_nonzero(C) + 1))
    for t in general:
        c = np.bincount(tok.encode(t), minlength=len(C))
        p = c[c > 0] / c.sum()
        doc = Document(text=t, id="x", metadata={"domain": "general"})
        assert f.filter(doc) is True  # threshold 0: scores only
        assert doc.metadata["kl"] == pytest.approx(float(np.sum(p * np.log(p / q[c > 0]))), abs=1e-4)
    doc = Document(text=tasks[1][-1], id="c", metadata={"domain": "code"})
    assert f.filter(doc) is True and "kl" not in doc.metadata


def test_dates_become_datatrove_priorities():
    from datatrove.data import Document

    from llama3_jax.curate.urls import Recency, UrlOf, as_date
    assert as_date("2024-02-29T23:59:59Z") == as_date("2024-02-29") == datetime.date(2024, 2, 29)
    assert as_date(datetime.datetime(2020, 1, 2, 3)) == datetime.date(2020, 1, 2)
    assert as_date("02/03/2024") is None and as_date(20240101) is None and as_date(None) is None
    r = Recency("date")

    def p(v):
        return r(Document(text="", id="", metadata={"date": v}))
    assert p("1969-12-31") == 2 < p("1970-01-02") < p("2024-01-01") < p("2024-01-02") < p("2149-06-01")
    assert p("2149-06-01") < p("2150-01-01") == 65535
    assert p("2024-01-01T00:00:00Z") == p("2024-01-01T23:00:00Z") and p("soon") == 1
    assert Recency("")(Document(text="", id="", metadata={"date": "2024-01-01"})) == 1
    assert UrlOf("url")(Document(text="", id="", metadata={})) == ""


def test_stages_switch_off_and_ship_to_other_executors(run, tmp_path):
    from llama3_jax.curate.pipeline import build_jobs, executors
    tok = str(default_tokenizer(2048).path)

    def names(*overrides):
        cfg = cc.load(str(run["cfg"]), [f"output.path={tmp_path / 'out'}", *overrides])
        return [n for n, _, _ in build_jobs(cfg, "in", "inputs.txt", tok)]
    assert names() == ["url-signature", "url-find", "exact-signature", "exact-find", "p2", "kl-merge", "final",
                       "report"]
    assert names("url_dedup.enabled=false", "kl.enabled=false") == ["exact-signature", "exact-find", "final", "report"]
    slurm = cc.load(str(run["cfg"]), [f"output.path={tmp_path / 'out'}", 'executor.kind="slurm"', "executor.tasks=8",
                                     'executor.slurm.partition="cpu"'])
    chain = executors(slurm, build_jobs(slurm, "in", "inputs.txt", tok))
    assert chain[0].job_name == "curate-url-signature"
    assert dill.loads(dill.dumps(chain[-1])).depends.job_name == "curate-final"  # what each Slurm job loads


def test_bad_settings_are_one_line_errors(run, capsys):
    cfg = str(run["cfg"])
    assert "valid keys in [kl]" in one_line_error(capsys, [cfg, "kl.treshold=3"])
    assert "kl.unit = 'bytes'; use one of words, tokens" in one_line_error(capsys, [cfg, 'kl.unit="bytes"'])
    assert "kl: threshold must be >= 0" in one_line_error(capsys, [cfg, "kl.threshold=-1"])
    assert "smoothing > 0" in one_line_error(capsys, [cfg, "kl.smoothing=0"])
    assert "kl.domains entry" in one_line_error(capsys, [cfg, 'kl.domains=["prose"]'])
    assert "url_dedup.key is empty" in one_line_error(capsys, [cfg, 'url_dedup.key=""'])
    assert "valid keys in [url_dedup]" in one_line_error(capsys, [cfg, 'url_dedup.date="x"'])
