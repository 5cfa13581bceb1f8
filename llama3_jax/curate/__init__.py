"""Pretraining data curation on Hugging Face's datatrove (`python -m llama3_jax.curate CONFIG`,
`llama3-curate`): URL, exact and MinHash dedup, the paper's line-level dedup, Gopher repetition,
length and symbol filters, a dirty-word list, the token-distribution KL filter, language id
(py3langid), a hashed n-gram quality classifier and a rule-based domain classifier, writing
JSONL shards per mix category (general, math, code, multilingual) and a report of every
stage's counts. The same pipeline runs on datatrove's local, Slurm or Ray executor.

`config` holds the typed settings; `steps`, `lines`, `kl`, `domain` and `quality` the pipeline
steps we write ourselves (datatrove lacks them); `urls` the URL dedup's parts for datatrove's
exact dedup; `pipeline` builds the datatrove jobs and executors; `report` the report; `mix`
the mix helper; `cli` the command line. datatrove is imported only by the modules that run
it, so `import llama3_jax.curate` works without it.

Imports: config, data, formats.
"""
