"""Throughput of the curation pipeline (`python -m llama3_jax.curate`) on datatrove's local
executor: documents/s and MB/s, for the whole run and per stage, per core.

    python benchmarks/curate.py [--mb 30] [--tasks N] [--workers N] [--keep DIR]

It generates a web-like corpus of about --mb MB of JSONL (English prose with boilerplate
lines, French/German/Spanish prose, Python code, math, 5% exact copies, 5% near copies,
junk for each filter), trains the quality classifier on a separate sample (not timed), and
runs every stage with the quality stage scoring. The whole-run wall time includes process
start-up, the dedup barriers and the intermediate files, and any other load on the machine
(the load average is printed). Per-core rates use CPU seconds: a stage's are what its steps
took in all tasks (the document stream in them alone, up- and downstream work excluded), so
with T tasks on T free cores a stage runs about T times faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llama3_jax.curate import cli  # noqa: E402

WORDS = {
    "en": """the of and to in is that for it with as was on be by this are from at or have an they which one you were
all we her she there would their will when who him been has more if no out so what up can about time people year
way day man thing woman life child world school state family student group country problem hand part place case week
company system program question work government number night point home water room mother area money story fact month
lot right study book eye job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent face others level
office door health person art war history party result change morning reason research girl guy moment air teacher
force education river garden music village winter summer letter road table window""".split(),
    "fr": """le la les de des un une et est dans pour que qui sur avec pas plus par nous vous ils elle mais comme tout
faire bien maison temps jour monde vie homme femme enfant ville pays travail année toujours aussi encore très petit
grand nouveau premier dernier jardin école rivière livre histoire musique village soleil matin soir""".split(),
    "de": """der die das und ist nicht mit zu den von sie ein eine auch auf für sich dem des im es wir ihr aber noch
nach bei aus wie oder wenn nur schon sehr immer Haus Zeit Jahr Mensch Kind Stadt Land Arbeit Welt Leben Schule
Familie Freund Vater Mutter Wasser Straße Fenster Garten Buch""".split(),
    "es": """el la los las de y que en un una es por con para no se su al lo como más pero sus le ya este porque esta
entre cuando muy sin sobre también hasta hay donde casa tiempo año día hombre mujer niño ciudad país trabajo mundo
vida escuela familia amigo padre madre agua calle ventana jardín libro""".split(),
}
SPAM = "buy cheap deal free offer discount click best price shipping online sale order now win bonus casino".split()
BOILERPLATE = ["Subscribe to our newsletter to get the weekly digest in your inbox.",
               "All rights reserved by the publisher and its partners worldwide.", "Click here to read more stories."]


def sentence(rng, words):
    w = rng.choices(words, k=rng.randint(8, 16))
    return w[0].capitalize() + " " + " ".join(w[1:]) + "."


def prose(rng, words, paragraphs):
    return "\n".join(" ".join(sentence(rng, words) for _ in range(rng.randint(3, 6))) for _ in range(paragraphs))


def code(rng):
    names = [rng.choice("abcdefghijklmnopqrstuvwxyz") + str(rng.randint(0, 999)) for _ in range(12)]
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b, c = rng.sample(names, 3)
        lines += [f"def {a}({b}, {c}):", f"    for x in {b}:", f"        {c}.append(x * {rng.randint(2, 99)})",
                  f"    return {c}", ""]
    return "\n".join(lines)


def math(rng):
    out = []
    for _ in range(rng.randint(6, 14)):
        x, n, k = rng.choice("xyzabn"), rng.randint(2, 99), rng.randint(1, 999)
        out.append(f"Let {x} = {n}; then {x}^2 + {k} = {n * n + k}, so the equation holds. "
                   + sentence(rng, WORDS["en"]))
    return "\n".join(out)


def document(rng) -> str:
    r = rng.random()
    if r < 0.55:
        text = prose(rng, WORDS["en"], rng.randint(2, 8))
        if rng.random() < 0.3:
            text += "\n" + rng.choice(BOILERPLATE)
        return text
    if r < 0.75:
        return prose(rng, WORDS[rng.choice(("fr", "de", "es"))], rng.randint(2, 8))
    if r < 0.83:
        return code(rng)
    if r < 0.91:
        return math(rng)
    junk = rng.randrange(4)
    if junk == 0:
        return " ".join(rng.choices(WORDS["en"], k=20))
    if junk == 1:
        return "\n".join([sentence(rng, WORDS["en"])] * 20)
    if junk == 2:
        return " ".join(w + " #@%" for w in rng.choices(WORDS["en"], k=80))
    return " ".join(rng.choice(SPAM) if rng.random() < 0.5 else rng.choice(WORDS["en"]) for _ in range(120))


def corpus(folder: pathlib.Path, mb: float, files: int, seed: int = 0) -> tuple[int, int]:
    """Writes about `mb` MB of JSONL into `files` files; (documents, bytes)."""
    rng = random.Random(seed)
    outs = [open(folder / f"part{i:03d}.jsonl", "w") for i in range(files)]
    n = size = 0
    recent: list[str] = []
    while size < mb * 1e6:
        r = rng.random()
        if r < 0.05 and recent:
            text = rng.choice(recent)  # an exact copy
        elif r < 0.10 and recent:
            words = rng.choice(recent).split(" ")
            for i in rng.sample(range(len(words)), max(1, len(words) // 60)):
                words[i] = rng.choice(WORDS["en"])
            text = " ".join(words)  # a near copy
        else:
            text = document(rng)
            recent = (recent + [text])[-500:]
        line = json.dumps({"id": f"doc{n}", "text": text}) + "\n"
        outs[n % files].write(line)
        n += 1
        size += len(line.encode())
    for f in outs:
        f.close()
    return n, size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=30.0, help="corpus size in MB of JSONL")
    p.add_argument("--tasks", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=-1, help="tasks at once (-1: all; 1: in this process)")
    p.add_argument("--keep", default=None, help="work in this new folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="curate-bench-"))
    try:
        (root / "in").mkdir(parents=True)
        docs, size = corpus(root / "in", args.mb, files=2 * args.tasks)
        rng = random.Random(1)
        for name, make in (("pos", lambda: prose(rng, WORDS["en"], 4)),
                           ("neg", lambda: " ".join(rng.choice(SPAM + WORDS["en"]) for _ in range(150)))):
            (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": make()}) + "\n" for _ in range(200)))
        with contextlib.redirect_stdout(io.StringIO()):  # the table below replaces the commands' own output
            trained = cli.main(["train-quality", "--positives", str(root / "pos.jsonl"), "--negatives",
                                str(root / "neg.jsonl"), "--out", str(root / "quality.npz")])
        assert trained == 0
        cfg = root / "curate.toml"
        cfg.write_text(f'[input]\npath = "{root / "in"}"\n[output]\npath = "{root / "out"}"\n'
                       f'[executor]\ntasks = {args.tasks}\nworkers = {args.workers}\n'
                       f'[language]\nkeep = ["en", "fr", "de", "es"]\n'
                       f'[quality]\nenabled = true\nmodel = "{root / "quality.npz"}"\n')
        load = os.getloadavg()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main([str(cfg)]) == 0, "the curation run failed"
        wall = time.perf_counter() - t0
        report = json.loads((root / "out" / "report.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cores = min(args.tasks, args.workers if args.workers > 0 else os.cpu_count() or 1)
    t, mb = report["totals"], size / 1e6
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {docs} documents, {mb:.1f} MB; local executor, {args.tasks} tasks, "
          f"{cores} at once")
    print(f"whole run: {wall:.1f} s wall: {docs / wall:.0f} docs/s, {mb / wall:.3f} MB/s "
          f"({docs / wall / cores:.0f} docs/s, {mb / wall / cores:.3f} MB/s per core)")
    print(f"           {t['cpu_seconds']:.1f} CPU s in the stages and files: {docs / t['cpu_seconds']:.0f} docs/s, "
          f"{mb / t['cpu_seconds']:.3f} MB/s per core")
    print(f"{'stage':<14}{'docs in':>9}{'docs out':>9}{'wall s':>9}{'CPU s':>9}{'docs/s/core':>13}{'MB/s/core':>11}")
    for s in report["stages"]:
        cpu = max(s["cpu_seconds"], 1e-9)
        print(f"{s['stage']:<14}{s['docs_in']:>9}{s['docs_out']:>9}{s['seconds']:>9.2f}{s['cpu_seconds']:>9.2f}"
              f"{s['docs_in'] / cpu:>13.0f}{s['bytes_in'] / 1e6 / cpu:>11.2f}")
    print(f"{'files':<14}{'':>18}{t['io_seconds']:>9.2f}{t['io_cpu_seconds']:>9.2f}   "
          f"(writing and reading back the intermediate JSONL)")
    print("per core: documents and MB into the stage over its CPU seconds in all tasks. The domain stage runs "
          "the language id; the language stage reads it from the metadata.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
