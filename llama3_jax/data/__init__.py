"""Training data: documents from sources, tokenized, packed into rows, mixed by weight and
batched with Grain, as checkpointable iterators (see `llama3_jax.data.packing`); the data
schedule (annealing) and the mix as read (`llama3_jax.data.schedule`).

Imports: `llama3_jax.config` only (a tokenizer is passed in).
"""

from llama3_jax.data.packing import (DataIterator, ShardedBatches, check_bad_rows, encode_document, heldout_batches,
                                     make_iterator)
from llama3_jax.data.sources import BadRow, document_source, open_sources, resolve_kind

__all__ = ["BadRow", "DataIterator", "ShardedBatches", "check_bad_rows", "document_source", "encode_document",
           "heldout_batches", "make_iterator", "open_sources", "resolve_kind"]
