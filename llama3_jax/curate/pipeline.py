"""The curation pipeline as datatrove jobs, and the executors that run them.

A dedup step that removes documents must see exactly the stream its signatures were computed
on, so the documents are written to OUT/.curate/work before MinHash and before the line and
KL filters, and read back by both the signature job and the filtering pass:

    read, [URL dedup], [exact dedup], write p1         (tasks)   after URL and exact signatures + find
    read p1, [MinHash filter], domain, language,
        [line count], [KL count], write p2             (tasks)   after MinHash signatures, buckets, cluster
    read p2, [line filter], length, repetition,
        symbols, dirty words, [KL filter], quality,
        write OUT                                      (tasks)   after the line-count and KL merges
    report                                             (1 task)

The exact signatures are computed on the input after the URL filter (the filter runs again
in that job: it only looks up the URL dedup's removals), so both see one stream.

Each job is one datatrove executor; they run in order through `depends`, on the local,
Slurm or Ray executor alike.
"""

from __future__ import annotations

import os
import pathlib

from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.writers import JsonlWriter

from llama3_jax.curate.config import CurateConfig, bands_rows, tasks_of
from llama3_jax.curate.kl import KLCount, KLFilter, KLMerge, Units
from llama3_jax.curate.lines import LineCount, LineFilter, LineMerge
from llama3_jax.curate.report import WriteReport
from llama3_jax.curate.steps import (CountTokens, DirtyWords, Domain, Finish, GopherQuality, InDomains, Language,
                                     Part, Quality, RegexWords, TaskFileWriter, TokenCounter)
from llama3_jax.curate.urls import KEY as URL_DUPLICATES
from llama3_jax.curate.urls import UrlFilter, UrlSignature, url_config

DEFAULT_WORDS = pathlib.Path(__file__).with_name("dirty_words.txt")


def document_text(doc) -> str:  # exact dedup hashes the whole text (the annotation picks the hash)
    return doc.text


def read_words(path: str) -> list[str]:
    text = pathlib.Path(path or DEFAULT_WORDS).read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def build_jobs(cfg: CurateConfig, input_root: str, inputs_file: str, tokenizer: str) -> list[tuple[str, list, int]]:
    """(name, datatrove pipeline, tasks) of each job, in order."""
    out = pathlib.Path(cfg.output.path).expanduser().resolve()
    meta, work, parts = out / ".curate", out / ".curate" / "work", str(out / ".curate" / "parts")
    n = tasks_of(cfg)
    counter = TokenCounter(tokenizer)
    words = RegexWords()

    def removed(stage):
        return JsonlWriter(str(meta / "removed" / stage), output_filename="${rank}.jsonl",
                           compression=None) if cfg.output.keep_removed else None

    def read_input():
        i = cfg.input
        cls = JsonlReader if i.kind == "jsonl" else ParquetReader
        return cls(input_root, paths_file=inputs_file, limit=i.limit, text_key=i.text_key, id_key=i.id_key)

    def read_work(name):
        return JsonlReader(str(work / name), glob_pattern="*.jsonl", compression=None)

    def stream(stage, *steps, **kw):
        return Part(stage, "stream", list(steps), parts, **kw)

    def write_pass(name):  # end the current pass: write its documents, then start reading them back
        nonlocal current
        current.append(Part("io", f"write-{name}", [TaskFileWriter(str(work / name))], parts))
        jobs.append((name, current, n))
        current = [Part("io", f"read-{name}", [read_work(name)], parts, source=True)]

    jobs: list[tuple[str, list, int]] = []
    current = [stream("read", read_input(), CountTokens(counter), source=True)]
    url_filtered = []  # what the exact signatures see: the input after the URL filter
    if cfg.url_dedup.enabled:
        uc = url_config(cfg.url_dedup.key, cfg.url_dedup.date_key)
        sigs, dups = str(work / "url" / "sigs"), str(work / "url" / "dups")
        jobs.append(("url-signature", [Part("url_dedup", "signature", [read_input(), UrlSignature(sigs, uc)],
                                            parts)], n))
        jobs.append(("url-find", [Part("url_dedup", "find", [ExactFindDedups(sigs, dups, uc)], parts)], 1))
        current.append(stream("url_dedup", UrlFilter(dups, uc, exclusion_writer=removed("url_dedup")),
                              cluster_key=URL_DUPLICATES))
        url_filtered = [UrlFilter(dups, uc)]
    if cfg.exact_dedup.enabled:
        ec = ExactDedupConfig(content_getter=document_text)
        sigs, dups = str(work / "exact" / "sigs"), str(work / "exact" / "dups")
        jobs.append(("exact-signature", [Part("exact_dedup", "signature",
                                              [read_input(), *url_filtered, ExactDedupSignature(sigs, ec)], parts)], n))
        jobs.append(("exact-find", [Part("exact_dedup", "find", [ExactFindDedups(sigs, dups, ec)], parts)], 1))
        current.append(stream("exact_dedup", ExactDedupFilter(dups, ec, exclusion_writer=removed("exact_dedup")),
                              cluster_key="duplicate_count"))
    if cfg.minhash.enabled:
        write_pass("p1")
        b, r = bands_rows(cfg.minhash.threshold, cfg.minhash.hashes)
        mc = MinhashConfig(n_grams=cfg.minhash.ngram, num_buckets=b, hashes_per_bucket=r, seed=cfg.minhash.seed)
        sigs, buckets, remove = (str(work / "minhash" / x) for x in ("sigs", "buckets", "remove"))
        jobs += [("minhash-signature", [Part("minhash_dedup", "signature",
                                             [read_work("p1"), MinhashDedupSignature(sigs, mc, language=words)],
                                             parts)], n),
                 ("minhash-buckets", [Part("minhash_dedup", "buckets", [MinhashDedupBuckets(sigs, buckets, config=mc)],
                                           parts)], b),
                 ("minhash-cluster", [Part("minhash_dedup", "cluster",
                                           [MinhashDedupCluster(buckets, remove, config=mc)], parts)], 1)]
        current.append(stream("minhash_dedup", MinhashDedupFilter(remove, exclusion_writer=removed("minhash_dedup"))))
    d, lang = cfg.domain, cfg.language
    if d.enabled:
        current.append(stream("domain", Domain(d.primary_languages, d.code_min_lines, d.math_min_score, lang.max_chars),
                              label="domain"))
    if lang.enabled:
        current.append(stream("language", Language(lang.keep, lang.min_score, lang.max_chars, lang.domains,
                                                   exclusion_writer=removed("language")), label="language"))
    ld, lines, kl, klf = cfg.line_dedup, str(work / "lines"), cfg.kl, str(work / "kl")
    units = Units(kl.unit, counter)
    if ld.enabled:
        current.append(Part("line_dedup", "count", [LineCount(lines, ld.merge_tasks, ld.domains)], parts))
    if kl.enabled:
        current.append(Part("kl", "count", [KLCount(klf, units, kl.domains)], parts))
    if ld.enabled or kl.enabled:
        write_pass("p2")
    if ld.enabled:
        jobs.append(("line-merge", [Part("line_dedup", "merge", [LineMerge(lines, ld.bucket_docs, ld.max_repeats)],
                                         parts)], ld.merge_tasks))
        current.append(stream("line_dedup", LineFilter(lines, ld.bucket_docs, counter,
                                                       exclusion_writer=removed("line_dedup"))))
    if kl.enabled:
        jobs.append(("kl-merge", [Part("kl", "merge", [KLMerge(klf)], parts)], 1))
    kl_filter = KLFilter(klf, units, kl.threshold, kl.smoothing, kl.domains, exclusion_writer=removed("kl"))
    for name, inner in filters(cfg, words, kl_filter):
        step = inner if name == "kl" else InDomains(inner, getattr(cfg, name).domains, exclusion_writer=removed(name))
        current.append(stream(name, step))
    writer = JsonlWriter(str(out), output_filename="${domain}/${rank}.jsonl", compression=None,
                         max_file_size=cfg.output.max_file_bytes or -1)
    current.append(stream("output", Finish(), writer, label="domain"))
    jobs.append(("final", current, n))
    jobs.append(("report", [WriteReport(str(out), parts, stage_names(cfg), cfg, tokenizer, n, klf)], 1))
    return jobs


def filters(cfg: CurateConfig, words: RegexWords, kl_filter=None) -> list[tuple[str, object]]:
    """The document filters of the last pass, in order, as (stage, datatrove filter). Length
    goes first: on a text of a few words, datatrove's top-n-gram rule fires on n-grams seen once.
    The KL filter (`kl_filter`, which applies its own `domains`) goes after the dirty words, as
    in the paper."""
    out = []
    rep, length, sym, dirty, q = cfg.repetition, cfg.length, cfg.symbols, cfg.dirty_words, cfg.quality
    off = dict(min_doc_words=None, max_doc_words=None, min_avg_word_length=None, max_avg_word_length=None,
               max_symbol_word_ratio=None, max_bullet_lines_ratio=None, max_ellipsis_lines_ratio=None,
               max_non_alpha_words_ratio=None, min_stop_words=None)
    if length.enabled:
        out.append(("length", GopherQuality(**dict(off, min_doc_words=length.min_words or None,
                                                   max_doc_words=length.max_words or None), language=words)))
    if rep.enabled:
        out.append(("repetition", GopherRepetitionFilter(
            dup_line_frac=rep.dup_line_frac, dup_para_frac=rep.dup_para_frac,
            dup_line_char_frac=rep.dup_line_char_frac, dup_para_char_frac=rep.dup_para_char_frac,
            top_n_grams=tuple((n, f) for n, f in zip((2, 3, 4), rep.top_ngram_fracs) if f > 0),
            dup_n_grams=tuple((n, f) for n, f in zip(range(5, 11), rep.dup_ngram_fracs) if f > 0), language=words)))
    if sym.enabled:
        out.append(("symbols", GopherQuality(
            **dict(off, min_avg_word_length=sym.min_avg_word_length, max_avg_word_length=sym.max_avg_word_length,
                   max_symbol_word_ratio=sym.max_symbol_word_ratio, max_bullet_lines_ratio=sym.max_bullet_lines_ratio,
                   max_ellipsis_lines_ratio=sym.max_ellipsis_lines_ratio,
                   max_non_alpha_words_ratio=sym.min_alpha_words_ratio, min_stop_words=sym.min_stop_words),
            stop_words=list(sym.stop_words), language=words)))
    if dirty.enabled:
        out.append(("dirty_words", DirtyWords(read_words(dirty.words_file), dirty.max_fraction)))
    if cfg.kl.enabled and kl_filter is not None:
        out.append(("kl", kl_filter))
    if q.enabled:
        out.append(("quality", Quality(str(pathlib.Path(q.model).expanduser().resolve()), q.threshold)))
    return out


def stage_names(cfg: CurateConfig) -> list[str]:
    """The enabled stages in the order documents go through them."""
    optional = ["url_dedup", "exact_dedup", "minhash_dedup", "domain", "language", "line_dedup", "length",
                "repetition", "symbols", "dirty_words", "kl", "quality"]
    on = {"minhash_dedup": cfg.minhash.enabled, "exact_dedup": cfg.exact_dedup.enabled}
    return ["read"] + [s for s in optional if on.get(s, getattr(cfg, s, None) and getattr(cfg, s).enabled)] + ["output"]


def make_executor(cfg: CurateConfig, pipeline: list, tasks: int, name: str, logs: str, depends=None):
    """One job's datatrove executor: local, Slurm or Ray, from `[executor]`."""
    e = cfg.executor
    if e.kind == "local":
        from datatrove.executor import LocalPipelineExecutor
        workers = min(tasks, e.workers if e.workers > 0 else os.cpu_count() or 1)
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logs,
                                     depends=depends, start_method=e.start_method)
    if e.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor
        s = e.slurm
        return SlurmPipelineExecutor(pipeline, tasks=tasks, time=s.time, partition=s.partition,
                                     cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                                     workers=e.workers, job_name=f"{s.job_name}-{name}", qos=s.qos,
                                     venv_path=s.venv_path or None, env_command=s.env_command or None,
                                     sbatch_args=dict(kv.split("=", 1) for kv in s.sbatch_args),
                                     max_array_size=s.max_array_size, logging_dir=logs, depends=depends)
    from datatrove.executor import RayPipelineExecutor
    r = e.ray
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=e.workers, depends=depends, logging_dir=logs,
                               cpus_per_task=r.cpus_per_task, mem_per_cpu_gb=r.mem_per_cpu_gb, time=r.time_s or None)


def executors(cfg: CurateConfig, jobs) -> list:
    """The jobs' executors, each depending on the one before; running the last runs them all."""
    logs = pathlib.Path(cfg.output.path).expanduser().resolve() / ".curate" / "logs"
    if cfg.executor.kind == "local" and cfg.executor.start_method == "forkserver":
        # Worker processes fork from a server that has imported our steps (and JAX, which
        # llama3_jax imports) once, instead of importing them again in every process.
        import multiprocess
        multiprocess.set_forkserver_preload(["llama3_jax.curate.pipeline"])
    chain = []
    for name, pipeline, tasks in jobs:
        chain.append(make_executor(cfg, pipeline, tasks, name, str(logs / name), chain[-1] if chain else None))
    return chain
