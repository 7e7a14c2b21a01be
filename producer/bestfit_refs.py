"""The best-fit buffer's references, kept as a table, so a position costs a few numpy calls.

A best-fit position (position/packed.py's BestFitPosition) names every buffered piece
by `(unit, doc, start, born)`. Walking the buffer's tuples in Python for that took as
long as packing the window, so the packer (bestfit.py) also appends each piece's
reference to this table as it buffers it, and the counter of each piece it places.
Counters grow with insertion, so counter order is buffer order. `alive()` (once a
window) appends what was buffered, drops what was placed (found by its counter with a
binary search) and returns the pieces still buffered as rows (unit, z, start, born,
counter), which bestfit_codec.py encodes. With `keep_placed` (live provenance), it
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
    """References of the buffered pieces, a row each, in buffer (counter) order:
    `(unit, z, start, born, counter)`, where z = born - doc is the born of the unit's
    document 0 (what the position's codec stores; doc = born - z).

    The packing loop binds `new` and `gone` to locals and appends to them directly:
    `new.extend((unit, z, start, born, counter))` per piece buffered, `gone.append(counter)`
    per piece placed (flat int64s, ~90 placements a window, no method call each).
    A window's update is a few numpy calls whatever the buffer's size: one copy of the
    new rows, one search for the gone ones, one compress into a spare table (swapped)."""

    def __init__(self, buffer_docs: int, start: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self.new = array("q", [v for c, (u, d, s, b) in enumerate(start)
                               for v in (u, b - d, s, b, c)])
        self.gone = array("q")
        rows = 2 * buffer_docs + 64
        self._table = np.empty((rows, 5), dtype=np.int64)
        self._spare = np.empty((rows, 5), dtype=np.int64)
        self._used = 0
        self.keep_placed = False  # set by slot_provenance's replaying packer
        self.placed = np.zeros((3, 0), dtype=np.int64)  # the last alive()'s placed pieces

    def alive(self) -> np.ndarray:
        """The pieces still buffered, in buffer order: rows (unit, z, start, born, counter)."""
        used, table = self._used, self._table
        if self.new:
            added = len(self.new) // 5
            if used + added > len(table):  # more pieces than ever: twice the room
                grown = np.empty((2 * (used + added), 5), dtype=np.int64)
                grown[:used] = table[:used]
                table, self._spare = grown, np.empty_like(grown)
            table[used : used + added] = np.frombuffer(self.new, dtype=np.int64).reshape(added, 5)
            del self.new[:]
            used += added
        if self.gone:
            at = np.searchsorted(table[:used, 4], np.frombuffer(self.gone, dtype=np.int64))
            del self.gone[:]
            if self.keep_placed:  # rows unit, doc, start
                placed = table[at]
                self.placed = np.array([placed[:, 0], placed[:, 3] - placed[:, 1],
                                        placed[:, 2]])
            keep = np.ones(used, dtype=bool)
            keep[at] = False
            left = used - len(at)
            np.compress(keep, table[:used], axis=0, out=self._spare[:left])
            table, self._spare, used = self._spare, table, left
        elif self.keep_placed:
            self.placed = np.zeros((3, 0), dtype=np.int64)
        self._table, self._used = table, used
        return table[:used]
