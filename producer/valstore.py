"""The val split's tokenized row groups, kept in memory when the daemon has no token cache.

A fixed validation set (`TokenFeed(split="val", max_batches=N)`) reads the same row
groups every round. With `--cache-dir` the token cache (cache.py) keeps them; without
one, this store does, so the second and later rounds tokenize nothing. It offers the
cache's `get`/`put` (a reader cannot tell them apart), keyed by the same facts: the
shard, its size and mtime at start (`stamp`), the row group.

Bounded by `max_bytes` (`serve --val-memory-mib`, default 1 GiB: about 268 M uint32
tokens, far above an evaluation of ~10 M tokens). Past the bound a new row group is
not kept (counted in `refused`, one warning): a round reads its row groups in the same
order every time, so the first ones that fit stay and only the rest are tokenized
again each round; evicting least recently used entries instead would miss every one
of them, every round. Memory is never freed before the daemon exits: a val set is
read again every round.

Failure behaviour: none of its own; an entry that does not fit is simply not kept.
"""

from __future__ import annotations

import logging

import numpy as np

from tokenfeed.producer.cache import CachedRows

log = logging.getLogger(__name__)


class ValStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.entries: dict[tuple[str, str, int], CachedRows] = {}
        self.hits = self.misses = self.writes = self.refused = 0

    def get(self, shard: str, stamp: str, row_group: int) -> CachedRows | None:
        rows = self.entries.get((shard, stamp, row_group))
        if rows is None:
            self.misses += 1
        else:
            self.hits += 1
        return rows

    def put(self, shard: str, stamp: str, row_group: int, tokens: np.ndarray,
            row_tokens: np.ndarray) -> None:
        """Keep a row group's rows (file order), unless that would pass the bound."""
        key = (shard, stamp, row_group)
        if key in self.entries:
            return
        size = int(tokens.nbytes + row_tokens.nbytes)
        if self.bytes_used + size > self.max_bytes:
            if not self.refused:
                log.warning("val store full (%d of %d bytes): row groups of the val split past "
                            "it are tokenized again every round; raise --val-memory-mib or "
                            "serve with --cache-dir", self.bytes_used, self.max_bytes)
            self.refused += 1
            return
        # copies of their own: the unit's arrays go on to the packer
        self.entries[key] = CachedRows(np.array(tokens), np.array(row_tokens, dtype=np.int64))
        self.bytes_used += size
        self.writes += 1

    def stats(self) -> dict[str, object]:
        return {"row_groups": len(self.entries), "bytes": self.bytes_used,
                "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                "writes": self.writes, "refused": self.refused}
