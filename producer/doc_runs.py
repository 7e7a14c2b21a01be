"""A unit's tokens as runs of documents: what live provenance cuts a batch's record from.

A unit is kept as RUNS: maximal spans of consecutive tokens of one document, each
`(at, file key, row group, row, offset)` (the unit's token `at` is token `offset` of the
document's [BOS] + encode_ordinary(text)). A plain unit has one run per document at
offset 0; an elastic layout's item reshapes it (elastic.apply, run on token positions
instead of tokens, so no layout rule is written twice); a mixture's virtual unit is its
entries' document slices (`virtual_runs`). Runs are made lazily (`LazyRuns`): most
batches never have a record cut (producer/slot_provenance.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenfeed.producer import elastic
from tokenfeed.producer.units import Unit

_NO_IDENT = np.zeros((0, 3), dtype=np.int64)
NO_INT = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Runs:
    """A unit's tokens as runs of one document each (module docstring)."""

    at: np.ndarray  # int64: the unit token each run starts at (ascending, at[0] == 0)
    ident: np.ndarray  # int64 (k, 3): file key, row group, row of each run's document
    off: np.ndarray  # int64: the document token at `at`
    n: int  # tokens in the unit
    doc_starts: np.ndarray  # the unit's documents, as the packer sees them
    simple: bool  # run i is document i from its first token: a placement needs no search

    @classmethod
    def of_docs(cls, file_key: int, row_group: int, rows: np.ndarray,
                lengths: np.ndarray) -> Runs:
        at = np.cumsum(lengths) - lengths
        ident = np.empty((len(rows), 3), dtype=np.int64)
        ident[:, 0], ident[:, 1], ident[:, 2] = file_key, row_group, rows
        return cls(at, ident, np.zeros(len(rows), dtype=np.int64), int(lengths.sum()), at,
                   True)

    def shaped(self, item: tuple[int, int, int, int]) -> Runs:
        """What an elastic layout item keeps of this (whole) unit: elastic.apply over the
        tokens' positions, read back as runs."""
        got = elastic.apply(item, Unit(np.arange(self.n, dtype=np.int64), self.doc_starts))
        pos = got.tokens
        if not len(pos):
            return Runs(NO_INT, _NO_IDENT, NO_INT, 0, got.doc_starts, True)
        new_doc = np.zeros(self.n + 1, dtype=bool)
        new_doc[self.at] = True
        breaks = np.flatnonzero(np.concatenate(
            [[True], (pos[1:] != pos[:-1] + 1) | new_doc[pos[1:]]]))
        first = pos[breaks]
        run = np.searchsorted(self.at, first, side="right") - 1
        off = self.off[run] + first - self.at[run]
        simple = len(breaks) == len(got.doc_starts) and bool(
            np.array_equal(breaks, got.doc_starts)) and not off.any()
        return Runs(breaks, self.ident[run], off, len(pos), got.doc_starts, simple)

    def slice(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ident, start, end) of the document spans of tokens lo:hi."""
        at = self.at
        i0 = int(np.searchsorted(at, lo, side="right")) - 1
        i1 = int(np.searchsorted(at, hi, side="left"))
        first = np.maximum(at[i0:i1], lo)
        last = np.minimum(np.append(at[i0 + 1:i1], hi), hi)
        start = self.off[i0:i1] + first - at[i0:i1]
        return self.ident[i0:i1], start, start + (last - first)


EMPTY_RUNS = Runs(NO_INT, _NO_IDENT, NO_INT, 0, NO_INT, True)


class LazyRuns:
    """A unit's runs, made the first time a record needs them. Reading and pushing a unit
    then cost a few references: making its runs as it was read cost ~5 us a batch of a
    warm concat stream (its units' numpy calls), ~3.5% of its rate, for records most
    batches never have cut. `tokens`: what the packer got of it, checked then."""

    __slots__ = ("_make", "_runs", "tokens")

    def __init__(self, make: Callable[[], Runs], tokens: int = -1) -> None:
        self._make: Callable[[], Runs] | None = make
        self._runs: Runs | None = None
        self.tokens = tokens

    def runs(self) -> Runs:
        if self._runs is None:
            assert self._make is not None
            self._runs, self._make = self._make(), None
        return self._runs


def no_runs() -> Runs:
    return EMPTY_RUNS  # a unit never read (pushed empty)


NO_RUNS = LazyRuns(no_runs, 0)  # read-only: a mixture's source unit never read


def virtual_runs(composition: list[tuple[int, int, int, int]],
                 sources: dict[tuple[int, int], LazyRuns]) -> Runs:
    """A mixture's virtual unit: each entry (source, its unit, its document, tokens)."""
    parts = []
    for source, unit, doc, tokens in composition:
        runs = sources[(source, unit)].runs()
        lo = int(runs.doc_starts[doc]) if doc < len(runs.doc_starts) else runs.n
        parts.append(runs.slice(lo, lo + tokens))
    lengths = np.array([t for *_, t in composition], dtype=np.int64)
    if not parts:
        return EMPTY_RUNS
    ident = np.concatenate([p[0] for p in parts])
    start = np.concatenate([p[1] for p in parts])
    span = np.concatenate([p[2] - p[1] for p in parts])
    at = np.cumsum(span) - span
    doc_starts = np.cumsum(lengths) - lengths
    simple = len(at) == len(doc_starts) and not start.any()
    return Runs(at, ident, start, int(span.sum()), doc_starts, simple)
