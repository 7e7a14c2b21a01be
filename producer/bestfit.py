"""Best-fit packing: each slot is B rows of T+1 tokens, every row starting at a BOS.

This is nanochat's BOS-aligned best-fit loader, with one change: a cropped tail
goes back into the buffer instead of being thrown away.

The rank's document stream is concat's (units in order, each document BOS first).
Before every placement the buffer is refilled, in stream order, to `buffer_docs`
pieces; with `r` tokens left in the current row, the packer places

- the LONGEST buffered piece of length <= r, whole (ties: the one that entered
  the buffer first); or, if none fits,
- the first r tokens of the SHORTEST piece (ties: the earliest). The rest of it,
  when at least `min_tail` tokens long, re-enters the buffer (as the newest piece)
  prefixed with the document's BOS; a shorter rest is discarded (`tokens_cropped`).

Rows are always full. Share of the tokens read that is discarded, T=2048, B=32,
1000 pieces, on the sample corpus (`sample_documents(4_000_000)`, cl100k, read 40
times over) and on a synthetic stream of lognormal lengths (median 600 tokens,
sigma 1), which reproduces nanochat's ~35% on FineWeb-Edu:

    min_tail                    None (nanochat)  1       32      128     512
    sample corpus, 21M tokens   21.7%            0.00%   0.09%   0.95%   4.3%
    lognormal, 150M tokens      31.9%            0.00%   0.03%   0.45%   4.6%

(nanochat's rule reaches 34.5% at 600M lognormal tokens.) With tails kept, 29%
(sample) to 40% (lognormal) of the delivered tokens come from tails (a BOS, then
a document's middle): the price of keeping them. `min_tail` = 32
(DEFAULT_MIN_TAIL) keeps all but 0.1% of the tokens, keeps pieces of under 33
tokens out of the buffer, and holds a tail's extra BOS under 3% of its tokens.

Position (JSON, the state right after the last window):

    {"unit": u, "doc": d,                      # next document to read from the stream
     "buffer": [u0, d0, s0, t0, u1, ...]}      # buffer pieces in the order they entered

A piece is document `d_i` of unit `u_i` from token `s_i` of that document on;
`t_i` = 1 marks a tail (a BOS, then document tokens `s_i..`), which is exactly
`s_i > 0`. `(u, d)` is never `d == documents in u` (that is `(u + 1, 0)`), so a
position depends only on the windows cut, never on how far ahead units were
pushed. About 20 bytes per piece: < 32 KB of JSON for 1000 pieces.

Resume: the packer starts at the earliest unit the position names (`next_unit`),
resolves the buffer's references as those units are pushed and reads documents
again from `(u, d)`; `needs_unit` tells which units in between it ignores. Pieces
longer than a row leave the buffer only when cropped as the shortest, so the
buffer keeps the longest documents it has seen and its oldest reference trails
the read position by the whole run (measured: all 600 units of a synthetic run).
Each piece therefore owns a copy of its document's tokens: a unit's array is
dropped once all its documents entered the buffer, and memory is the buffer's
tokens plus the units not yet read, whatever the pieces' ages.

Readiness: `ready()` packs the next window in place into a scratch array and
says True once all B rows are placed; `fill()` copies it out and only then moves
`position`. When the pushed documents run out mid-window, the packing pauses (a
generator) and continues after the next `push`, exactly as if the documents had
been there all along: pushes only append. `buffered_tokens` counts the tokens of
pushed documents not yet in the buffer; while the packing is paused it is
NEGATIVE, an estimate of the tokens still lacking, since pushed tokens do not
measure readiness here (one long document can outweigh a window yet supply only
one of the refills it needs; the first window needs `buffer_docs` documents). The
stream then keeps a pool's worth of units in flight instead of one per loop tick
(tests: 20-36 s -> 2-4 s to the first window on the test corpus).

Speed: 70-85M tokens/s on the sample corpus (T=2048, B=32, one core), ~3% of the
time `encode_ordinary` takes for the same tokens (2.3M tokens/s).

Failure behaviour: a malformed position raises `StateMismatchError` at
construction; a reference that the pushed data cannot hold (a document or offset
past the end) raises it from `push`.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from tokenfeed.common.errors import ConfigError, StateMismatchError

DEFAULT_BUFFER_DOCS = 1000  # nanochat's buffer_size
# Tails shorter than this are dropped; see the module docstring for the measurement.
DEFAULT_MIN_TAIL = 32
_EMPTY = np.zeros(0, dtype=np.int64)
_LAST = sys.maxsize  # sorts after every insertion counter in a (length, counter) key

# A buffer piece: (document tokens, BOS first, owned; start; tail 0/1; unit; doc). A
# tuple, not a dataclass: ~100k are made per second and a tuple is 5x cheaper.
Piece = tuple[np.ndarray, int, int, int, int]
_REF = itemgetter(3, 4, 1, 2)  # a piece's reference in a position: unit, doc, start, tail


@dataclass(slots=True)
class _Unit:
    unit: int
    tokens: np.ndarray
    bounds: list[int]  # document i is tokens[bounds[i]:bounds[i + 1]]
    docs: int
    next_doc: int  # first document not yet read


def _parse_start(start: dict[str, Any], buffer_docs: int) -> tuple[int, int, list[int]]:
    unit: Any = start.get("unit")
    doc: Any = start.get("doc", 0)
    flat: Any = start.get("buffer", [])

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not (is_count(unit) and is_count(doc) and isinstance(flat, list)):
        raise StateMismatchError(
            f"bestfit position lacks non-negative integers 'unit' and 'doc' and a list "
            f"'buffer' (got unit={unit!r}, doc={doc!r}, buffer of type {type(flat).__name__})"
        )
    if len(flat) % 4 or len(flat) // 4 > buffer_docs or not all(map(is_count, flat)):
        raise StateMismatchError(
            f"bestfit position's buffer must be at most {buffer_docs} pieces of 4 non-negative "
            f"integers (unit, doc, start, tail); got {len(flat)} values"
        )
    seen = set()
    for i in range(0, len(flat), 4):
        u, d, s, t = flat[i : i + 4]
        if t != (s > 0) or (u, d) >= (unit, doc) or (u, d) in seen:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i // 4} = {flat[i:i + 4]} is inconsistent: "
                f"tail must be 1 exactly when start > 0, each document may appear once and "
                f"must come before the next document to read ({unit}, {doc})"
            )
        seen.add((u, d))
    return int(unit), int(doc), [int(v) for v in flat]


class BestFitPacker:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        start: dict[str, Any] | None = None,
        *,
        buffer_docs: int = DEFAULT_BUFFER_DOCS,
        min_tail: int | None = DEFAULT_MIN_TAIL,
    ) -> None:
        if buffer_docs < 1:
            raise ConfigError(f"buffer_docs={buffer_docs} must be >= 1")
        if min_tail is not None and min_tail < 1:
            raise ConfigError(f"min_tail={min_tail} must be >= 1, or None to discard every tail")
        self.batch_size = batch_size
        self.row_tokens = seq_len + 1
        self.window_tokens = batch_size * self.row_tokens
        self.buffer_docs = buffer_docs
        self.min_tail = sys.maxsize if min_tail is None else min_tail
        unit, doc, flat = _parse_start(start or {"unit": 0}, buffer_docs)
        self._read = (unit, doc)  # next document to read
        # The buffer: pieces by insertion counter (dict order is buffer order) and a
        # sorted index of (length, counter) keys for O(log n) best-fit and shortest lookups.
        self._pieces: dict[int, Piece] = {}
        self._keys: list[tuple[int, int]] = []
        self._unresolved: dict[int, list[int]] = {}  # unit -> counters of pieces it holds
        for c, i in enumerate(range(0, len(flat), 4)):
            u, d, s, t = flat[i : i + 4]
            self._pieces[c] = (_EMPTY, s, t, u, d)
            self._unresolved.setdefault(u, []).append(c)
        self._counter = len(self._pieces)
        self._pending: deque[_Unit] = deque()  # pushed units with documents still to read
        self._pending_tokens = 0
        self.next_unit = min([unit, *self._unresolved])
        self.buffered_tokens = 0
        self.tokens_packed = 0
        self.tokens_cropped = 0  # cut off and discarded (tails under min_tail)
        self.tokens_from_tails = 0  # delivered in re-entered tails, their BOS included
        self._window_stats = [0, 0]  # cropped, from tails: of the window being packed
        self._seen = [0, 0, 0]  # units, documents, tokens pushed: means for estimates
        self._scratch = np.empty(self.window_tokens, dtype=np.int64)
        self._packing: Iterator[bool] | None = None  # packs windows into _scratch
        self._window_ready = False
        self._starved = False  # the packing waits for documents no push has brought yet
        self.position: dict[str, Any] = self._position()

    # -- input --------------------------------------------------------------

    def push(self, unit: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        assert unit == self.next_unit, (unit, self.next_unit)
        self.next_unit += 1
        bounds = [*doc_starts.tolist(), len(tokens)]
        docs = len(bounds) - 1
        for c in self._unresolved.pop(unit, []):
            _, start, tail, u, d = self._pieces[c]
            if d >= docs or bounds[d] + start >= bounds[d + 1]:
                raise StateMismatchError(
                    f"bestfit position names document {d} from token {start} of unit {unit}, "
                    f"which holds {docs} documents there; the state belongs to other data"
                )
            data = tokens[bounds[d] : bounds[d + 1]].copy()
            self._pieces[c] = (data, start, tail, u, d)
            insort(self._keys, (len(data) - start + tail, c))
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

    def fill(self, out: np.ndarray) -> dict[str, Any]:
        """Write the next window into `out`; return the position right after it."""
        if not self.ready():
            raise RuntimeError("fill() called while ready() is False")
        out[:] = self._scratch
        self._window_ready = False
        self.tokens_packed += self.window_tokens
        self.tokens_cropped += self._window_stats[0]
        self.tokens_from_tails += self._window_stats[1]
        self._window_stats[:] = [0, 0]  # in place: the packing generator holds this list
        self.position = self._position()
        return self.position

    def _starve(self, lacking_tokens: int) -> None:
        self._starved = True
        self.buffered_tokens = -max(lacking_tokens, 1)

    def _pack(self) -> Iterator[bool]:
        """Pack windows into _scratch, in place: yield True when one is complete (the
        caller fills before resuming), False while documents are lacking (the caller
        pushes before resuming). Nothing here is undone: pushes only append units, so a
        paused window continues exactly as if the documents had been there all along.
        """
        keys, pieces, pending = self._keys, self._pieces, self._pending
        out, cap, min_tail = self._scratch, self.row_tokens, self.min_tail
        buffer_docs = self.buffer_docs
        stats = self._window_stats
        while True:
            for row_start in range(0, self.window_tokens, cap):
                pos = 0
                while pos < cap:
                    while len(keys) < buffer_docs:  # refill, in stream order
                        while not pending:
                            _, docs, tokens = self._seen
                            lacking = buffer_docs - len(keys)
                            self._starve(lacking * (tokens // max(docs, 1))
                                         + self.window_tokens - row_start - pos)
                            yield False
                        u = pending[0]
                        d = u.next_doc
                        lo, hi = u.bounds[d], u.bounds[d + 1]
                        c = self._counter
                        self._counter = c + 1
                        pieces[c] = (u.tokens[lo:hi].copy(), 0, 0, u.unit, d)
                        insort(keys, (hi - lo, c))
                        self._pending_tokens -= hi - lo
                        u.next_doc = d = d + 1
                        if d == u.docs:
                            pending.popleft()  # drop the unit's array: its docs are copied
                            self._read = (u.unit + 1, 0)
                        else:
                            self._read = (u.unit, d)
                        del u  # a paused generator must not keep a read unit's array alive
                    room = cap - pos
                    i = bisect_right(keys, (room, _LAST)) - 1
                    if i >= 0:  # the longest piece that fits, the earliest of that length
                        take = keys[i][0]
                        if i and keys[i - 1][0] == take:
                            i = bisect_left(keys, (take, -1))
                        length = take
                    else:  # nothing fits: crop the shortest (earliest) piece to the room left
                        i, take = 0, room
                        length = keys[0][0]
                    data, start, tail, unit, doc = pieces.pop(keys.pop(i)[1])
                    at = row_start + pos
                    if tail:
                        stats[1] += take
                        out[at] = data[0]
                        out[at + 1 : at + take] = data[start : start + take - 1]
                    else:
                        out[at : at + take] = data[start : start + take]
                    pos += take
                    rest = length - take
                    if rest >= min_tail:
                        c = self._counter
                        self._counter = c + 1
                        pieces[c] = (data, start + take - tail, 1, unit, doc)
                        insort(keys, (rest + 1, c))
                    else:
                        stats[0] += rest
            yield True

    # -- position -----------------------------------------------------------

    def _position(self) -> dict[str, Any]:
        flat = list(chain.from_iterable(map(_REF, self._pieces.values())))  # 3x a listcomp
        return {"unit": self._read[0], "doc": self._read[1], "buffer": flat}

    def resume_key(self, position: dict[str, Any]) -> tuple[Any, ...]:
        """The part of a cursor that defines where the stream continues."""
        flat = position.get("buffer")
        return (position.get("unit"), position.get("doc"),
                tuple(flat) if isinstance(flat, list) else flat)

    def needs_unit(self, unit: int) -> bool:
        """False for a unit pushed only to reach the read position (resuming) that holds
        none of the buffer's pieces: its content is ignored, so it may be pushed empty."""
        return unit >= self._read[0] or unit in self._unresolved

    def stats(self) -> dict[str, Any]:
        return {"tokens_packed": self.tokens_packed, "tokens_cropped": self.tokens_cropped,
                "tokens_from_tails": self.tokens_from_tails, "buffer_pieces": len(self._pieces)}
