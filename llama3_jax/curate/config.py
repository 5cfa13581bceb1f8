"""The curation config: typed frozen dataclasses read from TOML, with `section.key=value`
overrides. Unknown sections and keys are errors that list the valid ones (ConfigError)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field

from llama3_jax.config import ConfigError
from llama3_jax.config.load import build

# The paper's data-mix categories; each is a folder of JSONL shards in the output.
DOMAINS = ("general", "math", "code", "multilingual")
PROSE = ("general", "math", "multilingual")


@dataclass(frozen=True)
class InputConfig:
    path: str = ""  # a JSONL/Parquet file or a folder of them (searched recursively)
    kind: str = "jsonl"  # jsonl | parquet
    glob: str = ""  # files inside a folder; "" = *.jsonl, *.jsonl.gz, *.jsonl.zst (jsonl) or *.parquet
    text_key: str = "text"
    id_key: str = "id"
    limit: int = -1  # documents per task (-1 = all), for trial runs


@dataclass(frozen=True)
class OutputConfig:
    path: str = ""  # OUT: OUT/<category>/*.jsonl, OUT/report.json, working files in OUT/.curate
    max_file_bytes: int = 0  # split shards at this size (0 = one file per task and category)
    keep_removed: bool = False  # write removed documents to OUT/.curate/removed/<stage>/


@dataclass(frozen=True)
class TokensConfig:
    tokenizer: str = ""  # a Llama 3 tokenizer.model; "" = the project's default BPE
    default_vocab_size: int = 2048


@dataclass(frozen=True)
class SlurmConfig:
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str = "normal"
    job_name: str = "curate"
    venv_path: str = ""  # `source`d in each job
    env_command: str = ""  # or any command that sets up the environment
    sbatch_args: tuple[str, ...] = ()  # extra "key=value" sbatch options, e.g. "account=myproj"
    max_array_size: int = 1001


@dataclass(frozen=True)
class RayConfig:
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    time_s: int = 0  # per-task time limit (0 = none)


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"  # local | slurm | ray
    tasks: int = 0  # tasks of each pass over the documents; 0 = one per CPU (local only)
    workers: int = -1  # tasks at once; -1: local, one per CPU, else no limit; local 1: one by one, in this process
    start_method: str = "forkserver"  # local worker processes
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True)
class UrlDedupConfig:  # datatrove's exact dedup on the URL; documents without one pass
    enabled: bool = True
    key: str = "url"  # the metadata key of the URL
    date_key: str = "date"  # keep the copy with the latest ISO 8601 date here; "" = the first
    # (dates count by the day; a tie, or no date on any copy: the first datatrove meets)


@dataclass(frozen=True)
class ExactDedupConfig:
    enabled: bool = True


@dataclass(frozen=True)
class MinhashConfig:
    enabled: bool = True
    # LSH has no hard cut-off: pairs at Jaccard s become candidates with probability
    # 1-(1-s^r)^b. `threshold` picks the bands b and rows r (b*r <= hashes) whose
    # (1/b)^(1/r), where that curve is steepest, is closest to it: 0.72 -> 14 x 8 (FineWeb's).
    threshold: float = 0.72
    hashes: int = 112
    ngram: int = 5  # word shingles, on datatrove's normalised text
    seed: int = 1


@dataclass(frozen=True)
class LineDedupConfig:
    enabled: bool = True
    max_repeats: int = 6  # a line in more documents than this, within a bucket, is removed
    bucket_docs: int = 30_000_000  # consecutive documents per bucket
    merge_tasks: int = 1  # tasks of the counting merge (line hashes split by value)
    domains: tuple[str, ...] = PROSE  # not code: `}` or `return x` repeat everywhere


@dataclass(frozen=True)
class DomainConfig:
    enabled: bool = True
    primary_languages: tuple[str, ...] = ("en",)  # prose in other languages is "multilingual"
    code_min_lines: float = 0.3  # share of non-empty lines that look like code
    math_min_score: float = 0.08  # math signals (LaTeX, equations, math words) per word


@dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = True
    keep: tuple[str, ...] = ()  # ISO 639-1 codes to keep; () = keep every language (label only)
    min_score: float = 0.0  # py3langid's probability of the top language
    max_chars: int = 5000  # identify on the document's first characters
    domains: tuple[str, ...] = PROSE  # where `keep` applies (every document is labelled)


@dataclass(frozen=True)
class RepetitionConfig:  # Gopher's repetition rules (datatrove's GopherRepetitionFilter); 0 = off
    enabled: bool = True
    domains: tuple[str, ...] = ("general", "multilingual")
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_ngram_fracs: tuple[float, ...] = (0.2, 0.18, 0.16)  # n = 2, 3, 4
    dup_ngram_fracs: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5 .. 10


@dataclass(frozen=True)
class LengthConfig:  # Gopher's word counts (symbol-only words not counted)
    enabled: bool = True
    domains: tuple[str, ...] = PROSE
    min_words: int = 50
    max_words: int = 100_000


@dataclass(frozen=True)
class SymbolsConfig:  # the rest of Gopher's quality rules; 0 = off
    enabled: bool = True
    domains: tuple[str, ...] = ("general",)  # English rules (stop words)
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    min_alpha_words_ratio: float = 0.8  # words with a letter
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass(frozen=True)
class DirtyWordsConfig:
    enabled: bool = True
    domains: tuple[str, ...] = DOMAINS
    words_file: str = ""  # one word a line; "" = the small built-in list (curate/dirty_words.txt)
    max_fraction: float = 0.01  # listed words per word above this: removed


@dataclass(frozen=True)
class KLConfig:  # KL(document || corpus) of unit distributions, per category (curate/kl.py)
    enabled: bool = True
    unit: str = "words"  # words (lower-cased, cut into pieces of 16 characters) | tokens (the tokenizer's)
    threshold: float = 4.5  # nats: documents above are removed; 0 = only score (metadata "kl")
    smoothing: float = 1.0  # alpha of q = (count + alpha) / (total + alpha * (distinct + 1))
    domains: tuple[str, ...] = ("general", "math")  # not code or multilingual: other token worlds


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = False  # needs a model: python -m llama3_jax.curate train-quality ...
    model: str = ""
    threshold: float = 0.0  # documents scoring below are removed; 0 = only score (metadata "quality")
    domains: tuple[str, ...] = ("general",)


@dataclass(frozen=True)
class CurateConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    url_dedup: UrlDedupConfig = field(default_factory=UrlDedupConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash: MinhashConfig = field(default_factory=MinhashConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    symbols: SymbolsConfig = field(default_factory=SymbolsConfig)
    dirty_words: DirtyWordsConfig = field(default_factory=DirtyWordsConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)




def tasks_of(cfg: CurateConfig) -> int:
    """The tasks of each pass: `executor.tasks`, or one per CPU here."""
    return cfg.executor.tasks or os.cpu_count() or 1


def saved(cfg: CurateConfig) -> dict:
    """What OUT/.curate/config.json keeps: the settings that decide what a run computes. The
    executor may change when a run resumes (where and how fast it runs), but not the tasks:
    the dedup files are per task."""
    d = to_dict(cfg)
    d["executor"] = {"tasks": tasks_of(cfg)}
    return d


def section_types() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(CurateConfig)}


def parse_value(text: str):
    """A command-line value: a TOML value if it parses as one (`["en","fr"]`, `0.8`, `true`), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | None, overrides=()) -> CurateConfig:
    """The config of TOML file `path` (None: the defaults) with `section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config {path} does not exist; give the path of a curation TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        key, eq, value = text.partition("=")
        parts = key.split(".")
        if not eq or len(parts) < 2:
            raise ConfigError(f"override {text!r} must look like section.key=value (e.g. minhash.threshold=0.8)")
        table = raw
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        table[parts[-1]] = parse_value(value)
    types = section_types()
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(types)}")
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{name} must be a section ([{name}]), got {values!r}")
    cfg = CurateConfig(**{name: build(cls, raw.get(name, {}), name) for name, cls in types.items()})
    check(cfg)
    return cfg


def _one_of(value, allowed, where):
    if value not in allowed:
        raise ConfigError(f"{where} = {value!r}; use one of {', '.join(allowed)}")


def check(cfg: CurateConfig) -> None:
    """Checks of the values alone (the file system is checked by `cli.check_paths`)."""
    if not cfg.input.path:
        raise ConfigError("input.path is not set; give the JSONL or Parquet file or folder to curate")
    if not cfg.output.path:
        raise ConfigError("output.path is not set; give a new or empty folder for the curated shards")
    _one_of(cfg.input.kind, ("jsonl", "parquet"), "input.kind")
    _one_of(cfg.executor.kind, ("local", "slurm", "ray"), "executor.kind")
    _one_of(cfg.executor.start_method, ("forkserver", "spawn", "fork"), "executor.start_method")
    if cfg.executor.tasks < 0 or (cfg.executor.tasks == 0 and cfg.executor.kind != "local"):
        raise ConfigError(f"executor.tasks = {cfg.executor.tasks}; set a positive number of tasks "
                          f"(0 = one per CPU, on the local executor only)")
    if cfg.executor.kind == "slurm" and not cfg.executor.slurm.partition:
        raise ConfigError("executor.slurm.partition is not set; name the Slurm partition to run on")
    for kv in cfg.executor.slurm.sbatch_args:
        if "=" not in kv:
            raise ConfigError(f"executor.slurm.sbatch_args entry {kv!r} must look like key=value")
    m = cfg.minhash
    if not 0 < m.threshold < 1 or m.hashes < 1 or m.ngram < 1:
        raise ConfigError(f"minhash: threshold must be in (0, 1), hashes and ngram >= 1 "
                          f"(got {m.threshold}, {m.hashes}, {m.ngram})")
    ld = cfg.line_dedup
    if ld.max_repeats < 1 or ld.bucket_docs < 1 or ld.merge_tasks < 1:
        raise ConfigError("line_dedup: max_repeats, bucket_docs and merge_tasks must be >= 1")
    if cfg.url_dedup.enabled and not cfg.url_dedup.key:
        raise ConfigError("url_dedup.key is empty; name the metadata key that holds the URL (e.g. url)")
    _one_of(cfg.kl.unit, ("words", "tokens"), "kl.unit")
    if cfg.kl.threshold < 0 or cfg.kl.smoothing <= 0:
        raise ConfigError(f"kl: threshold must be >= 0 (0 = only score) and smoothing > 0 "
                          f"(got {cfg.kl.threshold}, {cfg.kl.smoothing})")
    for name in ("line_dedup", "language", "repetition", "length", "symbols", "dirty_words", "kl", "quality"):
        for d in getattr(cfg, name).domains:
            _one_of(d, DOMAINS, f"{name}.domains entry")
    if not 0 <= cfg.quality.threshold < 1:
        raise ConfigError(f"quality.threshold = {cfg.quality.threshold}; use a score in [0, 1) (0 = only score)")
    if not 0 <= cfg.dirty_words.max_fraction < 1:
        raise ConfigError(f"dirty_words.max_fraction = {cfg.dirty_words.max_fraction}; use a fraction in [0, 1)")
    if len(cfg.repetition.top_ngram_fracs) > 3 or len(cfg.repetition.dup_ngram_fracs) > 6:
        raise ConfigError("repetition: top_ngram_fracs has at most 3 values (n=2..4), "
                          "dup_ngram_fracs at most 6 (n=5..10)")


def bands_rows(threshold: float, hashes: int) -> tuple[int, int]:
    """The LSH bands b and rows r (b*r <= hashes) whose (1/b)^(1/r) is closest to `threshold`;
    on a tie, the one that uses more hashes (a steeper curve)."""
    best = None
    for r in range(1, hashes + 1):
        b = hashes // r
        key = (abs((1 / b) ** (1 / r) - threshold), -(b * r))
        if best is None or key < best[0]:
            best = (key, b, r)
    return best[1], best[2]


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """The chance that two documents at shingle Jaccard `s` share a band (and are deduplicated)."""
    return 1 - (1 - s ** rows) ** bands


def lsh_summary(m: MinhashConfig) -> dict:
    b, r = bands_rows(m.threshold, m.hashes)
    return {"ngram": m.ngram, "bands": b, "rows": r, "hashes": b * r, "threshold": m.threshold,
            "curve_midpoint": round((1 / b) ** (1 / r), 4),
            "removal_probability": {f"{s:.1f}": round(candidate_probability(s, b, r), 4)
                                    for s in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)},
            "note": "pairs above the midpoint are usually, not always, found; below it, rarely"}


def to_dict(cfg: CurateConfig) -> dict:
    return dataclasses.asdict(cfg)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two `to_dict` configs, as `section.key: old -> new`."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
