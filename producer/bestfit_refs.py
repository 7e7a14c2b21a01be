"""The best-fit buffer's references, kept as a table, so a position costs a few numpy calls.

A best-fit position (position/packed.py's BestFitPosition) names every buffered piece
by `(unit, doc, start, born)`. Walking the buffer's tuples in Python for that took as
long as packing the window, so the packer (bestfit.py) also appends each piece's
reference to this table as it buffers it, and the counter of each piece it places.
Counters grow with insertion, so counter order is buffer order. `alive()` (once a
window) appends what was buffered, drops what was placed (found by its counter with a
binary search) and returns the pieces still buffered as contiguous rows (unit, doc,
start, born), which bestfit_codec.py encodes.

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
        self._table = np.empty((5, 0), dtype=np.int64)  # unit, doc, start, born, counter
        self._next = 0  # the counter of the next reference appended

    def alive(self) -> np.ndarray:
        """The pieces still buffered, in buffer order: rows unit, doc, start and born."""
        if self.new:
            added = len(self.new) // 4
            table = np.empty((5, self._table.shape[1] + added), dtype=np.int64)
            table[:, : -added] = self._table
            table[:4, -added:] = np.frombuffer(self.new, dtype=np.int64).reshape(added, 4).T
            table[4, -added:] = np.arange(self._next, self._next + added)
            del self.new[:]
            self._next += added
            self._table = table
        if self.gone:
            keep = np.ones(self._table.shape[1], dtype=bool)
            keep[np.searchsorted(self._table[4], np.frombuffer(self.gone, dtype=np.int64))] = False
            del self.gone[:]
            self._table = self._table[:, keep]
        return self._table[:4]
