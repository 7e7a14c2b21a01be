"""The best-fit buffer's references, kept as a table, so a position costs one numpy index.

A best-fit position (position/packed.py's BestFitPosition) names every buffered piece
by `(unit, doc, start, born)`. Walking the buffer's tuples in Python for that took as
long as packing the window, so the packer (bestfit.py) also appends each piece's
reference to this table as it buffers it, and the counter of each piece it places:
counter c is column c - base of a (4, N) array, counters grow with insertion, so
column order is buffer order. `alive()` moves what was appended into the arrays (once a
window) and returns the columns of the pieces still buffered, four contiguous rows
(unit, doc, start, born), which bestfit_codec.py encodes.

Memory: at most ~4 buffers' worth of columns; those older than the buffer's oldest
piece are dropped to make room, and the arrays double only when the live ones need it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np


class RefTable:
    """References `(unit, doc, start, born)`, one per piece ever buffered, and which are
    alive: a column each, so that each field comes out as one contiguous row.

    The packing loop binds `new` and `gone` to locals and appends to them directly:
    `new.extend((unit, doc, start, born))` per piece buffered, `gone.append(counter)`
    per piece placed (flat int64s, ~85 placements a window, no method call each)."""

    def __init__(self, buffer_docs: int, start: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self.new = array("q", [v for p in start for v in p])
        self.gone = array("q")
        self._refs = np.empty((4, max(4 * buffer_docs, 16)), dtype=np.int64)
        self._alive = np.zeros(self._refs.shape[1], dtype=bool)
        self._rows = 0  # columns of _refs in use
        self._base = 0  # the counter of column 0

    def alive(self) -> np.ndarray:
        """The pieces still buffered, in buffer order: rows unit, doc, start and born."""
        if self.new:
            new = np.array(self.new, dtype=np.int64).reshape(-1, 4).T
            del self.new[:]
            rows, added = self._rows, new.shape[1]
            if rows + added > self._refs.shape[1]:
                # rows of pieces older than the buffer's oldest are dropped to make room
                alive = np.flatnonzero(self._alive[:rows])
                dead = int(alive[0]) if len(alive) else rows
                refs, flags = self._refs[:, dead:rows].copy(), self._alive[dead:rows].copy()
                if refs.shape[1] + added > self._refs.shape[1] // 2:
                    size = 2 * (refs.shape[1] + added)
                    self._refs = np.empty((4, size), dtype=np.int64)
                    self._alive = np.zeros(size, dtype=bool)
                rows = refs.shape[1]
                self._refs[:, :rows] = refs
                self._alive[:rows] = flags
                self._alive[rows:] = False
                self._base += dead
            self._refs[:, rows : rows + added] = new
            self._alive[rows : rows + added] = True
            self._rows = rows + added
        if self.gone:
            self._alive[np.array(self.gone, dtype=np.int64) - self._base] = False
            del self.gone[:]
        return self._refs[:, : self._rows][:, self._alive[: self._rows]]
