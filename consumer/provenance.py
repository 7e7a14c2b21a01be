"""The consumer's side of live provenance: a batch's documents, as the daemon recorded them.

With `TokenFeed(..., provenance=True)` the attach asks the daemon to record, per ring
slot, which documents fill each row (producer/slot_provenance.py), and every `ready`
carries that record. The link thread checks it on receipt (`parse`): the frame is
untrusted, so every array is bounded, every index in range, and every row must cover
exactly T+1 tokens; a bad record fails the feed with ProtocolError, as any malformed
`ready` does. `BatchProvenance.rows()` turns it into what `tokenfeed explain --json`
prints for the same batch: B rows, each a list of segments
`{"source", "file", "row_group", "row", "start", "end"}` (tokens start:end of the
document's [BOS] + encode_ordinary(text)); built only when asked, so `next()` pays
nothing but keeping a reference.

Record layout (little-endian int64 arrays as msgpack bin):

    files  [[source, file name], ...]
    docs   (n, 3)  index into files, row group, row
    segs   (k, 3)  index into docs, start, end
    rows   (B,)    segments of each row, in order

Failure behaviour: `parse` raises ProtocolError naming what is wrong; a record the
daemon could not send (`{"unavailable": why}`) parses to an unavailable provenance,
and `rows()` raises ConfigError naming `tokenfeed explain` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenfeed.common.errors import ConfigError, ProtocolError, StateMismatchError

MAX_FILES = 1 << 16
MAX_DOCUMENT_TOKENS = 1 << 40  # a document's token offsets: far above any real document
_FIELDS = ("files", "docs", "segs", "rows")


@dataclass(frozen=True)
class BatchProvenance:
    """A batch's segments, checked; `rows()` gives them as dicts."""

    files: list[tuple[str, str]]
    docs: np.ndarray  # (n, 3)
    segs: np.ndarray  # (k, 3)
    counts: np.ndarray  # (B,)
    unavailable: str | None = None

    def rows(self) -> list[list[dict[str, Any]]]:
        if self.unavailable is not None:
            raise ConfigError(
                f"the daemon recorded no provenance for this batch ({self.unavailable}); "
                "list it with `tokenfeed explain` from the state before it")
        docs = [(*self.files[f], rg, row) for f, rg, row in self.docs.tolist()]
        out: list[list[dict[str, Any]]] = []
        at = 0
        segs = self.segs.tolist()
        for n in self.counts.tolist():
            row = []
            for d, start, end in segs[at:at + n]:
                source, file, rg, r = docs[d]
                row.append({"source": source, "file": file, "row_group": rg, "row": r,
                            "start": start, "end": end})
            out.append(row)
            at += n
        return out


def _array(record: dict[str, Any], name: str, width: int) -> np.ndarray:
    raw = record.get(name)
    if not isinstance(raw, bytes) or len(raw) % (8 * width):
        raise ProtocolError(f"provenance field {name!r} is not int64 rows of {width}")
    return np.frombuffer(raw, dtype="<i8").reshape(-1, width) if width > 1 else \
        np.frombuffer(raw, dtype="<i8")


def parse(record: Any, batch_size: int, row_tokens: int) -> BatchProvenance:
    """A `ready`'s provenance field, checked against the batch shape (B rows of
    `row_tokens` = T+1 tokens each)."""
    if isinstance(record, dict) and set(record) == {"unavailable"}:
        why = record["unavailable"]
        if not isinstance(why, str):
            raise ProtocolError("provenance field 'unavailable' is not a string")
        empty = np.zeros(0, dtype=np.int64)
        return BatchProvenance([], empty.reshape(0, 3), empty.reshape(0, 3), empty, why[:500])
    if not isinstance(record, dict) or set(record) != set(_FIELDS):
        raise ProtocolError(f"provenance record is not a map of {', '.join(_FIELDS)}")
    files = record["files"]
    if not isinstance(files, list) or len(files) > MAX_FILES or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(s, str) for s in f)
            for f in files):
        raise ProtocolError("provenance field 'files' is not a list of [source, file]")
    docs, segs = _array(record, "docs", 3), _array(record, "segs", 3)
    counts = _array(record, "rows", 1)
    if len(counts) != batch_size or (counts < 0).any() or int(counts.sum()) != len(segs):
        raise ProtocolError(f"provenance rows do not split its {len(segs)} segments into "
                            f"{batch_size} rows")
    if len(docs) and ((docs < 0).any() or (docs[:, 0] >= len(files)).any()):
        raise ProtocolError("provenance names a file or row outside its table")
    if len(segs) and ((segs[:, 0] < 0).any() or (segs[:, 0] >= len(docs)).any()
                      or (segs[:, 1] < 0).any() or (segs[:, 2] <= segs[:, 1]).any()
                      or (segs[:, 2] > MAX_DOCUMENT_TOKENS).any()):
        raise ProtocolError("provenance holds a segment outside its documents or empty")
    per_row = np.add.reduceat(segs[:, 2] - segs[:, 1], np.cumsum(counts) - counts) \
        if len(segs) and counts.all() else None
    if per_row is None or (per_row != row_tokens).any():
        raise ProtocolError(f"provenance rows do not each cover {row_tokens} tokens")
    return BatchProvenance([(s, f) for s, f in files], docs, segs, counts)


def attach_fields(enabled: bool) -> dict[str, Any]:
    """What an attach adds to ask for provenance."""
    if not isinstance(enabled, bool):
        raise ConfigError(f"provenance={enabled!r} must be True or False")
    return {"provenance": True} if enabled else {}


def check_attached(enabled: bool, reply: dict[str, Any]) -> None:
    """Refuse a daemon that attached without recording provenance when it was asked."""
    if enabled and reply.get("provenance") is not True:
        raise StateMismatchError(
            "the daemon does not record batch provenance (it predates provenance=True); "
            "upgrade the node's tokenfeed daemon, or drop provenance=True")


def last_rows(enabled: bool, last: BatchProvenance | None) -> list[list[dict[str, Any]]] | None:
    """TokenFeed.last_provenance()."""
    if not enabled:
        raise ConfigError("last_provenance() needs TokenFeed(..., provenance=True); or list "
                          "any batch offline with `tokenfeed explain`")
    return None if last is None else last.rows()
