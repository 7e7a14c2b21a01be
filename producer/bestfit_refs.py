"""The best-fit buffer's references, kept as a table, so a position costs a few numpy calls.

A best-fit position (position/packed.py's BestFitPosition) names every buffered piece
by `(unit, doc, start, born)`. Walking the buffer's tuples in Python for that took as
long as packing the window, so the packer (bestfit.py) also appends each piece's
reference to this table as it buffers it, and the counter of each piece it places.
Counters grow with insertion, so counter order is buffer order. `alive()` (once a
window) appends what was buffered, drops what was placed (found by its counter with a
binary search) and returns the pieces still buffered as contiguous rows (unit, doc,
start, born), which bestfit_codec.py encodes. With `keep_placed` (live provenance), it
also keeps the placed pieces' (unit, doc, start), in placement order, as `placed`: the
window's placements come from the table the position needs anyway, not from a record
made at each placement.

Memory and time: the table holds the buffered pieces only (~buffer_docs), whatever
their ages; it once kept every reference since the oldest piece's, which under the age
rule was ~12 buffers' worth to scan each window.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np


class RefTable:
    """References `(unit, doc, start, born)` of the buffered pieces and their counters:
    five int64 rows, a column a piece, so that each field comes out contiguous.

    The packing loop binds `new` and `gone` to locals and appends to them directly:
    `new.extend((unit, doc, start, born))` per piece buffered, `gone.append(counter)`
    per piece placed (flat int64s, ~90 placements a window, no method call each); the
    n-th reference appended is the piece of counter n."""

    def __init__(self, buffer_docs: int, start: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self.new = array("q", [v for p in start for v in p])
        self.gone = array("q")
        # unit, doc, start, born, counter: the first _used columns
        self._table = np.empty((5, 2 * buffer_docs + 64), dtype=np.int64)
        self._used = 0
        self._next = 0  # the counter of the next reference appended
        self.keep_placed = False  # set by slot_provenance's replaying packer
        self.placed = np.zeros((3, 0), dtype=np.int64)  # the last alive()'s placed pieces

    def alive(self) -> np.ndarray:
        """The pieces still buffered, in buffer order: rows unit, doc, start and born."""
        used = self._used
        if self.new:
            added = len(self.new) // 4
            if used + added > self._table.shape[1]:  # more pieces than ever: twice the room
                table = np.empty((5, 2 * (used + added)), dtype=np.int64)
                table[:, :used] = self._table[:, :used]
                self._table = table
            self._table[:4, used : used + added] = np.frombuffer(
                self.new, dtype=np.int64).reshape(added, 4).T
            self._table[4, used : used + added] = np.arange(self._next, self._next + added)
            del self.new[:]
            self._next += added
            used += added
        if self.gone:
            keep = np.ones(used, dtype=bool)
            at = np.searchsorted(self._table[4, :used], np.frombuffer(self.gone, dtype=np.int64))
            if self.keep_placed:
                self.placed = self._table[:3, at]  # a copy: rows unit, doc, start
            keep[at] = False
            del self.gone[:]
            kept = self._table[:, :used][:, keep]
            used = kept.shape[1]
            self._table[:, :used] = kept
        elif self.keep_placed:
            self.placed = np.zeros((3, 0), dtype=np.int64)
        self._used = used
        return self._table[:4, :used]
