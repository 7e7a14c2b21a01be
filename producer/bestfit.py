"""Best-fit packing: each slot is B rows of T+1 tokens, every row starting at a BOS.

This is nanochat's BOS-aligned best-fit loader, with two changes: a cropped tail
goes back into the buffer instead of being thrown away, and no piece stays in the
buffer for more than `max_age_docs` documents.

The rank's document stream is concat's (units in order, each document BOS first).
`docs_read` counts the documents read from it into the buffer; a piece's `born` is
the `docs_read` before its document was read (the document's index in the stream;
a tail keeps its document's). Before every placement the buffer is refilled, in
stream order, to `buffer_docs` pieces; with `r` tokens left in the current row,
the packer places

- if the OLDEST piece (least born; ties: the one that entered the buffer first)
  has docs_read - born > `max_age_docs`: that piece, whole if it fits, else its
  first r tokens (its rest handled as below); otherwise
- the LONGEST buffered piece of length <= r, whole (ties: the earliest); or, if
  none fits,
- the first r tokens of the SHORTEST piece (ties: the earliest). The rest of a
  cropped piece, when at least `min_tail` tokens long, re-enters the buffer (as
  the newest piece, keeping its born) prefixed with the document's BOS; a shorter
  rest is discarded (`tokens_cropped`).

The age rule bounds how far back a position's references reach (and so a resume):
every buffered document is among the last max(max_age_docs + 1, buffer_docs) read.
None means 8 * buffer_docs (DEFAULT_MAX_AGE_DOCS = 8000 for the default buffer).

Rows are always full. What each setting discards, how the age rule trades best fit for
a bounded resume, and why `min_tail` = 32 (DEFAULT_MIN_TAIL): docs/best-fit.md.

Position (position/packed.py's BestFitPosition, right after the last window): the next
document to read `(u, d)`, the documents read into the buffer so far, and the buffer's
pieces, compact (bestfit_codec.py; their references kept in bestfit_refs.py's table).
`(u, d)` is never `d == documents in u` (that is `(u + 1, 0)`), so a position is
canonical and depends only on the windows cut, never on how far ahead units were pushed.

Resume: the packer starts at the earliest unit the position names (`next_unit`),
resolves the buffer's references as those units are pushed and reads on from `(u, d)`;
units in between that hold no piece are pushed empty, untokenized (supply.py).

Memory: documents are copied into 64 KiB chunks as they enter the buffer, so a unit's
array is dropped once read; a chunk is freed with its last piece. Readiness: `ready()`
packs the next window into a scratch array (a generator that pauses when the pushed
documents run out, `lacking_tokens` estimating what it lacks, and goes on after the next
`push`); `fill()` copies it out and only then moves `position`.

A reference the pushed data cannot hold (a document or offset past the end) raises
`StateMismatchError` from `push`. Measurements (discarded tokens, resume lags, memory,
speed): docs/best-fit.md.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import Any

import numpy as np

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer import bestfit_codec
from tokenfeed.producer.bestfit_refs import RefTable
from tokenfeed.producer.position import BestFitPosition

DEFAULT_BUFFER_DOCS = 1000  # nanochat's buffer_size
# Tails shorter than this are dropped; docs/best-fit.md has the measurement.
DEFAULT_MIN_TAIL = 32
# max_age_docs=None means this many buffers' worth of documents; see the docstring.
_AGE_BUFFERS = 8
DEFAULT_MAX_AGE_DOCS = _AGE_BUFFERS * DEFAULT_BUFFER_DOCS
# Buffered documents' tokens are copied into chunks of this many bytes, under glibc's
# mmap threshold (128 KiB): a chunk freed (its last piece placed) is reused from the
# heap, where large arrays come back as pages written for the first time, which cost
# more than the copy (40 MB: ~5 ms, up to ~140 ms where the host backs them late).
_CHUNK_BYTES = 1 << 16
_NO_TOKENS = memoryview(b"")  # the packing loop's unit tokens while it reads none
# A (length or born, insertion counter) pair as one int: first << _SHIFT | counter.
_SHIFT = 40  # counters stay below 2**40: a piece a document or tail, ~10^12 of them
_COUNTER = (1 << _SHIFT) - 1

# A buffer piece: (the chunk holding its tokens; start; tail 0/1; unit; doc; born;
# offset of its next token in the chunk; end; the document's BOS, for a tail). Its
# tokens are chunk[offset:end] (a tail: the BOS first, then those), document tokens
# start.. of (unit, doc). A tuple, not a dataclass: ~100k are made per second and a
# tuple is 5x cheaper.
Piece = tuple[memoryview, int, int, int, int, int, int, int, int]


@dataclass(slots=True)
class _Unit:
    unit: int
    tokens: np.ndarray
    bounds: list[int]  # document i is tokens[bounds[i]:bounds[i + 1]]
    docs: int
    next_doc: int  # first document not yet read


class BestFitPacker:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        start: BestFitPosition | None = None,
        *,
        buffer_docs: int = DEFAULT_BUFFER_DOCS,
        min_tail: int | None = DEFAULT_MIN_TAIL,
        max_age_docs: int | None = None,
    ) -> None:
        if buffer_docs < 1:
            raise ConfigError(f"buffer_docs={buffer_docs} must be >= 1")
        if min_tail is not None and min_tail < 1:
            raise ConfigError(f"min_tail={min_tail} must be >= 1, or None to discard every tail")
        if max_age_docs is not None and max_age_docs < 0:
            raise ConfigError(
                f"max_age_docs={max_age_docs} must be >= 0, or None for "
                f"{_AGE_BUFFERS} * buffer_docs"
            )
        self.batch_size = batch_size
        self.row_tokens = seq_len + 1
        self.window_tokens = batch_size * self.row_tokens
        self.buffer_docs = buffer_docs
        self.min_tail = sys.maxsize if min_tail is None else min_tail
        self.max_age_docs = _AGE_BUFFERS * buffer_docs if max_age_docs is None else max_age_docs
        if start is None:
            start = BestFitPosition(0, 0, 0, "", 0)
        if len(start.pieces) > buffer_docs:
            raise StateMismatchError(
                f"bestfit position holds {len(start.pieces)} pieces, more than this stream's "
                f"buffer_docs={buffer_docs}; resume with the batch settings it was saved with")
        unit, doc, docs_read = start.unit, start.doc, start.docs_read
        self._read = (unit, doc)  # next document to read
        self._docs_read = docs_read  # documents the stream has put into the buffer
        # The buffer: pieces by insertion counter (dict order is buffer order), a sorted
        # index of (length, counter) keys for O(log n) best-fit and shortest lookups, and a
        # heap of (born, counter) for the oldest piece (entries of pieces gone are skipped
        # when they surface, and the heap is rebuilt when they pass 3 buffers' worth).
        # Both pairs are packed into one int, `first << _SHIFT | counter`: they order as
        # the tuples do, and bisect and heapq compare ints ~3x faster than tuples.
        self._pieces: dict[int, Piece] = {}
        self._keys: list[int] = []
        self._ages: list[int] = []
        self._unresolved: dict[int, list[int]] = {}  # unit -> counters of pieces it holds
        for c, (u, d, s, born) in enumerate(start.pieces):
            self._pieces[c] = (_NO_TOKENS, s, int(s > 0), u, d, born, 0, 0, 0)  # at its push
            self._ages.append(born << _SHIFT | c)
            self._unresolved.setdefault(u, []).append(c)
        heapify(self._ages)
        self._counter = len(self._pieces)
        # Every piece's reference, for the position: one numpy index a window (bestfit_refs.py)
        self._refs = RefTable(buffer_docs, start.pieces)
        self._pending: deque[_Unit] = deque()  # pushed units with documents still to read
        self._pending_tokens = 0
        self.next_unit = min([unit, *self._unresolved])
        self.buffered_tokens = 0
        self.lacking_tokens = 0
        self.tokens_packed = 0
        self.tokens_cropped = 0  # cut off and discarded (tails under min_tail)
        self.tokens_from_tails = 0  # delivered in re-entered tails, their BOS included
        self.tokens_by_age = 0  # placed by the age rule instead of best fit
        self._window_stats = [0, 0, 0]  # cropped, from tails, by age: of the window being packed
        self._seen = [0, 0, 0]  # units, documents, tokens pushed: means for estimates
        # The window being packed, in the pushed tokens' dtype (set by the first push), so
        # placing a piece and filling a slot are plain copies, not conversions.
        self._scratch = np.empty(self.window_tokens, dtype=np.uint16)
        self._scratch_set = False
        # Buffered documents' tokens, copied out of their units as they enter (a unit's
        # array is dropped once read) into the chunk being filled (up to _chunk_top), in
        # the scratch's dtype: placing a piece is one memoryview copy.
        self._chunk = _NO_TOKENS
        self._chunk_top = 0
        self._packing: Iterator[bool] | None = None  # packs windows into _scratch
        self._window_ready = False
        self._starved = False  # the packing waits for documents no push has brought yet
        # each placement's length, in window order, when set (slot_provenance.py's replays;
        # the pieces placed are the position's table's: bestfit_refs.py)
        self.takes: array[int] | None = None
        self.position = self._position()

    # -- input --------------------------------------------------------------

    def push(self, unit: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        assert unit == self.next_unit, (unit, self.next_unit)
        self.next_unit += 1
        if len(tokens) and (not self._scratch_set or not np.can_cast(
                tokens.dtype, self._scratch.dtype, "safe")):
            self._widen_scratch(tokens.dtype)
        # the scratch's dtype (the same but for an empty unit), contiguous: for memoryviews
        tokens = np.ascontiguousarray(tokens, dtype=self._scratch.dtype)
        bounds = [*doc_starts.tolist(), len(tokens)]
        docs = len(bounds) - 1
        for c in self._unresolved.pop(unit, []):
            _, start, tail, u, d, born, _, _, _ = self._pieces[c]
            if d >= docs or bounds[d] + start >= bounds[d + 1]:
                raise StateMismatchError(
                    f"bestfit position names document {d} from token {start} of unit {unit}, "
                    f"which holds {docs} documents there; the state belongs to other data"
                )
            lo, hi = bounds[d] + start, bounds[d + 1]
            own = tokens[lo:hi].copy()  # a resumed piece: an array of its own
            self._pieces[c] = (own.data, start, tail, u, d, born, 0, hi - lo,
                               int(tokens[bounds[d]]))
            insort(self._keys, (hi - lo + tail) << _SHIFT | c)
        read_unit, read_doc = self._read
        if unit >= read_unit:
            first = read_doc if unit == read_unit else 0
            if first > docs:
                raise StateMismatchError(
                    f"bestfit position reads on at document {first} of unit {unit}, which "
                    f"holds {docs}; the state belongs to other data"
                )
            if first < docs:
                self._pending.append(_Unit(unit, tokens, bounds, docs, first))
                self._pending_tokens += len(tokens) - bounds[first]
        self._seen[0] += 1
        self._seen[1] += docs
        self._seen[2] += len(tokens)
        self._starved = False
        self.buffered_tokens = self._pending_tokens
        self.lacking_tokens = 0

    # -- output -------------------------------------------------------------

    def ready(self) -> bool:
        """True when the next window is packed into the scratch array."""
        if self._window_ready:
            return True
        if self._starved:
            return False
        if self._unresolved:  # resuming: the units up to the read position are due first
            units, _, tokens = self._seen
            per_unit = tokens // units if units else self.window_tokens
            self._starve((self._read[0] - self.next_unit + 1) * per_unit)
            return False
        if self._packing is None:
            self._packing = self._pack()
        self._window_ready = next(self._packing)
        if not self._window_ready:
            return False
        self.buffered_tokens = self._pending_tokens
        return True

    def fill(self, out: np.ndarray) -> BestFitPosition:
        """Write the next window into `out`; return the position right after it."""
        if not self.ready():
            raise RuntimeError("fill() called while ready() is False")
        out[:] = self._scratch
        self._window_ready = False
        self.tokens_packed += self.window_tokens
        self.tokens_cropped += self._window_stats[0]
        self.tokens_from_tails += self._window_stats[1]
        self.tokens_by_age += self._window_stats[2]
        self._window_stats[:] = [0, 0, 0]  # in place: the packing generator holds this list
        self.position = self._position()
        return self.position

    def _widen_scratch(self, dtype: np.dtype[Any]) -> None:
        """Pack into `dtype` from now on: the first push's, or one wide enough for both."""
        dtype = dtype if not self._scratch_set else np.promote_types(self._scratch.dtype, dtype)
        scratch = np.empty(self.window_tokens, dtype=dtype)
        scratch[:] = self._scratch  # a paused window keeps what it placed
        self._scratch, self._scratch_set = scratch, True
        for u in self._pending:
            u.tokens = u.tokens.astype(dtype)
        converted: dict[int, tuple[Any, memoryview]] = {}  # each chunk once (kept alive)
        for c, (held, start, tail, unit, doc, born, off, end, bos) in self._pieces.items():
            if len(held):
                if id(held.obj) not in converted:
                    converted[id(held.obj)] = (held.obj, np.asarray(held.obj).astype(dtype).data)
                self._pieces[c] = (converted[id(held.obj)][1], start, tail, unit, doc, born, off,
                                   end, bos)
        self._chunk, self._chunk_top = _NO_TOKENS, 0  # a new chunk, in the new dtype

    def _starve(self, lacking_tokens: int) -> None:
        self._starved = True
        self.buffered_tokens = 0
        self.lacking_tokens = max(lacking_tokens, 1)

    def _pack(self) -> Iterator[bool]:
        """Pack windows into _scratch, in place: yield True when one is complete (the
        caller fills before resuming), False while documents are lacking (the caller
        pushes before resuming). Nothing here is undone: pushes only append units, so a
        paused window continues exactly as if the documents had been there all along.

        The read cursor (the unit being read, its next document, `_docs_read`,
        `_counter`, the chunk being filled and the tokens read) lives in locals while
        packing and is written back before every yield; the arrays a push may widen
        (scratch, chunk, the unit's tokens) are looked up again after one. ~93 placements
        and ~66 documents read a window: attribute accesses and numpy calls were most of
        their cost, so tokens move as memoryview slices.
        """
        keys, pieces, ages, pending = self._keys, self._pieces, self._ages, self._pending
        new_refs, gone = self._refs.new, self._refs.gone
        cap, min_tail = self.row_tokens, self.min_tail
        buffer_docs, max_age_docs = self.buffer_docs, self.max_age_docs
        ages_cap = 4 * buffer_docs  # rebuilt from the buffer past this: O(1) amortized
        shift, mask = _SHIFT, _COUNTER
        docs_read, counter = self._docs_read, self._counter
        stats = self._window_stats
        record = self.takes.append if self.takes is not None else None
        # the unit being read: its record, tokens, bounds, number, next and last document
        ru: _Unit | None = None
        rtok = _NO_TOKENS
        rbounds: list[int] = []
        runit = rdoc = rend = 0
        taken = 0  # tokens read into the buffer since the last write-back
        # The age rule: the oldest piece's born and the docs_read past which it is too old,
        # -1 until looked up again (after it left): only then is the heap looked at.
        oldest = age_limit = -1
        while True:
            # after a yield: what a push may have widened (scratch, chunk, unit tokens)
            out, dtype = self._scratch.data, self._scratch.dtype
            chunk, top = self._chunk, self._chunk_top
            chunk_end = len(chunk)
            chunk_tokens = _CHUNK_BYTES // dtype.itemsize
            long_doc = chunk_tokens // 4  # longer documents get an array of their own
            if ru is not None:
                rtok = ru.tokens.data
            for row_end in range(cap, self.window_tokens + 1, cap):
                at = row_end - cap  # where the next piece goes
                while at < row_end:
                    while len(keys) < buffer_docs:  # refill, in stream order
                        if ru is None:
                            if not pending:
                                self._docs_read, self._counter = docs_read, counter
                                self._chunk, self._chunk_top = chunk, top
                                self._pending_tokens -= taken
                                taken = 0
                                _, docs, tokens = self._seen
                                lacking = buffer_docs - len(keys)
                                self._starve(lacking * (tokens // max(docs, 1))
                                             + self.window_tokens - at)
                                yield False
                                out, dtype = self._scratch.data, self._scratch.dtype
                                chunk, top = self._chunk, self._chunk_top
                                chunk_end = len(chunk)
                                chunk_tokens = _CHUNK_BYTES // dtype.itemsize
                                long_doc = chunk_tokens // 4
                                continue
                            ru = pending[0]
                            rtok, rbounds, runit = ru.tokens.data, ru.bounds, ru.unit
                            rdoc, rend = ru.next_doc, ru.docs
                            # counted as read now; a write-back gives back what is left
                            taken += rbounds[rend] - rbounds[rdoc]
                        lo = rbounds[rdoc]
                        n = rbounds[rdoc + 1] - lo
                        if top + n < chunk_end:  # (never into the empty _NO_TOKENS)
                            chunk[top : top + n] = rtok[lo : lo + n]
                            pieces[counter] = (chunk, 0, 0, runit, rdoc, docs_read, top, top + n, 0)
                            top += n
                        else:  # a new chunk, or for a long document an array of its own
                            held = np.empty(chunk_tokens if n <= long_doc else n, dtype=dtype).data
                            held[:n] = rtok[lo : lo + n]
                            pieces[counter] = (held, 0, 0, runit, rdoc, docs_read, 0, n, 0)
                            if n <= long_doc:
                                chunk, top, chunk_end = held, n, len(held)
                        new_refs.extend((runit, docs_read - rdoc, 0, docs_read, counter))
                        insort(keys, n << shift | counter)
                        # its born is above every key's in the heap: appending keeps it one
                        ages.append(docs_read << shift | counter)
                        counter += 1
                        docs_read += 1
                        rdoc += 1
                        if rdoc == rend:  # drop the unit's array: its documents are copied
                            pending.popleft()
                            self._read = (runit + 1, 0)
                            ru, rtok = None, _NO_TOKENS
                    room = row_end - at
                    if len(ages) > ages_cap:  # under an old piece, entries of gone ones pile up
                        ages[:] = [piece[5] << shift | c for c, piece in pieces.items()]
                        heapify(ages)
                    if docs_read > age_limit:  # past the oldest's limit, or that is unknown
                        age = ages[0]
                        while age & mask not in pieces:  # entries of pieces gone since
                            heappop(ages)
                            age = ages[0]
                        oldest = age >> shift
                        age_limit = oldest + max_age_docs
                    if docs_read > age_limit:  # too old: the oldest (ages[0]) next
                        age_limit = -1
                        heappop(ages)
                        gone.append(age & mask)
                        held, start, tail, unit, doc, born, off, end, bos = pieces.pop(age & mask)
                        length = end - off + tail
                        del keys[bisect_left(keys, length << shift | age & mask)]
                        take = min(length, room)
                        stats[2] += take
                    else:
                        i = bisect_right(keys, room << shift | mask) - 1
                        if i >= 0:  # the longest piece that fits, the earliest of that length
                            take = keys[i] >> shift
                            if i and keys[i - 1] >> shift == take:
                                i = bisect_left(keys, take << shift)
                            length = take
                        else:  # nothing fits: crop the shortest (earliest) piece to the room
                            i, take = 0, room
                            length = keys[0] >> shift
                        c = keys.pop(i) & mask
                        gone.append(c)
                        held, start, tail, unit, doc, born, off, end, bos = pieces.pop(c)
                        if born == oldest:  # (a tail of it keeps its born)
                            age_limit = -1
                    if tail:
                        stats[1] += take
                        out[at] = bos
                        out[at + 1 : at + take] = held[off : off + take - 1]
                    else:
                        out[at : at + take] = held[off : off + take]
                    if record is not None:
                        record(take)
                    at += take
                    rest = length - take
                    if rest >= min_tail:  # keeps the document's born: its age goes on
                        c = counter
                        counter += 1
                        pieces[c] = (held, start + take - tail, 1, unit, doc, born,
                                     off + take - tail, end, bos if tail else held[off])
                        new_refs.extend((unit, born - doc, start + take - tail, born, c))
                        insort(keys, (rest + 1) << shift | c)
                        heappush(ages, born << shift | c)
                    elif rest:
                        stats[0] += rest
            self._docs_read, self._counter = docs_read, counter
            self._chunk, self._chunk_top = chunk, top
            if ru is not None:
                ru.next_doc = rdoc
                self._read = (runit, rdoc)
                left = rbounds[rend] - rbounds[rdoc]
                self._pending_tokens -= taken - left
                taken = left
            else:
                self._pending_tokens -= taken
                taken = 0
            yield True

    # -- position -----------------------------------------------------------

    def _position(self) -> BestFitPosition:
        # Here, not later: packing runs ahead of the last window filled.
        refs = self._refs.alive()
        unit, docs_read = self._read[0], self._docs_read
        low = int(np.minimum.reduce(refs[:, 0])) if len(refs) else unit
        buffer = bestfit_codec.encode_rows(refs, unit, docs_read, low)
        return BestFitPosition(unit, self._read[1], docs_read, buffer, min(unit, low))

    def stats(self) -> dict[str, Any]:
        return {"tokens_packed": self.tokens_packed, "tokens_cropped": self.tokens_cropped,
                "tokens_from_tails": self.tokens_from_tails, "tokens_by_age": self.tokens_by_age,
                "buffer_pieces": len(self._pieces)}
