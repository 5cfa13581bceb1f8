"""`python -m llama3_jax.curate` (`llama3-curate`): curate pretraining data with datatrove.

    python -m llama3_jax.curate CONFIG [section.key=value ...]      run the pipeline
    python -m llama3_jax.curate train-quality --positives P --negatives N --out model.npz
    python -m llama3_jax.curate mix OUT --target general=50,math=25,code=17,multilingual=8 [--out mix.toml]

Bad input (the config, a missing input, an output folder that holds something else, a
missing dependency) stops with one `error:` line that names the fix and exit code 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import shutil
import sys

from llama3_jax.config import ConfigError, DataSource
from llama3_jax.curate import config as curate_config

NEEDS = {"datatrove": "datatrove", "py3langid": "py3langid", "orjson": "orjson", "xxhash": "xxhash"}
INPUT_GLOBS = {"jsonl": ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst"), "parquet": ("*.parquet",)}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        raise ConfigError(f"{message} (see {self.prog} --help)")


def require(kind: str = "local") -> None:
    missing = [pip for mod, pip in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install '.[curate]' "
                          f"(or pip install {' '.join(missing)})")
    try:  # find_spec can see a package that fails to import
        importlib.import_module("datatrove")
    except ImportError as e:
        raise ConfigError(f"datatrove does not import ({e}): pip install '.[curate]'") from None
    import xxhash
    try:
        xxhash.xxh64_intdigest("text")
    except TypeError:  # xxhash 4 hashes bytes only; datatrove's MinHash hashes str
        raise ConfigError(f"xxhash {xxhash.VERSION} cannot hash text as datatrove needs: "
                          f"pip install 'xxhash<4'") from None
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor.kind = \"ray\" needs Ray: pip install 'ray[default]' (and a running cluster)")
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor.kind = \"slurm\" needs sbatch on PATH: run this on a Slurm login node")


def input_files(cfg) -> tuple[pathlib.Path, list[str]]:
    """The input's folder and its files (relative), sorted: the list every pass reads."""
    path = pathlib.Path(cfg.input.path).expanduser().resolve()
    if path.is_file():
        return path.parent, [path.name]
    if not path.is_dir():
        raise ConfigError(f"input.path {path} does not exist; give a {cfg.input.kind} file or a folder of them")
    globs = (cfg.input.glob,) if cfg.input.glob else INPUT_GLOBS[cfg.input.kind]
    files = sorted({p.relative_to(path).as_posix() for g in globs for p in path.rglob(g) if p.is_file()})
    if not files:
        raise ConfigError(f"input.path {path} has no files matching {' or '.join(globs)} (searched recursively); "
                          f"add files or set input.glob")
    return path, files


def check_output(cfg) -> bool:
    """Whether OUT resumes an earlier run of the same settings (an error if it holds anything else)."""
    out = pathlib.Path(cfg.output.path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.path {out} is a file; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    marker = out / ".curate" / "config.json"
    if not marker.is_file():
        raise ConfigError(f"output.path {out} is a non-empty folder that is not a curation output; "
                          f"give a new or empty folder")
    diff = curate_config.differences(json.loads(marker.read_text()), curate_config.saved(cfg))
    if diff:
        raise ConfigError(f"output.path {out} holds a curation run with other settings ({'; '.join(diff)}); "
                          f"give a new output.path, or delete that folder to start over")
    return True


def check_files(cfg) -> None:
    if cfg.tokens.tokenizer and not pathlib.Path(cfg.tokens.tokenizer).expanduser().is_file():
        raise ConfigError(f"tokens.tokenizer {cfg.tokens.tokenizer} does not exist; give a Llama 3 tokenizer.model "
                          f"or leave it empty for the default BPE")
    words = cfg.dirty_words.words_file
    if cfg.dirty_words.enabled and words and not pathlib.Path(words).is_file():
        raise ConfigError(f"dirty_words.words_file {words} does not exist; give a file with one "
                          f"word a line, or leave it empty for the built-in list")
    q = cfg.quality
    if q.enabled:
        train = "train one with python -m llama3_jax.curate train-quality --positives P --negatives N --out model.npz"
        if not q.model:
            raise ConfigError(f"quality.enabled needs quality.model; {train}")
        if not pathlib.Path(q.model).is_file():
            raise ConfigError(f"quality.model {q.model} does not exist; {train}")
        from llama3_jax.curate import quality
        try:
            quality.load(q.model)
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
    codes = set(cfg.language.keep) | set(cfg.domain.primary_languages)
    if codes:
        from llama3_jax.curate.domain import known_languages
        unknown = sorted(codes - set(known_languages()))
        if unknown:
            raise ConfigError(f"language code(s) {', '.join(unknown)} unknown to py3langid (language.keep, "
                              f"domain.primary_languages); use ISO 639-1 codes such as en, fr, de, es, zh")


def tokenizer_path(cfg) -> str:
    from llama3_jax.formats.bpe import default_tokenizer, load_tokenizer
    if cfg.tokens.tokenizer:
        return str(load_tokenizer(pathlib.Path(cfg.tokens.tokenizer).expanduser().resolve()).path)
    try:
        return str(default_tokenizer(cfg.tokens.default_vocab_size).path)
    except ValueError as e:  # a vocabulary size the default BPE cannot have
        raise ConfigError(f"tokens.default_vocab_size: {e}") from None


def run(argv) -> int:
    p = Parser(prog="python -m llama3_jax.curate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the curation TOML file (see the README's Data curation section)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value, e.g. executor.tasks=8 minhash.threshold=0.8")
    args = p.parse_args(argv)
    cfg = curate_config.load(args.config, args.overrides)
    require(cfg.executor.kind)
    root, files = input_files(cfg)
    check_files(cfg)
    resume = check_output(cfg)
    tokenizer = tokenizer_path(cfg)
    out = pathlib.Path(cfg.output.path).expanduser().resolve()
    meta = out / ".curate"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "config.json").write_text(json.dumps(curate_config.saved(cfg), indent=1))
    inputs = meta / "inputs.txt"
    if not resume or not inputs.is_file():  # a resumed run reads the file list it started with
        inputs.write_text("".join(f + "\n" for f in files))
    from llama3_jax.curate.pipeline import build_jobs, executors
    chain = executors(cfg, build_jobs(cfg, str(root), str(inputs), tokenizer))
    print(f"curating {len(files)} file(s) from {root} into {out} ({cfg.executor.kind}, "
          f"{len(chain)} jobs{', resuming' if resume else ''})", file=sys.stderr)
    chain[-1].run()
    report = out / "report.json"
    if cfg.executor.kind == "slurm":
        print(f"submitted {len(chain)} Slurm jobs; {report} is written by the last", file=sys.stderr)
        return 0
    from llama3_jax.curate.report import summary
    print(summary(json.loads(report.read_text())))
    print(f"report: {report}")
    return 0


def train_quality(argv) -> int:
    p = Parser(prog="python -m llama3_jax.curate train-quality",
               description="Train the quality classifier: reference-quality text against random web text.")
    p.add_argument("--positives", required=True, help="reference-quality documents: JSONL, Parquet or a text folder")
    p.add_argument("--negatives", required=True, help="random web documents, in the same forms")
    p.add_argument("--out", required=True, help="the model file to write (.npz)")
    p.add_argument("--field", default="text", help="the text's JSONL key or Parquet column")
    p.add_argument("--heldout", type=float, default=0.1, help="share of each side held out to report accuracy")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    from llama3_jax.curate import quality
    from llama3_jax.data.sources import BadRow, document_source
    out = pathlib.Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new path or delete it")
    if not 0 <= args.heldout < 1:
        raise ConfigError(f"--heldout {args.heldout} must be in [0, 1)")
    sides = []
    for flag, path in (("--positives", args.positives), ("--negatives", args.negatives)):
        if not pathlib.Path(path).exists():
            raise ConfigError(f"{flag} {path} does not exist")
        docs = document_source(DataSource(path=path, field=args.field))
        texts = [t for t in (docs[i] for i in range(len(docs))) if not isinstance(t, BadRow) and t.strip()]
        if len(texts) < 2:
            raise ConfigError(f"{flag} {path} has {len(texts)} usable document(s); give at least 2")
        cut = len(texts) - max(1, round(len(texts) * args.heldout)) if args.heldout else len(texts)
        sides.append((texts[:cut], texts[cut:]))
    (pos, pos_held), (neg, neg_held) = sides
    model = quality.train(pos, neg, steps=args.steps)
    quality.save(model, out)
    line = (f"{out}: trained on {len(pos)} positives and {len(neg)} negatives, "
            f"accuracy {float(model['train_accuracy']):.3f}")
    if pos_held and neg_held:
        s = quality.scores(model, pos_held + neg_held)
        right = (s[:len(pos_held)] >= 0.5).sum() + (s[len(pos_held):] < 0.5).sum()
        line += f"; held out ({len(pos_held)} + {len(neg_held)}): accuracy {right / len(s):.3f}"
    print(line)
    return 0


def mix(argv) -> int:
    p = Parser(prog="python -m llama3_jax.curate mix",
               description="Write the [[data.sources]] of a target mix (shares of tokens) over curated shards.")
    p.add_argument("out", help="the curation output folder (OUT, holding OUT/<category>/*.jsonl)")
    p.add_argument("--target", required=True, help="category=share,... e.g. general=50,math=25,code=17,multilingual=8")
    p.add_argument("--out", dest="toml", default=None, help="write the TOML here (default: print it)")
    args = p.parse_args(argv)
    from llama3_jax.curate.mix import mix_toml, parse_target
    if not pathlib.Path(args.out).is_dir():
        raise ConfigError(f"{args.out} is not a folder; give a curation output folder")
    text, notes = mix_toml(args.out, parse_target(args.target))
    if args.toml is None:
        print(text, end="")
    else:
        dest = pathlib.Path(args.toml)
        if dest.exists():
            raise ConfigError(f"--out {dest} exists; give a new path or delete it")
        dest.write_text(text)
        print(f"wrote {dest}")
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"train-quality": train_quality, "mix": mix}.get(argv[0] if argv else "", run)
    try:
        return command(argv[1:] if command is not run else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
