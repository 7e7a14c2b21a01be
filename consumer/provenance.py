"""The consumer's side of live provenance: a batch's documents, as the daemon recorded them.

With `TokenFeed(..., provenance=True)` the attach asks the daemon to record, per
published batch, what its documents are cut from (producer/slot_provenance.py). `next()`
keeps only which batch it returned (`Delivered`: the link, hence the daemon's stream
and ring, and the seq); `last_provenance()` asks the daemon for that batch's record
(`provenance {stream, seq, ring}`, on a socket of its own: the link thread's is busy
with batches) and checks it (`parse`): the frame is untrusted, so every index must be
in range, every span non-empty, and the spans must cover the window's tokens exactly;
a bad record raises ProtocolError before any value from it is used.
`BatchProvenance.rows()` turns it into what `tokenfeed explain --json` prints for the
same batch: B rows, each a list of segments `{"source", "file", "row_group", "row",
"start", "end"}` (tokens start:end of the document's [BOS] + encode_ordinary(text)).
So a batch costs `next()` one small object, the daemon a few reference stores, and the
record is cut, sent and checked only for the batches asked about.

Record layout (a little-endian int64 array as msgpack bin):

    files  [[source, file name], ...]
    spans  (k, 5)  index into files, row group, row, start, end: the window's tokens in
                   order (concat: row r is window tokens rT..rT+T; best fit r(T+1)..)

Failure behaviour: `parse` raises ProtocolError naming what is wrong; a record the
daemon could not send or no longer keeps (`{"unavailable": why}`), or a batch whose
daemon or stream is gone since (the feed re-attached), gives ConfigError naming
`tokenfeed explain` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenfeed.common.control import request
from tokenfeed.common.errors import ConfigError, ProtocolError, StateMismatchError

MAX_FILES = 1 << 16
MAX_DOCUMENT_TOKENS = 1 << 40  # a document's token offsets: far above any real document
_FIELDS = ("files", "spans")


@dataclass(frozen=True)
class BatchProvenance:
    """A batch's spans, checked; `rows()` gives them as explain's rows."""

    files: list[tuple[str, str]]
    spans: np.ndarray  # (k, 5): file index, row group, row, start, end; in window order
    batch_size: int
    seq_len: int
    packing: str  # "concat" (rows overlap by one token) or "bestfit" (B rows of T+1)
    unavailable: str | None = None

    def rows(self) -> list[list[dict[str, Any]]]:
        """B rows: row r covers inputs[r] + targets[r][-1], its segments in order, one per
        run of consecutive tokens of a document (explain's rule)."""
        if self.unavailable is not None:
            raise ConfigError(
                f"the daemon recorded no provenance for this batch ({self.unavailable}); "
                "list it with `tokenfeed explain` from the state before it")
        b, t, spans = self.batch_size, self.seq_len, self.spans
        width = t + 1 if self.packing == "bestfit" else t  # where row r starts
        lo = np.arange(b, dtype=np.int64) * width
        hi = lo + t + 1
        start, end = spans[:, 3], spans[:, 4]
        ends = np.cumsum(end - start)  # window position after each span
        begins = ends - (end - start)
        first = np.searchsorted(ends, lo, side="right")  # row r: spans first[r]..
        counts = np.searchsorted(begins, hi, side="left") - first
        row = np.repeat(np.arange(b), counts)
        span = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - first,
                                                        counts)
        s = start[span] + np.maximum(lo[row] - begins[span], 0)
        e = end[span] - np.maximum(ends[span] - hi[row], 0)
        doc = spans[span, :3]
        keep = np.ones(len(s), dtype=bool)  # neighbours of one document, consecutive: one
        keep[1:] = (doc[1:] != doc[:-1]).any(axis=1) | (s[1:] != e[:-1]) | (row[1:] != row[:-1])
        heads = np.flatnonzero(keep)
        last = np.append(heads[1:], len(s)) - 1
        files = self.files
        out: list[list[dict[str, Any]]] = [[] for _ in range(b)]
        for r, (f, rg, rw), a, z in zip(row[heads].tolist(), doc[heads].tolist(),
                                        s[heads].tolist(), e[last].tolist(), strict=True):
            out[r].append({"source": files[f][0], "file": files[f][1], "row_group": rg,
                           "row": rw, "start": a, "end": z})
        return out


def parse(record: Any, batch_size: int, seq_len: int, packing: str) -> BatchProvenance:
    """A `ready`'s provenance field, checked against the batch shape: its spans must
    cover the window's tokens exactly (B*T+1 concat, B*(T+1) best fit)."""
    shape = (batch_size, seq_len, packing)
    if isinstance(record, dict) and set(record) == {"unavailable"}:
        why = record["unavailable"]
        if not isinstance(why, str):
            raise ProtocolError("provenance field 'unavailable' is not a string")
        return BatchProvenance([], np.zeros((0, 5), dtype=np.int64), *shape, why[:500])
    if not isinstance(record, dict) or set(record) != set(_FIELDS):
        raise ProtocolError(f"provenance record is not a map of {', '.join(_FIELDS)}")
    files = record["files"]
    if not isinstance(files, list) or len(files) > MAX_FILES or not all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(s, str) for s in f)
            for f in files):
        raise ProtocolError("provenance field 'files' is not a list of [source, file]")
    raw = record["spans"]
    if not isinstance(raw, bytes) or not raw or len(raw) % 40:
        raise ProtocolError("provenance field 'spans' is not int64 rows of 5")
    spans = np.frombuffer(raw, dtype="<i8").reshape(-1, 5)
    if (spans[:, :4] < 0).any() or (spans[:, 0] >= len(files)).any():
        raise ProtocolError("provenance names a file, row or token outside its table")
    lengths = spans[:, 4] - spans[:, 3]
    if (lengths <= 0).any() or (spans[:, 4] > MAX_DOCUMENT_TOKENS).any():
        raise ProtocolError("provenance holds an empty or oversized span")
    window = batch_size * (seq_len + 1) if packing == "bestfit" else batch_size * seq_len + 1
    if int(lengths.sum()) != window:
        raise ProtocolError(f"provenance spans cover {int(lengths.sum())} tokens, not the "
                            f"window's {window}")
    return BatchProvenance([(s, f) for s, f in files], spans, *shape)


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


REQUEST_TIMEOUT_S = 5.0  # a daemon busy on a loaded node may take seconds to answer


@dataclass(slots=True)
class Delivered:
    """The batch `next()` returned last: the link that delivered it and its seq; its
    record once fetched and checked."""

    link: Any  # consumer/link.py Link: run_dir, stream_id, ring, transfer's batch shape
    seq: int
    got: BatchProvenance | None = field(default=None)


def fetch(delivered: Delivered) -> BatchProvenance:
    """The daemon's record of `delivered`, checked against the batch shape."""
    link = delivered.link
    reply = request(Path(link.run_dir), "provenance", timeout_s=REQUEST_TIMEOUT_S,
                    stream=link.stream_id, seq=delivered.seq, ring=link.ring.segment.name)
    return parse(reply.get("record"), link.transfer.B, link.transfer.T, link.transfer.packing)


def last_rows(enabled: bool, last: Delivered | None, link: Any
              ) -> list[list[dict[str, Any]]] | None:
    """TokenFeed.last_provenance(): `last` was delivered by `last.link`; `link` is the
    feed's link now."""
    if not enabled:
        raise ConfigError("last_provenance() needs TokenFeed(..., provenance=True); or list "
                          "any batch offline with `tokenfeed explain`")
    if last is None:
        return None
    if last.got is None:
        if last.link is not link:
            raise ConfigError(
                f"batch {last.seq}'s record stayed with the daemon stream that delivered it, "
                "which this feed has left since (a re-attach or a new round); list the batch "
                "with `tokenfeed explain` from the state before it")
        last.got = fetch(last)
    return last.got.rows()
