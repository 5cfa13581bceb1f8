"""URL-level dedup as in the Llama 3 paper (one document per URL, the most recent), on
datatrove's exact dedup: its `ExactDedupConfig` takes what to hash (here the URL) and a
document priority (here the date; the highest is kept), its `ExactFindDedups` finds the
duplicates. Ours are the two callables and two thin subclasses: documents without a URL get
no signature (they pass), and the filter's `duplicate_count` becomes `url_duplicates` (the
exact dedup's own count comes later)."""

from __future__ import annotations

import datetime

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature

KEY = "url_duplicates"
EPOCH = datetime.date(1970, 1, 1)
UNDATED = 1  # datatrove's lowest priority: a copy with a date wins over one without


def as_date(value) -> datetime.date | None:
    """The day of an ISO 8601 date or date-time string (`2024-05-01`, `2024-05-01T10:00:00Z`),
    or of a date/datetime object (Parquet timestamps); None for anything else."""
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value.strip()[:10])
        except ValueError:
            return None
    return None


class UrlOf:
    """What datatrove hashes: the document's URL (metadata `key`), as it is written."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, doc) -> str:
        value = doc.metadata.get(self.key)
        return "" if value is None else str(value)


class Recency:
    """datatrove's document priority (1..65535; the highest of a URL's copies is kept):
    2 + days since 1970-01-01 of metadata `key` (to mid-2149, later is the same), or 1 without a
    readable date."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, doc) -> int:
        day = as_date(doc.metadata.get(self.key)) if self.key else None
        return UNDATED if day is None else min(max((day - EPOCH).days + 2, 2), 65535)


def url_config(key: str, date_key: str) -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=UrlOf(key), document_priority=Recency(date_key))


class UrlSignature(ExactDedupSignature):
    """datatrove's exact-dedup signature of the URL; a document without one gets none (it
    passes), counted as `no_url`, and a URL's copy without a date as `undated`."""

    name = "🔗 url dedup: signature"

    def get_hashes(self, doc, doc_idx: int):
        if not self.config.content_getter(doc):
            self.stat_update("no_url")
            return []
        hashes = super().get_hashes(doc, doc_idx)
        if hashes[0][1] == UNDATED:
            self.stat_update("undated")
        return hashes


class UrlFilter(ExactDedupFilter):
    """datatrove's exact-dedup filter; the copies a kept document had are `url_duplicates`."""

    name = "🔗 url dedup: filter"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in super().run(data, rank, world_size):
            doc.metadata[KEY] = doc.metadata.pop("duplicate_count", 0)
            yield doc
