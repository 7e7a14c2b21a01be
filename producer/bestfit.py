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

Without the age rule, a piece longer than a row leaves only when cropped as the
shortest, so the buffer keeps the longest documents it has seen and its oldest
reference trails the read position by the whole run. With it, every buffered
document is among the last max(max_age_docs + 1, buffer_docs) read (tested, and
tight). max_age_docs < buffer_docs makes the packing first in, first out: the
oldest of buffer_docs pieces is always at least buffer_docs old. None means
8 * buffer_docs (DEFAULT_MAX_AGE_DOCS = 8000 for the default buffer).

Rows are always full. Share of the tokens read that is discarded, T=2048, B=32,
1000 pieces, on the sample corpus (`sample_documents(4_000_000)`, cl100k, read 40
times over, units of 16 documents) and on a synthetic stream of lognormal lengths
(median 600 tokens, sigma 1, units of 1000 documents), which reproduces nanochat's
~35% on FineWeb-Edu, without the age rule and with max_age_docs = 8000:

    min_tail                    None (nanochat)  1       32      128     512
    sample, 21M tokens, no age  21.7%            0.00%   0.09%   0.95%   4.3%
    sample, max age 8000        36.9%            0.00%   0.15%   1.30%   2.0%
    lognormal, 150M, no age     31.9%            0.00%   0.03%   0.45%   4.6%
    lognormal, max age 8000     31.4%            0.00%   0.09%   1.06%   4.4%

(nanochat's rule reaches 34.5% at 600M lognormal tokens.) With nanochat's rule the
age rule crops more pieces and drops their rests (sample: 21.7% -> 36.9%); with
tails kept it costs little. At max age 8000 and min_tail 32, 39% (sample) and 34%
(lognormal) of the delivered tokens come from tails (a BOS, then a document's
middle; 29% and 40% without the age rule), and 44% and 40% are placed by the age
rule (`tokens_by_age`): the long documents that best fit alone would keep. Smaller
ages cost more best fit on the sample corpus (min_tail 32; lag: see Resume):

    max_age_docs      2000    4000    8000    16000   none
    from tails        44%     43%     39%     34%     29%
    placed by age     58%     51%     44%     15%     0%
    resume lag        126     251     501     1002    1355 units (the whole run)

`min_tail` = 32 (DEFAULT_MIN_TAIL) keeps all but 0.2% of the tokens, keeps pieces
of under 33 tokens out of the buffer, and holds a tail's extra BOS under 3% of its
tokens.

Position (JSON, the state right after the last window):

    {"unit": u, "doc": d,     # next document to read from the stream
     "docs_read": n,          # documents read into the buffer so far
     "buffer": "AcgB..."}     # the buffer's pieces, in the order they entered (below)

A piece is document `b - z` of unit `v` from token `s` on, where `b` is its born
(a tail keeps its document's) and `z` the born of document 0 of `v`; `s > 0` marks
a tail (a BOS, then document tokens `s..`). `buffer` is one string, the integers

    P, V, K,                          # pieces, units holding them, tails
    n - b0, b1 - b0, ..., bP-1 - bP-2 # born of each piece: its age, then differences
    u - v0, n - z0, v1 - v0, z1 - z0, # units holding pieces, ascending, with z: back
      ...                             #   from (u, n), then differences
    i0, s0, i1, s1, ...               # the tails: index in the buffer, first token

as zigzag LEB128 varints in unpadded URL-safe base64. A piece belongs to the last
listed unit with `z <= b`. Every listed unit holds a piece, and `(u, d)` is never
`d == documents in u` (that is `(u + 1, 0)`), so a position is canonical and depends
only on the windows cut, never on how far ahead units were pushed. The integers are
ages and gaps, mostly under 128 (one byte each); after 1000 windows of 32 x 2049 with
1000 pieces, documents of FineWeb-Edu's length mix: 1.4 KB of JSON in units of 1000
documents, 2.6 KB in units of 16, 3.7 KB in units of 3 (`buffer_pieces` lists the
pieces). The worst case, every piece a deep tail of its own unit millions of units
and billions of documents in, is ~11 bytes a piece. A position is one line of JSON
however a caller indents it. Positions in the earlier form, `"buffer": [u0, d0, s0,
t0, b0, u1, ...]` (five integers a piece: unit, doc, start, tail 0/1, born), are
read too.

Resume: the packer starts at the earliest unit the position names (`next_unit`),
resolves the buffer's references as those units are pushed and reads documents
again from `(u, d)`; `needs_unit` tells which units in between it ignores (they
may be pushed empty, untokenized). By the age rule those units are at most the
ones spanned by the last max(max_age_docs + 1, buffer_docs) documents read.
Measured, the most units between `next_unit` and the read unit over the runs
above: sample 501 (8001 documents) against 1355, all of the run, without the age
rule; lognormal 9 (8001 documents) against 149, all of the run.
Each piece owns a copy of its document's tokens: a unit's array is dropped once
all its documents entered the buffer, and memory is the buffer's tokens plus the
units not yet read (views would keep the units of up to max_age_docs documents).

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
time `encode_ordinary` takes for the same tokens (2.3M tokens/s); the age rule's
heap costs nothing measurable (median of 7: 75M before it, 73M off, 79M at 8000).
The compact position costs ~0.3 ms a window of 1000 pieces (lognormal mix, units of
1000 documents: 67-79M tokens/s with the five-integer list, 47-54M with it).

Failure behaviour: a malformed position raises `StateMismatchError` at
construction; a reference that the pushed data cannot hold (a document or offset
past the end) raises it from `push`.
"""

from __future__ import annotations

import base64
import sys
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import chain, pairwise
from operator import itemgetter
from typing import Any

import numpy as np

from tokenfeed.common.config import MAX_POSITION
from tokenfeed.common.errors import ConfigError, StateMismatchError

DEFAULT_BUFFER_DOCS = 1000  # nanochat's buffer_size
# Tails shorter than this are dropped; see the module docstring for the measurement.
DEFAULT_MIN_TAIL = 32
# max_age_docs=None means this many buffers' worth of documents; see the docstring.
_AGE_BUFFERS = 8
DEFAULT_MAX_AGE_DOCS = _AGE_BUFFERS * DEFAULT_BUFFER_DOCS
_EMPTY = np.zeros(0, dtype=np.int64)
_LAST = sys.maxsize  # sorts after every insertion counter in a (length, counter) key

# A buffer piece: (document tokens, BOS first, owned; start; tail 0/1; unit; doc; born).
# A tuple, not a dataclass: ~100k are made per second and a tuple is 5x cheaper.
Piece = tuple[np.ndarray, int, int, int, int, int]
_REF = itemgetter(3, 4, 1, 2, 5)  # a piece in a position: unit, doc, start, tail, born
_FIELDS = 5  # integers a piece takes in a position


@dataclass(slots=True)
class _Unit:
    unit: int
    tokens: np.ndarray
    bounds: list[int]  # document i is tokens[bounds[i]:bounds[i + 1]]
    docs: int
    next_doc: int  # first document not yet read


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_POSITION


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_POSITION < v < MAX_POSITION


def _decode_buffer(text: str, docs_read: int, unit: int, buffer_docs: int) -> list[int]:
    """The compact buffer (see the module docstring) as five integers a piece."""
    values = _text_to_varints(text) if text else [0, 0, 0]
    n, n_units, n_tails = [*values, -1, -1, -1][:3]
    if (not 0 <= n <= buffer_docs or (n == 0) != (not text)
            or not 0 <= n_units <= n or not 0 <= n_tails <= n
            or len(values) != 3 + n + 2 * n_units + 2 * n_tails
            or (n > 0) != (n_units > 0) or not all(map(_is_int, values))):
        raise StateMismatchError(
            f"bestfit position's buffer must hold 1 to {buffer_docs} pieces (or be empty), as "
            f"many borns, a unit pair for at least one of them and a pair per tail; it reads "
            f"{len(values)} values, counts {values[:3]}"
        )
    ages = values[3 : 3 + n]
    unit_list = values[3 + n : 3 + n + 2 * n_units]
    tail_list = values[3 + n + 2 * n_units :]
    borns = [docs_read - ages[0]] if ages else []
    for delta in ages[1:]:
        borns.append(borns[-1] + delta)
    # Units: the first pair counts back from (unit, docs_read), the rest count forward.
    units: list[int] = []
    zs: list[int] = []
    for i in range(0, len(unit_list), 2):
        du, dz = unit_list[i], unit_list[i + 1]
        if i == 0:
            units.append(unit - du)
            zs.append(docs_read - dz)
        elif du < 1 or dz < 1:
            raise StateMismatchError(
                f"bestfit position's buffer units must ascend with the born of their first "
                f"document; got steps ({du}, {dz}) at pair {i // 2}"
            )
        else:
            units.append(units[-1] + du)
            zs.append(zs[-1] + dz)
    starts = dict(zip(tail_list[0::2], tail_list[1::2], strict=True))
    if (tail_list[0::2] != sorted(starts) or not all(0 <= i < len(borns) for i in starts)
            or not all(s >= 1 for s in starts.values())):
        raise StateMismatchError(
            f"bestfit position's buffer tails {tail_list} must be ascending piece indices "
            f"below {len(borns)}, each with a start token >= 1"
        )
    if not all(0 <= b < docs_read for b in borns) or not all(_is_count(v) for v in units + zs):
        raise StateMismatchError(
            f"bestfit position's buffer names borns or units outside [0, docs_read="
            f"{docs_read}) and [0, unit={unit}]"
        )
    flat: list[int] = []
    held = set()
    for i, born in enumerate(borns):
        k = bisect_right(zs, born) - 1
        if k < 0:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i} (born {born}) comes before the first "
                f"document of every listed unit"
            )
        held.add(k)
        s = starts.get(i, 0)
        flat += [units[k], born - zs[k], s, int(s > 0), born]
    if len(held) != len(units):
        raise StateMismatchError(
            f"bestfit position's buffer lists {len(units)} units, of which only {len(held)} "
            f"hold a piece"
        )
    return flat


def _parse_start(
    start: dict[str, Any], buffer_docs: int
) -> tuple[int, int, int, list[int]]:
    unit: Any = start.get("unit")
    doc: Any = start.get("doc", 0)
    buf: Any = start.get("buffer", [])
    empty = not buf
    # Only differences of docs_read and born matter, so an empty buffer may omit it.
    docs_read: Any = start.get("docs_read", 0 if empty else None)
    if not (_is_count(unit) and _is_count(doc) and _is_count(docs_read)
            and isinstance(buf, (list, str))):
        raise StateMismatchError(
            f"bestfit position lacks non-negative integers 'unit', 'doc' and 'docs_read' and "
            f"a string 'buffer' (got unit={unit!r}, doc={doc!r}, docs_read={docs_read!r}, "
            f"buffer of type {type(buf).__name__}); positions written before the age rule "
            f"(4 integers a piece, no 'docs_read') cannot be resumed"
        )
    if isinstance(buf, str):
        flat = _decode_buffer(buf, docs_read, unit, buffer_docs)
    elif (len(buf) % _FIELDS or len(buf) // _FIELDS > buffer_docs
            or not all(map(_is_count, buf))):
        raise StateMismatchError(
            f"bestfit position's buffer must be at most {buffer_docs} pieces of {_FIELDS} "
            f"non-negative integers (unit, doc, start, tail, born); got {len(buf)} values"
        )
    else:
        flat = buf
    refs = []
    first_born: dict[int, int] = {unit: docs_read - doc}  # a unit's document 0: its born
    for i in range(0, len(flat), _FIELDS):
        u, d, s, t, born = flat[i : i + _FIELDS]
        if t != (s > 0) or (u, d) >= (unit, doc) or born >= docs_read:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i // _FIELDS} = {flat[i:i + _FIELDS]} is "
                f"inconsistent: tail must be 1 exactly when start > 0, the document must come "
                f"before the next one to read ({unit}, {doc}) and born before docs_read "
                f"({docs_read})"
            )
        if first_born.setdefault(u, born - d) != born - d:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i // _FIELDS} = {flat[i:i + _FIELDS]} puts "
                f"document 0 of unit {u} at born {born - d}, not {first_born[u]} as the read "
                f"position or another piece of that unit does: documents are read in order"
            )
        refs.append((u, d, born))
    # born is the document's index in the stream: it orders documents as (unit, doc) does,
    # and no document appears twice.
    refs.sort()
    for (u0, d0, b0), (u1, d1, b1) in pairwise(refs):
        if (u0, d0) == (u1, d1) or b0 >= b1:
            raise StateMismatchError(
                f"bestfit position's buffer names documents ({u0}, {d0}) born {b0} and "
                f"({u1}, {d1}) born {b1}: each document may appear once, and born must grow "
                f"with (unit, doc)"
            )
    return int(unit), int(doc), int(docs_read), [int(v) for v in flat]


def buffer_pieces(position: dict[str, Any]) -> list[tuple[int, int, int, int, int]]:
    """A valid position's buffer as (unit, doc, start, tail, born) a piece, in buffer order."""
    flat = _parse_start(position, MAX_POSITION)[3]
    return [tuple(flat[i : i + _FIELDS]) for i in range(0, len(flat), _FIELDS)]  # type: ignore[misc]


def _encode_buffer(pieces: Any, n: int, unit: int, docs_read: int) -> str:
    """The compact buffer of `n` pieces (see the module docstring), in numpy: it runs per
    window (~50 us for 1000 pieces; a Python loop takes ~10x that)."""
    if not n:
        return ""
    refs = np.fromiter(chain.from_iterable(map(_REF, pieces)), dtype=np.int64,
                       count=n * _FIELDS).reshape(n, _FIELDS)
    u, d, s, born = refs[:, 0], refs[:, 1], refs[:, 2], refs[:, 4]
    held, first = np.unique(u, return_index=True)
    zs = (born - d)[first]
    tails = np.flatnonzero(s)
    out = np.empty(3 + n + 2 * len(held) + 2 * len(tails), dtype=np.int64)
    out[:3] = n, len(held), len(tails)
    out[3] = docs_read - born[0]  # born: the first piece's age, then differences
    out[4 : 3 + n] = np.diff(born)
    units = out[3 + n : 3 + n + 2 * len(held)]
    units[0], units[1] = unit - held[0], docs_read - zs[0]  # back from (unit, docs_read)
    units[2::2], units[3::2] = np.diff(held), np.diff(zs)
    out[3 + n + 2 * len(held) :: 2] = tails
    out[4 + n + 2 * len(held) :: 2] = s[tails]
    return _varints_to_text(out)


def _varints_to_text(values: np.ndarray) -> str:
    """Zigzag LEB128 varints of int64 values, as unpadded URL-safe base64."""
    zz = ((values << 1) ^ (values >> 63)).astype(np.uint64)
    nbytes = np.ones(len(zz), dtype=np.int64)
    for width in range(1, 10):
        nbytes += zz >= np.uint64(1 << (7 * width))
    owner = np.repeat(np.arange(len(zz)), nbytes)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)
    more = (index < nbytes[owner] - 1).astype(np.uint64) << np.uint64(7)
    data = ((zz[owner] >> (7 * index).astype(np.uint64)) & np.uint64(0x7F)) | more
    return base64.urlsafe_b64encode(data.astype(np.uint8).tobytes()).rstrip(b"=").decode()


def _text_to_varints(text: str) -> list[int]:
    """The inverse of _varints_to_text; StateMismatchError unless `text` is its output."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        data = None
    values: list[int] = []
    if data is not None:
        value = shift = 0
        for byte in data:
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                values.append((value >> 1) ^ -(value & 1))
                value = shift = 0
            elif shift > 63:
                break
    if data is None or _varints_to_text(np.array(values, dtype=np.int64)) != text:
        raise StateMismatchError(
            f"bestfit position's buffer {text[:40]!r}... is not the compact form this "
            "version writes (URL-safe base64 of zigzag varints); the state is damaged"
        )
    return values


class BestFitPacker:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        start: dict[str, Any] | None = None,
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
        unit, doc, docs_read, flat = _parse_start(start or {"unit": 0}, buffer_docs)
        self._read = (unit, doc)  # next document to read
        self._docs_read = docs_read  # documents the stream has put into the buffer
        # The buffer: pieces by insertion counter (dict order is buffer order), a sorted
        # index of (length, counter) keys for O(log n) best-fit and shortest lookups, and a
        # heap of (born, counter) for the oldest piece (entries of pieces gone are skipped
        # when they surface, and the heap is rebuilt when they pass 3 buffers' worth).
        self._pieces: dict[int, Piece] = {}
        self._keys: list[tuple[int, int]] = []
        self._ages: list[tuple[int, int]] = []
        self._unresolved: dict[int, list[int]] = {}  # unit -> counters of pieces it holds
        for c, i in enumerate(range(0, len(flat), _FIELDS)):
            u, d, s, t, born = flat[i : i + _FIELDS]
            self._pieces[c] = (_EMPTY, s, t, u, d, born)
            self._ages.append((born, c))
            self._unresolved.setdefault(u, []).append(c)
        heapify(self._ages)
        self._counter = len(self._pieces)
        self._pending: deque[_Unit] = deque()  # pushed units with documents still to read
        self._pending_tokens = 0
        self.next_unit = min([unit, *self._unresolved])
        self.buffered_tokens = 0
        self.tokens_packed = 0
        self.tokens_cropped = 0  # cut off and discarded (tails under min_tail)
        self.tokens_from_tails = 0  # delivered in re-entered tails, their BOS included
        self.tokens_by_age = 0  # placed by the age rule instead of best fit
        self._window_stats = [0, 0, 0]  # cropped, from tails, by age: of the window being packed
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
            _, start, tail, u, d, born = self._pieces[c]
            if d >= docs or bounds[d] + start >= bounds[d + 1]:
                raise StateMismatchError(
                    f"bestfit position names document {d} from token {start} of unit {unit}, "
                    f"which holds {docs} documents there; the state belongs to other data"
                )
            data = tokens[bounds[d] : bounds[d + 1]].copy()
            self._pieces[c] = (data, start, tail, u, d, born)
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
        self.tokens_by_age += self._window_stats[2]
        self._window_stats[:] = [0, 0, 0]  # in place: the packing generator holds this list
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
        keys, pieces, ages, pending = self._keys, self._pieces, self._ages, self._pending
        out, cap, min_tail = self._scratch, self.row_tokens, self.min_tail
        buffer_docs, max_age_docs = self.buffer_docs, self.max_age_docs
        ages_cap = 4 * buffer_docs  # rebuilt from the buffer past this: O(1) amortized
        docs_read = self._docs_read
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
                        pieces[c] = (u.tokens[lo:hi].copy(), 0, 0, u.unit, d, docs_read)
                        insort(keys, (hi - lo, c))
                        heappush(ages, (docs_read, c))
                        docs_read += 1
                        self._docs_read = docs_read
                        self._pending_tokens -= hi - lo
                        u.next_doc = d = d + 1
                        if d == u.docs:
                            pending.popleft()  # drop the unit's array: its docs are copied
                            self._read = (u.unit + 1, 0)
                        else:
                            self._read = (u.unit, d)
                        del u  # a paused generator must not keep a read unit's array alive
                    room = cap - pos
                    if len(ages) > ages_cap:  # under an old piece, entries of gone ones pile up
                        ages[:] = [(piece[5], c) for c, piece in pieces.items()]
                        heapify(ages)
                    while ages[0][1] not in pieces:  # entries of pieces gone since
                        heappop(ages)
                    born, c = ages[0]
                    if docs_read - born > max_age_docs:  # too old: the oldest goes next
                        heappop(ages)
                        data, start, tail, unit, doc, born = pieces.pop(c)
                        length = len(data) - start + tail
                        del keys[bisect_left(keys, (length, c))]
                        take = min(length, room)
                        stats[2] += take
                    else:
                        i = bisect_right(keys, (room, _LAST)) - 1
                        if i >= 0:  # the longest piece that fits, the earliest of that length
                            take = keys[i][0]
                            if i and keys[i - 1][0] == take:
                                i = bisect_left(keys, (take, -1))
                            length = take
                        else:  # nothing fits: crop the shortest (earliest) piece to the room
                            i, take = 0, room
                            length = keys[0][0]
                        data, start, tail, unit, doc, born = pieces.pop(keys.pop(i)[1])
                    at = row_start + pos
                    if tail:
                        stats[1] += take
                        out[at] = data[0]
                        out[at + 1 : at + take] = data[start : start + take - 1]
                    else:
                        out[at : at + take] = data[start : start + take]
                    pos += take
                    rest = length - take
                    if rest >= min_tail:  # keeps the document's born: its age goes on
                        c = self._counter
                        self._counter = c + 1
                        pieces[c] = (data, start + take - tail, 1, unit, doc, born)
                        insort(keys, (rest + 1, c))
                        heappush(ages, (born, c))
                    else:
                        stats[0] += rest
            yield True

    # -- position -----------------------------------------------------------

    def _position(self) -> dict[str, Any]:
        # Here, not in first_unit(): packing runs ahead of the last window filled.
        self._first_unit = min([self._read[0], *(piece[3] for piece in self._pieces.values())])
        buffer = _encode_buffer(self._pieces.values(), len(self._pieces), self._read[0],
                                self._docs_read)
        return {"unit": self._read[0], "doc": self._read[1], "docs_read": self._docs_read,
                "buffer": buffer}

    def resume_key(self, position: dict[str, Any]) -> tuple[Any, ...]:
        """The part of a cursor that defines where the stream continues."""
        buf = position.get("buffer")
        return (position.get("unit"), position.get("doc"), position.get("docs_read"),
                tuple(buf) if isinstance(buf, list) else buf)

    def needs_unit(self, unit: int) -> bool:
        """False for a unit pushed only to reach the read position (resuming) that holds
        none of the buffer's pieces: its content is ignored, so it may be pushed empty."""
        return unit >= self._read[0] or unit in self._unresolved

    def first_unit(self) -> int:
        """The earliest unit `position` names: the read unit's, or a buffered piece's."""
        return self._first_unit

    def stats(self) -> dict[str, Any]:
        return {"tokens_packed": self.tokens_packed, "tokens_cropped": self.tokens_cropped,
                "tokens_from_tails": self.tokens_from_tails, "tokens_by_age": self.tokens_by_age,
                "buffer_pieces": len(self._pieces)}
