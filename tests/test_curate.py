"""Data curation (llama3_jax.curate) on a planted corpus: exact copies, near-duplicates at a
known shingle Jaccard above and below the MinHash threshold, boilerplate lines, junk of
every kind the filters target, four kept languages and one that is not, code and math.
The pipeline runs once (a module fixture, local executor, 2 tasks in this process); the
tests check it against what was planted, with true Jaccards and token counts computed here."""

import json
import pathlib
import random
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from datatrove.utils.text import simplify_text

from llama3_jax.config import load_config
from llama3_jax.curate import cli, quality
from llama3_jax.curate import config as cc
from llama3_jax.curate.pipeline import read_words
from llama3_jax.data.sources import document_source
from llama3_jax.formats.bpe import default_tokenizer

EN = """the of and to in is that for it with as was on be by this are from at or have an they which one you
were all we her she there would their will when who him been has more if no out so what up can about time people
year way day man thing woman life child world school state family student group country problem hand part place
case week company system program question work government number night point home water room mother area money
story fact month lot right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change morning reason research
girl guy moment air teacher force education river garden music village winter summer letter road table window""".split()
FR = """le la les de des un une et est dans pour que qui sur avec pas plus par nous vous ils elle mais comme tout
faire bien être avoir maison temps jour monde vie homme femme enfant ville pays travail année toujours aussi encore
très petit grand nouveau premier dernier jardin école rivière livre histoire musique village soleil matin soir
semaine mois gouvernement entreprise famille ami père mère eau route fenêtre chemin pourquoi""".split()
DE = """der die das und ist nicht mit zu den von sie ein eine auch auf für sich dem des im es wir ihr aber noch nach
bei aus wie oder wenn nur schon sehr immer Haus Zeit Jahr Mensch Kind Stadt Land Arbeit Welt Leben Schule Familie
Freund Vater Mutter Wasser Straße Fenster Garten Buch Geschichte Musik Dorf Sonne Morgen Abend Woche Monat Regierung
Unternehmen groß klein neu alt gut schön heute gestern""".split()
ES = """el la los las de y que en un una es por con para no se su al lo como más pero sus le ya o este sí porque
esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos uno casa tiempo año
día hombre mujer niño ciudad país trabajo mundo vida escuela familia amigo padre madre agua calle ventana jardín
libro historia música pueblo sol mañana noche semana mes gobierno empresa""".split()
IT = """il lo la gli le di che è e un una per non sono della delle questo anche come con nel nella più molto sempre
ancora quando dove perché casa tempo anno giorno uomo donna bambino città paese lavoro mondo vita scuola famiglia
amico padre madre acqua strada finestra giardino libro storia musica villaggio sole mattina sera settimana mese
governo azienda grande piccolo nuovo vecchio bello oggi ieri""".split()
SPAM = """buy cheap deal free offer discount click best price shipping online sale order now win bonus casino loan
credit cash prize limited exclusive guaranteed amazing pills replica outlet coupon promo bargain lowest instant
approved""".split()
NAMES = [a + b for a in "user order item price count total index buffer node value result config cache path name "
         "score limit offset size queue".split() for b in ("", "_list", "_map", "_id", "_count", "_sum", "_value")]
STOP = ["the", "be", "to", "of", "and", "that", "have", "with"]
BOILERPLATE = ["Subscribe to our newsletter to get the weekly digest in your inbox.",
               "All rights reserved by the publisher and its partners worldwide."]
SEVEN = "Share this story with your friends on social media today."  # in 7 documents: removed
SIX = "Posted in the community section of the city website yesterday."  # in 6: kept


def sentence(rng, words, lo=8, hi=14):
    w = [rng.choice(words) for _ in range(rng.randint(lo, hi))]
    return w[0][0].upper() + w[0][1:] + " " + " ".join(w[1:]) + "."


def prose(rng, words, paragraphs=4):
    return "\n".join(" ".join(sentence(rng, words) for _ in range(rng.randint(4, 6))) for _ in range(paragraphs))


def code(rng):
    funcs = []
    for _ in range(rng.randint(3, 5)):
        a, b, c, d = rng.sample(NAMES, 4)
        body = []
        for _ in range(rng.randint(4, 7)):
            x, y, z = rng.sample(NAMES, 3)
            body.append(rng.choice([f"    {x} = {y} + {rng.randint(1, 99)}",
                                    f"    for {x} in {y}:\n        {z}.append({x} * {rng.randint(2, 9)})",
                                    f"    if {x} > {y}:\n        return {z}",
                                    f"    {x} = [{y} for {y} in {z} if {y}]",
                                    f"    {x}[{y}] = {z}.get({y}, {rng.randint(0, 9)})",
                                    f"    while {x} < {y}:\n        {x} += {rng.randint(1, 5)}"]))
        funcs.append(f"def {a}({b}, {c}):\n" + "\n".join(body) + f"\n    return {d}\n")
    return "\n".join(funcs)


def math(rng):
    parts = []
    for _ in range(rng.randint(8, 11)):
        x, y = rng.sample("abcdefghkmnpqrstuvwxyz", 2)
        n, m, k = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
        parts.append(rng.choice([
            f"Let {x} = {n} and {y} = {m}{x} + {k}, so {y} = {m * n + k}.",
            f"The derivative of f({x}) = {x}^{n} + {k}{x} is {n}{x}^{n - 1} + {k}.",
            f"By the theorem, the integral of {x}^{n} over [0, {m}] equals {m}^{n + 1}/{n + 1}.",
            f"Solve {n}{x} + {k} = {n * m + k} for {x}: the solution is {x} = {m}.",
            f"The polynomial {x}^2 - {n + m}{x} + {n * m} has the integer roots {n} and {m}.",
            f"Hence $\\frac{{{x}}}{{{n}}} + {y} \\leq {k}$ holds for every prime {y} > {m}.",
            f"A matrix with eigenvalue {n} satisfies the equation A{x} = {n}{x} for the vector {x}.",
            f"The probability that {x} is divisible by {n} is 1/{n}, a fraction of the integers."]))
        parts.append(sentence(rng, EN, 6, 10))
    return "\n".join(" ".join(parts[i:i + 4]) for i in range(0, len(parts), 4))


def soup(rng):  # words among symbol runs: the symbol rules' business
    return "\n".join(" ".join(rng.choice(EN) + " " + "".join(rng.choice("#@%~&!|") for _ in range(rng.randint(2, 4)))
                              for _ in range(30)) for _ in range(4))


def spam(rng):  # half advertising words, and the stop words that let it through the symbol rules
    pick = (lambda r: rng.choice(SPAM) if r < 0.5 else rng.choice(STOP) if r < 0.65 else rng.choice(EN))
    return "\n".join(" ".join(pick(rng.random()) for _ in range(50)) + "." for _ in range(4))


def dirty(rng):
    words = read_words("")
    paras = []
    for _ in range(4):
        s = [rng.choice(EN) for _ in range(50)]
        for i in rng.sample(range(50), 2):
            s[i] = rng.choice(words)
        paras.append(" ".join(s) + ".")
    return "\n".join(paras)


def near_copy(rng, text, edits):
    """`text` with `edits` words replaced, far enough apart that each changes its own 5 shingles."""
    words = text.split(" ")
    for i in rng.sample(range(6, len(words) - 6, 12), edits):
        words[i] = rng.choice([w for w in EN if w != words[i]])
    return " ".join(words)


def shingles(text, n=5):  # the shingles datatrove's MinHash hashes: normalised text, word 5-grams
    words = re.findall(r"\w+|[^\w\s]+", simplify_text(text))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def planted_corpus(seed=0):
    """Documents as dicts: id, text, kind, group (its copies share it), lang, domain."""
    rng = random.Random(seed)
    docs = []

    def add(kind, text, lang="en", domain="general", group=None):
        docs.append({"id": f"{kind}-{len(docs)}", "text": text, "kind": kind, "lang": lang, "domain": domain,
                     "group": group if group is not None else len(docs)})
        return docs[-1]

    general = [add("distinct", prose(rng, EN)) for _ in range(100)]
    multi = [add("distinct", prose(rng, words), lang, "multilingual")
             for lang, words in (("fr", FR), ("de", DE), ("es", ES)) for _ in range(15)]
    others = [add("distinct", code(rng), "en", "code") for _ in range(15)]
    others += [add("distinct", math(rng), "en", "math") for _ in range(15)]
    for d in general[:8] + multi[:4] + others[:4] + others[15:19]:  # 20 exact copies, 5 of them twice
        for _ in range(1 + (d in general[:5])):
            add("exact", d["text"], d["lang"], d["domain"], d["group"])
    for d in general[10:25] + multi[5:15]:  # 25 near-duplicates above the threshold
        add("near", near_copy(rng, d["text"], rng.choice((2, 3))), d["lang"], d["domain"], d["group"])
    for d in general[25:45]:  # 20 distinct documents that share half their text with another
        half = d["text"].split("\n")[:2] + [prose(rng, EN, 1), prose(rng, EN, 1)]
        add("below", "\n".join(half))["source"] = d["group"]
    carriers = general[45:]
    for line, n in [(BOILERPLATE[0], 12), (BOILERPLATE[1], 10), (SEVEN, 7), (SIX, 6)]:
        for d in rng.sample(carriers, n):
            lines = d["text"].split("\n")
            lines.insert(rng.choice((0, len(lines))), line)
            d["text"] = "\n".join(lines)
    for kind, make, n in [("soup", soup, 6), ("spam", spam, 6), ("dirty", dirty, 6)]:
        for _ in range(n):
            add(kind, make(rng))
    for _ in range(6):
        add("repeated", "\n".join([prose(rng, EN, 1)] + [sentence(rng, EN)] * 15 + [prose(rng, EN, 1)]))
        add("short", " ".join(rng.choice(EN) for _ in range(25)) + ".")
        add("foreign", prose(rng, IT), "it", "multilingual")
    rng.shuffle(docs)
    return docs


JUNK = {"soup": "symbols", "spam": "quality", "dirty": "dirty_words", "repeated": "repetition", "short": "length",
        "foreign": "language"}
DISTINCT = ("distinct", "below")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    docs = planted_corpus()
    (root / "in").mkdir()
    for i in range(3):  # three files over two tasks
        write_jsonl(root / "in" / f"part{i}.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs[i::3]])
    rng = random.Random(1)
    write_jsonl(root / "pos.jsonl", [{"text": prose(rng, EN)} for _ in range(120)])
    write_jsonl(root / "neg.jsonl", [{"text": spam(rng)} for _ in range(120)])
    assert cli.main(["train-quality", "--positives", str(root / "pos.jsonl"), "--negatives", str(root / "neg.jsonl"),
                     "--out", str(root / "quality.npz")]) == 0
    cfg = root / "curate.toml"
    cfg.write_text(f'[input]\npath = "{root / "in"}"\n[output]\npath = "{root / "out"}"\n'
                   f'[executor]\ntasks = 2\nworkers = 1\n[language]\nkeep = ["en", "fr", "de", "es"]\n'
                   f'[quality]\nenabled = true\nmodel = "{root / "quality.npz"}"\nthreshold = 0.5\n')
    assert cli.main([str(cfg)]) == 0
    out = root / "out"
    outputs = {}
    for path in sorted(out.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            outputs[row["id"]] = dict(row, folder=path.parent.name)
    return {"root": root, "docs": docs, "cfg": cfg, "out": out, "outputs": outputs,
            "report": json.loads((out / "report.json").read_text())}


def test_the_planted_corpus_is_what_it_claims(curated):
    docs = curated["docs"]
    by_group = {d["group"]: d for d in docs if d["kind"] == "distinct"}
    near = [jaccard(by_group[d["group"]]["text"], d["text"]) for d in docs if d["kind"] == "near"]
    below = [jaccard(by_group[d["source"]]["text"], d["text"]) for d in docs if d["kind"] == "below"]
    b, r = cc.bands_rows(0.72, 112)
    assert (b, r) == (14, 8)
    assert min(near) > 0.84 and 0.25 < min(below) and max(below) < 0.5, (min(near), min(below), max(below))
    assert all(cc.candidate_probability(s, b, r) > 0.98 for s in near)
    assert all(cc.candidate_probability(s, b, r) < 0.06 for s in below)
    distinct = [d for d in docs if d["kind"] in DISTINCT]
    sets = [shingles(d["text"]) for d in distinct]
    planted = {frozenset((d["group"], d["source"])) for d in distinct if d["kind"] == "below"}
    worst = max(len(a & c) / len(a | c) for i, a in enumerate(sets) for j, c in enumerate(sets[:i])
                if frozenset((distinct[i]["group"], distinct[j]["group"])) not in planted)
    assert worst < 0.2, worst  # LSH finds a pair at 0.2 with probability 3.6e-5


def test_dedup_removes_the_planted_duplicates_and_keeps_distinct_documents(curated):
    docs, outputs = curated["docs"], curated["outputs"]
    groups = {}
    for d in docs:
        if d["kind"] in DISTINCT + ("exact", "near"):
            groups.setdefault(d["group"], []).append(d)
    copies = sum(len(g) - 1 for g in groups.values())
    survivors = {k: sum(d["id"] in outputs for d in g) for k, g in groups.items()}
    removed_copies = sum(len(g) - max(survivors[k], 1) for k, g in groups.items())
    assert copies == 50 and removed_copies >= 0.95 * copies, removed_copies
    distinct = [d for d in docs if d["kind"] in DISTINCT]
    lost = [d["id"] for d in distinct if survivors[d["group"]] == 0]
    assert len(lost) <= 0.02 * len(distinct), lost
    report = {s["stage"]: s for s in curated["report"]["stages"]}
    assert report["exact_dedup"]["docs_removed"] == sum(d["kind"] == "exact" for d in docs)
    assert report["exact_dedup"]["clusters"] == {"clusters": 20, "documents": 45}
    assert report["minhash_dedup"]["clusters"]["clusters"] >= 0.95 * 25


def test_each_filter_removes_its_planted_junk(curated):
    docs, outputs, report = curated["docs"], curated["outputs"], curated["report"]
    removed = {s["stage"]: s["removed_by"] for s in report["stages"]}
    for kind, stage in JUNK.items():
        planted = [d["id"] for d in docs if d["kind"] == kind]
        assert not [i for i in planted if i in outputs], kind
        assert sum(removed[stage].values()) == len(planted), (stage, removed[stage])
    assert removed["language"] == {"other_language": 6}
    assert removed["quality"] == {"low_quality": 6}
    assert set(removed["symbols"]) <= {"gopher_too_many_hashes", "gopher_below_alpha_threshold"}


def test_line_dedup_removes_lines_in_more_than_six_documents(curated):
    texts = [o["text"] for o in curated["outputs"].values()]
    for line in BOILERPLATE + [SEVEN]:
        assert not any(line in t for t in texts), line
    assert sum(SIX in t for t in texts) == 6
    line_stage = next(s for s in curated["report"]["stages"] if s["stage"] == "line_dedup")
    assert line_stage["lines_removed"] == 12 + 10 + 7 and line_stage["repeated_lines"] == 3
    assert line_stage["docs_removed"] == 0 and line_stage["tokens_removed"] > 0


def test_labels_are_right_and_shards_sit_in_their_category(curated):
    docs = {d["id"]: d for d in curated["docs"]}
    outputs = curated["outputs"]
    assert outputs
    for i, o in outputs.items():
        assert o["metadata"]["domain"] == docs[i]["domain"] == o["folder"], i
        assert o["metadata"]["language"] == docs[i]["lang"], i
    assert {o["folder"] for o in outputs.values()} == set(cc.DOMAINS)
    assert all("quality" in o["metadata"] for o in outputs.values() if o["folder"] == "general")


def test_the_report_adds_up_to_counts_made_here(curated):
    report, docs, outputs = curated["report"], curated["docs"], curated["outputs"]
    tok = default_tokenizer(2048)
    stages = report["stages"]
    assert [s["stage"] for s in stages] == ["read", "url_dedup", "exact_dedup", "minhash_dedup", "domain", "language",
                                            "line_dedup", "length", "repetition", "symbols", "dirty_words", "kl",
                                            "quality", "output"]
    for s in stages:
        assert s["docs_in"] == s["docs_out"] + s["docs_removed"] == s["docs_out"] + sum(s["removed_by"].values())
        assert s["tokens_in"] == s["tokens_out"] + s["tokens_removed"] and s["seconds"] >= 0
    for a, b in zip(stages, stages[1:]):
        assert (b["docs_in"], b["tokens_in"]) == (a["docs_out"], a["tokens_out"]), b["stage"]
    assert stages[0]["docs_in"] == len(docs)
    assert stages[0]["tokens_in"] == sum(len(tok.encode(d["text"])) for d in docs)
    assert stages[-1]["docs_out"] == len(outputs) == sum(v["docs"] for v in report["output"].values())
    recount = [len(tok.encode(o["text"])) for o in outputs.values()]
    assert recount == [o["metadata"]["token_count"] for o in outputs.values()]
    assert stages[-1]["tokens_out"] == sum(recount) == sum(v["tokens"] for v in report["output"].values())
    for cat, v in report["output"].items():
        assert v["docs"] == sum(o["folder"] == cat for o in outputs.values())
        assert v["files"] and all(f.startswith(f"{cat}/") and f.endswith(".jsonl") for f in v["files"])
    assert report["minhash"]["bands"] == 14 and report["minhash"]["rows"] == 8


def test_the_quality_scorer_separates_held_out_text(curated):
    model = quality.load(curated["root"] / "quality.npz")
    rng = random.Random(7)
    pos = [prose(rng, EN) for _ in range(40)]
    neg = [spam(rng) for _ in range(40)]
    s = quality.scores(model, pos + neg)
    # AUC: the chance that a positive outscores a negative
    auc = np.mean(s[:40, None] > s[None, 40:])
    assert auc > 0.98 and np.mean(s[:40] > 0.5) > 0.9 and np.mean(s[40:] < 0.5) > 0.9


def test_mix_writes_sources_that_load_and_read_the_shards(curated, tmp_path, capsys):
    out, report = curated["out"], curated["report"]
    dest = tmp_path / "mix.toml"
    assert cli.main(["mix", str(out), "--target", "general=50,math=25,code=17,multilingual=8", "--out", str(dest)]) == 0
    cfg = load_config(str(dest))
    got = {s.path: s for s in cfg.data.sources}
    want = {"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08}
    assert set(got) == {str(out / c) for c in want}
    for cat, weight in want.items():
        src = got[str(out / cat)]
        assert src.weight == pytest.approx(weight) and src.kind == "jsonl" and src.glob == "*.jsonl"
        docs = document_source(src)
        assert len(docs) == report["output"][cat]["docs"]
        assert {docs[i] for i in range(len(docs))} == {o["text"] for o in curated["outputs"].values()
                                                          if o["folder"] == cat}
    only_general = tmp_path / "one"
    (only_general / "general").mkdir(parents=True)
    (only_general / "general" / "00000.jsonl").write_text('{"text": "hello"}\n')
    capsys.readouterr()
    assert cli.main(["mix", str(only_general), "--target", "general=1,math=1,code=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no shards for math, code")


def test_resuming_a_finished_run_recomputes_nothing(curated):
    before = {p: p.stat().st_mtime_ns for p in curated["out"].rglob("*.jsonl")}
    assert cli.main([str(curated["cfg"]), "executor.workers=2"]) == 0  # executor settings may change
    assert {p: p.stat().st_mtime_ns for p in curated["out"].rglob("*.jsonl")} == before


def one_line_error(capsys, argv):
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return captured.err


def test_bad_input_is_one_line_before_anything_is_touched(curated, tmp_path, capsys, monkeypatch):
    cfg, out = curated["cfg"], curated["out"]
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert "config nope.toml does not exist" in one_line_error(capsys, ["nope.toml"])
    assert "valid keys in [minhash]: enabled, threshold" in one_line_error(capsys, [str(cfg), "minhash.treshold=0.8"])
    assert "unknown section(s) minhash_dedup" in one_line_error(capsys, [str(cfg), "minhash_dedup.enabled=false"])
    assert "minhash.threshold: 0.72 -> 0.8" in one_line_error(capsys, [str(cfg), "minhash.threshold=0.8"])
    assert "executor.tasks: 2 -> 3" in one_line_error(capsys, [str(cfg), "executor.tasks=3"])  # files are per task
    assert "does not exist" in one_line_error(capsys, [str(cfg), f"input.path={tmp_path / 'missing'}"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "not a curation output" in one_line_error(capsys, [str(cfg), f"output.path={mine}"])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert "train-quality" in one_line_error(capsys, [str(cfg), "quality.model="])
    assert "unknown to py3langid" in one_line_error(capsys, [str(cfg), 'language.keep=["en", "xx"]'])
    assert "needs Ray: pip install" in one_line_error(capsys, [str(cfg), 'executor.kind="ray"', "executor.tasks=4"])
    assert "needs sbatch on PATH" in one_line_error(capsys, [str(cfg), 'executor.kind="slurm"', "executor.tasks=4",
                                                             'executor.slurm.partition="cpu"'])
    assert "executor.slurm.partition is not set" in one_line_error(capsys, [str(cfg), 'executor.kind="slurm"',
                                                                            "executor.tasks=4"])
    monkeypatch.setitem(sys.modules, "datatrove", None)
    assert "pip install '.[curate]'" in one_line_error(capsys, [str(cfg)])
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_the_command_line_entry_point_reports_bad_input_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "llama3_jax.curate", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: config "), p.stderr


def test_slurm_and_ray_executors_are_built_from_the_config(curated, tmp_path):
    import dill
    from datatrove.executor import RayPipelineExecutor, SlurmPipelineExecutor

    from llama3_jax.curate.pipeline import build_jobs, executors
    base = cc.load(str(curated["cfg"]), [f"output.path={tmp_path / 'out'}"])
    jobs = build_jobs(base, str(curated["root"] / "in"), "inputs.txt", str(default_tokenizer(2048).path))
    slurm = cc.load(str(curated["cfg"]), [f"output.path={tmp_path / 'out'}", 'executor.kind="slurm"',
                                         "executor.tasks=64", 'executor.slurm.partition="cpu"',
                                         'executor.slurm.sbatch_args=["account=me"]'])
    chain = executors(slurm, build_jobs(slurm, str(curated["root"] / "in"), "inputs.txt", "tok.model"))
    assert len(chain) == len(jobs) and all(isinstance(e, SlurmPipelineExecutor) for e in chain)
    assert [e.depends for e in chain[1:]] == chain[:-1]
    assert {e.tasks for e in chain} == {64, 1, 14} and chain[2].job_name == "curate-exact-signature"
    script = chain[-1].get_launch_file_contents(chain[-1].get_sbatch_args(), "launch_pickled_pipeline x")
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --account=me" in script
    assert dill.loads(dill.dumps(chain[-1])).depends.job_name == "curate-final"  # what each Slurm job loads
    ray = cc.load(str(curated["cfg"]), [f"output.path={tmp_path / 'out'}", 'executor.kind="ray"', "executor.tasks=32",
                                       "executor.ray.cpus_per_task=2"])
    chain = executors(ray, build_jobs(ray, str(curated["root"] / "in"), "inputs.txt", "tok.model"))
    assert all(isinstance(e, RayPipelineExecutor) and e.cpus_per_task == 2 for e in chain)
    assert chain[-1].depends is chain[-2] and chain[0].tasks == 32


def test_line_buckets_count_within_their_bucket_only(tmp_path):
    from datatrove.data import Document

    from llama3_jax.curate.lines import LineCount, LineFilter, LineMerge
    from llama3_jax.curate.steps import TokenCounter
    folder, counter = str(tmp_path), TokenCounter(default_tokenizer(2048).path)
    # 8 documents over two tasks, buckets of 4: "shared" is in 3 documents of the first bucket
    # (removed at max_repeats=2) and in 2 + 2 of the two buckets in "spread" (kept).
    texts = [["a\nshared\nspread", "b\nshared", "c\nshared\nspread", "d"],
             ["e\nspread", "f\nspread", "g", "h"]]
    tagged = []
    for rank, task in enumerate(texts):
        docs = [Document(text=t, id=f"{rank}-{i}") for i, t in enumerate(task)]
        tagged.append(list(LineCount(folder, 2, ["general"])(docs, rank, 2)))
    for shard in range(2):
        list(LineMerge(folder, 4, 2)(None, shard, 2))
    f = LineFilter(folder, 4, counter)
    kept = [d.text for task in tagged for d in task if f.filter(d) is True]
    assert kept == ["a\nspread", "b", "c\nspread", "d", "e\nspread", "f\nspread", "g", "h"]


def test_the_example_config_shows_every_key_with_its_default():
    example = pathlib.Path(cli.__file__).with_name("example.toml")
    raw = tomllib.loads(example.read_text())
    plain = json.loads(json.dumps(cc.to_dict(cc.CurateConfig())))  # tuples as lists, like TOML's arrays
    for section in plain:
        plain[section].pop("path", None)
        raw[section].pop("path", None)
    assert raw == plain
    assert cc.load(str(example), []).input.path == "data/raw"


def test_the_benchmark_runs_and_reports_every_stage():
    p = subprocess.run([sys.executable, str(pathlib.Path(__file__).parents[1] / "benchmarks" / "curate.py"),
                        "--mb", "0.1", "--tasks", "1", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0] for line in p.stdout.splitlines() if line and line.split()[0].isidentifier()}
    assert {"read", "exact_dedup", "minhash_dedup", "line_dedup", "quality", "output", "files"} <= rows, p.stdout
    assert "whole run:" in p.stdout and "MB/s per core" in p.stdout


def test_train_py_reads_the_generated_mix_in_its_proportions(curated, tmp_path):
    """The curated shards and the mix helper's TOML, straight into train.py: over 200 batches
    the rows read from each category (rows are full, so these are token shares) are within
    2% of the target."""
    from llama3_jax.train.loop import cli as train
    target = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
    mix = tmp_path / "mix.toml"
    assert cli.main(["mix", str(curated["out"]), "--target", ",".join(f"{k}={v * 100:g}" for k, v in target.items()),
                     "--out", str(mix)]) == 0
    config = tmp_path / "run.toml"  # the mix's [data] on a small model
    config.write_text('base = "debug-tiny"\n' + mix.read_text() + "\n[train]\nsteps = 200\nglobal_batch = 8\n"
                      'checkpoint_every = 200\nsample_tokens = 1\ncompile_cache = "off"\n')
    (tmp_path / "mesh.toml").write_text("[mesh]\nfsdp = -1\n")
    assert train(["--config", str(config), "--mesh", str(tmp_path / "mesh.toml"), "--out", str(tmp_path / "run"),
                  "model.n_layers=1"]) == 0
    event = json.loads((tmp_path / "run" / "data_mix.json").read_text())
    rows = {pathlib.Path(r["name"]).name: r["rows"] for r in event["sources"]}
    assert sum(rows.values()) == 200 * 8
    for category, share in target.items():
        assert abs(rows[category] / 1600 - share) <= 0.02, (category, rows)
