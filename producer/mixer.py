"""Mixtures: one rank's documents from several named sources, interleaved by token share.

Each source is read on its own exactly like a one-source stream (its own row groups,
rank striding, shuffle and epochs: `reader.py`). The mixer takes whole documents from
the sources' unit streams, each source's in its own order, none skipped or repeated,
and cuts the mixed document stream into virtual units of `DOCS_PER_UNIT` documents,
which the packer sees as its units (positions `(unit, offset)` count virtual units).

The rule, deterministic (no sampling): before each document, with `t_s` the tokens
taken from source `s` and `T` their sum, both counted since the weights last changed,
take the next document of the source with the largest deficit `w_s * T - t_s` among
sources of positive weight (ties: the first in name order). The realized token share
of every source therefore stays within one document of its weight at every point.

Weights change (`tokenfeed mix --set`, or a resume with other weights) at the next
virtual unit not yet mixed, and the change is recorded in the schedule: a list of
`(from_unit, {name: weight})`. A state (position.py's MixState) holds the mixer at
the first virtual unit the packer still needs: `at`, every source's cursor (next
document: its unit in the source's stream and index in it; tokens taken since the
last change; tokens taken in all), the schedule, and `mixed` (virtual units mixed
when the state was made: where a resume with other weights changes them).
Replaying from it with the same schedule reproduces the same virtual units.

Failure behaviour: a source whose rank reads no document at all in a whole epoch is
a DataError naming it (instead of spinning).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

import numpy as np

from tokenfeed.common.errors import ConfigError, DataError
from tokenfeed.producer.bestfit_codec import Piece
from tokenfeed.producer.position import (
    MAX_SCHEDULE,
    ConcatPosition,
    Layout,
    MixState,
    Packed,
    SourceCursor,
)
from tokenfeed.producer.units import Unit

DOCS_PER_UNIT = 64  # documents per virtual unit: a weight change waits at most this many
RECENT_BATCHES = 20  # status: realized shares over the last this many batches

Weights = dict[str, float]
Take = Callable[[int, int], "Unit | None"]  # (source, unit) -> the unit, or None if not in


class Mixer:
    """Cuts the mixed document stream into virtual units, replaying from a state."""

    def __init__(self, state: MixState) -> None:
        self.names = state.names
        self.next_unit = state.at  # the next virtual unit to mix
        self.schedule: list[tuple[int, Mapping[str, float]]] = list(state.schedule)
        self.cursors = [list(c) for c in state.sources.values()]
        self.pending: list[deque[Unit]] = [deque() for _ in self.names]  # cursor's unit first
        self.blocked: tuple[int, int] | None = None  # (source, unit) the next unit waits for
        self.snapshots: dict[int, list[list[int]]] = {self.next_unit: self._copy()}
        # (source, its unit, its document, tokens) of each document of a virtual unit
        self.compositions: dict[int, list[tuple[int, int, int, int]]] = {}
        self.layouts: Mapping[str, Layout] | None = state.layouts
        self._empty_run = [0] * len(self.names)  # empty source units in a row

    def _copy(self) -> list[list[int]]:
        return [list(c) for c in self.cursors]

    def weights_at(self, unit: int) -> list[float]:
        entry = next(e for e in reversed(self.schedule) if e[0] <= unit)
        return [float(entry[1].get(n, 0.0)) for n in self.names]

    @property
    def weights(self) -> Weights:
        return dict(zip(self.names, self.weights_at(self.next_unit), strict=True))

    def reweight(self, weights: Weights) -> None:
        """New weights from the next virtual unit not yet mixed."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ConfigError(f"this stream mixes {', '.join(self.names)}, not "
                              f"{', '.join(sorted(unknown))}")
        full = {n: float(weights.get(n, 0.0)) for n in self.names}
        self.schedule = [e for e in self.schedule if e[0] < self.next_unit]
        if self.schedule[-1][1] != full:
            if len(self.schedule) >= MAX_SCHEDULE:
                raise ConfigError(f"this stream's weights changed {MAX_SCHEDULE} times; "
                                  "restart it from a checkpoint to change them again")
            self.schedule.append((self.next_unit, full))

    def state(self, at: int, position: Packed) -> MixState:
        """The state to resume at virtual unit `at` (one this mixer has snapshotted), with
        the exact positions (and best fit's pieces) of the packer at `position`."""
        pieces = (None if isinstance(position, ConcatPosition)
                  else self._pieces(position.pieces))
        cursors = (SourceCursor(*c) for c in self.snapshots[at])
        return MixState(at, dict(zip(self.names, cursors, strict=True)), tuple(self.schedule),
                        self.next_unit, self.layouts, self._exact(position), pieces)

    def _exact(self, position: Packed) -> dict[str, tuple[int, int, int]]:
        """Every source's next token not delivered at packer `position` (best fit: next
        document not read), as (unit, doc, token): what an elastic resume divides."""
        v = position.unit
        comp = self.compositions.get(v, [])
        i, t = (len(comp), 0) if isinstance(position, ConcatPosition) else (position.doc, 0)
        if isinstance(position, ConcatPosition):
            left = position.offset
            for j, (_, _, _, n) in enumerate(comp):
                if left < n:
                    i, t = j, left
                    break
                left -= n
        after = self.snapshots[v + 1] if v in self.compositions else self.snapshots[v]
        exact: dict[str, tuple[int, int, int]] = {}
        for s, name in enumerate(self.names):
            k = next((k for k in range(i, len(comp)) if comp[k][0] == s), None)
            exact[name] = ((comp[k][1], comp[k][2], t if k == i else 0) if k is not None
                           else (after[s][0], after[s][1], 0))
        return exact

    def _pieces(self, pieces: tuple[Piece, ...]) -> tuple[tuple[int, int, int, int], ...]:
        """Best-fit buffer pieces (of virtual units) as (source, unit, doc, start) each."""
        out = []
        for p in pieces:
            source, unit, doc, _ = self.compositions[p.unit][p.doc]
            out.append((source, unit, doc, p.start))
        return tuple(out)

    def forget_before(self, unit: int) -> None:
        for u in [u for u in self.snapshots if u < unit]:
            del self.snapshots[u]
        for u in [u for u in self.compositions if u < unit]:
            del self.compositions[u]

    def source_unit(self, source: int) -> int:
        """The next unit of `source` the mixer will need from its reader."""
        return self.cursors[source][0] + len(self.pending[source])

    def pending_tokens(self, source: int) -> int:
        """Tokens of `source` taken from its reader and not yet mixed."""
        pending = self.pending[source]
        if not pending:
            return 0
        first = pending[0]
        doc = self.cursors[source][1]
        done = int(first.doc_starts[doc]) if doc < len(first.doc_starts) else len(first.tokens)
        return sum(len(r.tokens) for r in pending) - done

    def totals(self) -> list[int]:
        return [c[3] for c in self.cursors]

    def mix(self, take: Take, epoch_units: Callable[[int], int]) -> Unit | None:
        """The next virtual unit, or None while a source unit it needs is not in yet.

        `take(source, unit)` hands over a source's unit once finished; `epoch_units(s)`
        is how many units make one epoch of source s (an empty run that long is fatal).
        """
        self.blocked = None
        weights = self.weights_at(self.next_unit)
        if self.next_unit in (e[0] for e in self.schedule):
            for c in self.cursors:
                c[2] = 0  # a change starts counting anew
        cursors = self._copy()
        # (source, unit result, first token, end token) of each document, in order
        chosen: list[tuple[int, Unit, int, int]] = []
        composition: list[tuple[int, int, int, int]] = []
        depth = [0] * len(self.names)  # how far into pending each source has gone
        active = [i for i, w in enumerate(weights) if w > 0]
        while len(chosen) < DOCS_PER_UNIT:
            total = sum(cursors[i][2] for i in active)
            best = max(active, key=lambda i: (weights[i] * total - cursors[i][2], -i))
            doc = self._next_doc(best, cursors[best], depth, take, epoch_units)
            if doc is None:
                return None
            result, lo, hi = doc
            chosen.append((best, result, lo, hi))
            composition.append((best, cursors[best][0], cursors[best][1], hi - lo))
            cursors[best][1] += 1
            cursors[best][2] += hi - lo
            cursors[best][3] += hi - lo
        for i, d in enumerate(depth):  # commit: drop the source units fully mixed
            for _ in range(d):
                self.pending[i].popleft()
        self.cursors = cursors
        self.compositions[self.next_unit] = composition
        self.next_unit += 1
        self.snapshots[self.next_unit] = self._copy()
        tokens = np.concatenate([r.tokens[lo:hi] for _, r, lo, hi in chosen])
        lengths = np.array([hi - lo for _, _, lo, hi in chosen], dtype=np.int64)
        return Unit.of_lengths(tokens, lengths)

    def _next_doc(self, source: int, cursor: list[int], depth: list[int], take: Take,
                  epoch_units: Callable[[int], int]) -> tuple[Unit, int, int] | None:
        """The document at `cursor` of `source` (moving the cursor past ended units)."""
        pending = self.pending[source]
        while True:
            if depth[source] == len(pending):  # the unit at the cursor is not taken yet
                unit = cursor[0]
                result = take(source, unit)
                if result is None:
                    self.blocked = (source, unit)
                    return None
                pending.append(result)
                if len(result.doc_starts):
                    self._empty_run[source] = 0
                else:
                    self._empty_run[source] += 1
                    if self._empty_run[source] > epoch_units(source):
                        raise DataError(
                            f"source {self.names[source]!r} has no document in a whole epoch "
                            "of this rank's row groups; give it weight 0 or fix its data"
                        )
            result = pending[depth[source]]
            doc = cursor[1]
            if doc < len(result.doc_starts):
                starts = result.doc_starts
                hi = int(starts[doc + 1]) if doc + 1 < len(starts) else len(result.tokens)
                return result, int(starts[doc]), hi
            depth[source] += 1  # this unit is mixed to its end: the next one
            cursor[0] += 1
            cursor[1] = 0
