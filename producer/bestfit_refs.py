"""The best-fit buffer's references, kept as a table, so a position costs one numpy index.

A best-fit position (position/packed.py's BestFitPosition) names every buffered piece
by `(unit, doc, start, born)`. Walking the buffer's tuples in Python for that took as
long as packing the window, so the packer (bestfit.py) also appends each piece's
reference to this table as it buffers it, and the counter of each piece it places:
counter c is row c - base, counters grow with insertion, so row order is buffer
order. `alive()` moves what was appended into the arrays (once a window) and returns
the rows of the pieces still buffered, which bestfit_codec.py encodes.

Memory: at most ~4 buffers' worth of rows; rows older than the buffer's oldest piece
are dropped to make room, and the arrays double only when the live rows need it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np


class RefTable:
    """Rows `(unit, doc, start, born)`, one per piece ever buffered, and which are alive.

    The packing loop binds `new` and `gone` to locals and appends to them directly:
    `new.extend((unit, doc, start, born))` per piece buffered, `gone.append(counter)`
    per piece placed (flat int64s, ~85 placements a window, no method call each)."""

    def __init__(self, buffer_docs: int, start: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self.new = array("q", [v for p in start for v in p])
        self.gone = array("q")
        self._refs = np.empty((max(4 * buffer_docs, 16), 4), dtype=np.int64)
        self._alive = np.zeros(len(self._refs), dtype=bool)
        self._rows = 0  # rows of _refs in use
        self._base = 0  # the counter of row 0

    def alive(self) -> np.ndarray:
        """The rows of the pieces still buffered, in buffer order."""
        if self.new:
            new = np.array(self.new, dtype=np.int64).reshape(-1, 4)
            del self.new[:]
            rows = self._rows
            if rows + len(new) > len(self._refs):
                # rows of pieces older than the buffer's oldest are dropped to make room
                alive = np.flatnonzero(self._alive[:rows])
                dead = int(alive[0]) if len(alive) else rows
                refs, flags = self._refs[dead:rows].copy(), self._alive[dead:rows].copy()
                if len(refs) + len(new) > len(self._refs) // 2:
                    size = 2 * (len(refs) + len(new))
                    self._refs = np.empty((size, 4), dtype=np.int64)
                    self._alive = np.zeros(size, dtype=bool)
                rows = len(refs)
                self._refs[:rows] = refs
                self._alive[:rows] = flags
                self._alive[rows:] = False
                self._base += dead
            self._refs[rows : rows + len(new)] = new
            self._alive[rows : rows + len(new)] = True
            self._rows = rows + len(new)
        if self.gone:
            self._alive[np.array(self.gone, dtype=np.int64) - self._base] = False
            del self.gone[:]
        return self._refs[: self._rows][self._alive[: self._rows]]
