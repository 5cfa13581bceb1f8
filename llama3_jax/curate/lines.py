"""Line-level dedup as in the Llama 3 paper: a line that appears in more than `max_repeats`
documents within a bucket of `bucket_docs` documents is removed from all of them (the paper:
more than 6 times in buckets of 30M documents). datatrove has no such step, so it is three
of ours, across tasks:

1. `LineCount`, streaming in one pass: numbers the documents of each task (metadata
   "line_dedup_doc" = [task, index]) and writes the xxhash of each distinct non-blank line
   (stripped) of each document, split by hash value into `shards` files;
2. `LineMerge`, one task per shard: orders the documents task by task into one sequence,
   cuts it into buckets of `bucket_docs`, counts each (bucket, line) and writes the ones in
   more than `max_repeats` documents;
3. `LineFilter`, at the start of the next pass: removes those lines; a document left blank
   is removed, and the token count of a shortened one is counted again.

A line counts once per document; lines repeated inside one document are the repetition
filter's business. Blank lines are never removed.
"""

from __future__ import annotations

import json

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.hashing import HashConfig, create_hash_func

from llama3_jax.curate.steps import TOKENS

KEY = "line_dedup_doc"


def line_hash():
    return create_hash_func(HashConfig(precision=64, hash_fc="xxhash"))


def offsets(folder) -> dict[int, int]:
    """Each counting task's first document in the one sequence, from the tasks' document counts."""
    counts = {}
    for name in folder.list_files("docs", glob_pattern="*.json"):
        with folder.open(name, "r") as f:
            counts[int(name.split("/")[-1].split(".")[0])] = json.load(f)["docs"]
    out, total = {}, 0
    for rank in sorted(counts):
        out[rank], total = total, total + counts[rank]
    return out


class LineCount(PipelineStep):
    type = "🫂 - DEDUP"
    name = "📏 line dedup: count"

    def __init__(self, folder, shards: int, domains):
        super().__init__()
        self.folder, self.shards, self.domains = get_datafolder(folder), shards, frozenset(domains)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        hash_line = line_hash()
        hashes = [[] for _ in range(self.shards)]
        docs = [[] for _ in range(self.shards)]
        n = 0
        for doc in data:
            if doc.metadata.get("domain", "general") in self.domains:
                doc.metadata[KEY] = [rank, n]
                for h in {hash_line(s) for line in doc.text.split("\n") if (s := line.strip())}:
                    hashes[h % self.shards].append(h)
                    docs[h % self.shards].append(n)
                n += 1
            yield doc
        for k in range(self.shards):
            with self.folder.open(f"counts/{k:04d}/{rank:05d}.npz", "wb") as f:
                np.savez(f, hashes=np.array(hashes[k], np.uint64), docs=np.array(docs[k], np.uint32))
        with self.folder.open(f"docs/{rank:05d}.json", "w") as f:
            json.dump({"docs": n}, f)
        self.stat_update("documents", value=n)


class LineMerge(PipelineStep):
    type = "🫂 - DEDUP"
    name = "📏 line dedup: merge"

    def __init__(self, folder, bucket_docs: int, max_repeats: int):
        super().__init__()
        self.folder, self.bucket_docs, self.max_repeats = get_datafolder(folder), bucket_docs, max_repeats

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        first = offsets(self.folder)
        buckets, hashes = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
        for name in self.folder.list_files(f"counts/{rank:04d}", glob_pattern="*.npz"):
            task = int(name.split("/")[-1].split(".")[0])
            with self.folder.open(name, "rb") as f, np.load(f) as z:
                buckets.append((z["docs"].astype(np.uint64) + np.uint64(first[task])) // np.uint64(self.bucket_docs))
                hashes.append(z["hashes"])
        b, h = np.concatenate(buckets), np.concatenate(hashes)
        order = np.lexsort((h, b))
        b, h = b[order], h[order]
        starts = np.flatnonzero(np.r_[True, (b[1:] != b[:-1]) | (h[1:] != h[:-1])]) if len(b) else np.zeros(0, int)
        counts = np.diff(np.r_[starts, len(b)])
        over = starts[counts > self.max_repeats]
        with self.folder.open(f"remove/{rank:04d}.npz", "wb") as f:
            np.savez(f, buckets=b[over], hashes=h[over])
        self.stat_update("distinct_lines", value=len(starts))
        self.stat_update("repeated_lines", value=len(over))
        return
        yield  # a generator, like every step


class LineFilter(BaseFilter):
    name = "📏 line dedup: filter"

    def __init__(self, folder, bucket_docs: int, counter, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.folder, self.bucket_docs, self.counter = get_datafolder(folder), bucket_docs, counter
        self.first = self.remove = None

    def __getstate__(self):
        return dict(self.__dict__, first=None, remove=None)

    def load(self):
        self.first, self.remove = offsets(self.folder), {}
        for name in self.folder.list_files("remove", glob_pattern="*.npz"):
            with self.folder.open(name, "rb") as f, np.load(f) as z:
                for b, h in zip(z["buckets"].tolist(), z["hashes"].tolist()):
                    self.remove.setdefault(b, set()).add(h)
        self.hash_line = line_hash()

    def filter(self, doc):
        key = doc.metadata.pop(KEY, None)
        if key is None:
            return True
        if self.remove is None:
            self.load()
        remove = self.remove.get((self.first[key[0]] + key[1]) // self.bucket_docs)
        if not remove:
            return True
        lines = doc.text.split("\n")
        kept = [line for line in lines if not ((s := line.strip()) and self.hash_line(s) in remove)]
        if len(kept) == len(lines):
            return True
        self.stat_update("lines_removed", value=len(lines) - len(kept))
        doc.text = "\n".join(kept)
        if not doc.text.strip():
            return False, "all_lines_repeated"
        doc.metadata[TOKENS] = self.counter(doc.text)
        return True
