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
`(from_unit, {name: weight})`. A state (position/mixture.py's MixState) holds the mixer at
the first virtual unit the packer still needs: `at`, every source's cursor (next
document: its unit in the source's stream and index in it; tokens taken since the
last change; tokens taken in all), the schedule, and `mixed` (virtual units mixed
when the state was made: where a resume with other weights changes them).
Replaying from it with the same schedule reproduces the same virtual units.

A declared schedule (recipe.py's Curve, in the state) replaces the fixed weights until
the first live change: with `X` the tokens mixed so far, the rule takes the source of
positive weight at `X` with the largest deficit `C_s(X) - t_s`, where `C_s(X)` is the
integral of its scheduled weight from 0 to X. Each source's realized tokens therefore
stay within one document of its scheduled integral (the batches delivered trail `X` by
the packer's buffer: less than one virtual unit).

Limits (recipe.py's Limits, in the state): a source is done once its cursor reaches
`ends[s]` (the first unit after `repeat` epochs of its rank's row groups: supply.py),
or once it gave `max_tokens` tokens or `max_documents` documents (checked before each
document: a budget is passed by less than one document). A done source is left out and
the others share its weight in proportion to theirs. Whether a source is done is a
function of its cursor alone, so a replay finds the same.

Failure behaviour: a source whose rank reads no document at all in a whole epoch is
a DataError naming it (instead of spinning); so is a mixture whose every source of
positive weight is done (the recipe is complete), after a last virtual unit of the
documents left (shorter than DOCS_PER_UNIT).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

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
from tokenfeed.producer.recipe import Limits
from tokenfeed.producer.units import Unit

DOCS_PER_UNIT = 64  # documents per virtual unit: a weight change waits at most this many
RECENT_BATCHES = 20  # status: realized shares over the last this many batches

Weights = dict[str, float]
Take = Callable[[int, int], "Unit | None"]  # (source, unit) -> the unit, or None if not in
DONE = "done"  # _next_doc: the source has no document left (its repeat count is reached)


class Mixer:
    """Cuts the mixed document stream into virtual units, replaying from a state."""

    def __init__(self, state: MixState, ends: list[int | None] | None = None) -> None:
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
        self.curve = state.curve
        self._curve_of = ([state.curve.names.index(n) if n in state.curve.names else None
                           for n in self.names] if state.curve is not None else [])
        # (lo, hi, area, a, b) of the schedule's segment last used (_scheduled)
        self._segment: tuple[Any, ...] = (0, -1)
        self.limits = [(state.limits or {}).get(n) or Limits() for n in self.names]
        self.ends = list(ends) if ends is not None else [None] * len(self.names)
        self.bounded = any(self.limits) or any(e is not None for e in self.ends)
        # sources found done while mixing (status, read-ahead): a source whose last unit is
        # mixed to its end is found done only when the mixer next asks it for a document
        self.finished: set[int] = set()

    def _copy(self) -> list[list[int]]:
        return [list(c) for c in self.cursors]

    def weights_at(self, unit: int) -> list[float]:
        entry = next(e for e in reversed(self.schedule) if e[0] <= unit)
        return [float(entry[1].get(n, 0.0)) for n in self.names]

    def _curve_at(self, unit: int) -> bool:
        """Whether the declared schedule decides at virtual unit `unit` (until the first
        live change)."""
        return self.curve is not None and (len(self.schedule) == 1
                                           or unit < self.schedule[1][0])

    def _scheduled(self, x: int) -> tuple[list[float], list[float]]:
        """Every source's scheduled weight and target tokens at `x` tokens mixed (the
        schedule's segment is kept while x stays in it: ~2x faster a document)."""
        if not self._segment[0] <= x < self._segment[1]:
            assert self.curve is not None
            lo, hi, pieces = self.curve.segment(x)
            mapped = tuple([p[k] if k is not None else 0.0 for k in self._curve_of]
                           for p in pieces)
            self._segment = (lo, hi, *mapped)
        lo, _, area, a, b = self._segment
        dx = x - lo
        return ([ai + 2 * bi * dx for ai, bi in zip(a, b, strict=True)],
                [ci + dx * (ai + bi * dx) for ci, ai, bi in zip(area, a, b, strict=True)])

    @property
    def weights(self) -> Weights:
        """The target weights now: the schedule's at the tokens mixed so far."""
        if self._curve_at(self.next_unit):
            return dict(zip(self.names, self._scheduled(sum(self.totals()))[0], strict=True))
        return dict(zip(self.names, self.weights_at(self.next_unit), strict=True))

    def done(self) -> list[bool]:
        """Per source: no document left to give (repeat count or budget reached)."""
        return [d or i in self.finished for i, d in enumerate(self._done(self.cursors))]

    def _done(self, cursors: list[list[int]]) -> list[bool]:
        return [self._spent(i, c) or (end is not None and c[0] >= end)
                for i, (c, end) in enumerate(zip(cursors, self.ends, strict=True))]

    def _spent(self, source: int, cursor: list[int]) -> bool:
        limits = self.limits[source]
        return ((limits.max_tokens is not None and cursor[3] >= limits.max_tokens)
                or (limits.max_documents is not None and cursor[4] >= limits.max_documents))

    def reweight(self, weights: Weights) -> None:
        """New weights from the next virtual unit not yet mixed."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ConfigError(f"this stream mixes {', '.join(self.names)}, not "
                              f"{', '.join(sorted(unknown))}")
        full = {n: float(weights.get(n, 0.0)) for n in self.names}
        self.schedule = [e for e in self.schedule if e[0] < self.next_unit]
        if self.schedule[-1][1] != full or self._curve_at(self.next_unit):
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
        limits = {n: v for n, v in zip(self.names, self.limits, strict=True) if v} or None
        given = (self._given(position) if self.curve is not None or self.bounded else None)
        return MixState(at, dict(zip(self.names, cursors, strict=True)), tuple(self.schedule),
                        self.next_unit, self.layouts, self._exact(position), pieces,
                        curve=self.curve, limits=limits, given=given)

    def _given(self, position: Packed) -> dict[str, tuple[int, int]]:
        """Every source's tokens and documents given at packer `position` (what an
        elastic resume carries on). Concat: a document cut at the position counts its
        tokens delivered, not itself (the new rank that reads its rest counts it); best
        fit: documents read, less the pieces still buffered (their new rank counts them;
        a buffered tail's BOS is counted once more there)."""
        v = position.unit
        comp = self.compositions.get(v, [])
        snap = self.snapshots[v]
        tokens, docs = [c[3] for c in snap], [c[4] for c in snap]
        if isinstance(position, ConcatPosition):
            left = position.offset
            for s, _, _, n in comp:
                if left < n:
                    tokens[s] += left
                    break
                tokens[s], docs[s], left = tokens[s] + n, docs[s] + 1, left - n
        else:
            for s, _, _, n in comp[:position.doc]:
                tokens[s], docs[s] = tokens[s] + n, docs[s] + 1
            for p in position.pieces:
                s, _, _, n = self.compositions[p.unit][p.doc]
                tokens[s], docs[s] = tokens[s] - (n - p.start), docs[s] - 1
        if not self.bounded:  # documents are counted only where limits may use them
            docs = [0] * len(docs)
        return {name: (max(0, t), max(0, d))
                for name, t, d in zip(self.names, tokens, docs, strict=True)}

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
        curve = self._curve_at(self.next_unit)
        done = self._done(cursors) if self.bounded else None
        while len(chosen) < DOCS_PER_UNIT:
            if curve or done is not None:
                choice = self._choose(cursors, weights, curve, done)
                if choice is None:
                    if chosen:  # the recipe ends inside this unit: deliver what it has
                        break
                    finished = [self.names[i] for i in range(len(cursors)) if done and done[i]]
                    raise DataError(
                        "every source of positive weight in this mixture is done ("
                        f"{', '.join(finished)}: repeat passes or budgets reached): the "
                        "recipe is complete and every full batch of it was delivered; to "
                        "train on, start a new stream (without load_state_dict) from a mix "
                        "file with more repeats or larger budgets")
                best = choice
            else:  # fixed weights, no limits: 0.2.0's rule, as it was
                total = sum(cursors[i][2] for i in active)
                best = max(active, key=lambda i: (weights[i] * total - cursors[i][2], -i))
            doc = self._next_doc(best, cursors[best], depth, take, epoch_units)
            if doc is None:
                return None
            if not isinstance(doc, tuple):  # DONE: its last pass has ended
                assert done is not None
                done[best] = True
                self.finished.add(best)
                continue
            result, lo, hi = doc
            chosen.append((best, result, lo, hi))
            composition.append((best, cursors[best][0], cursors[best][1], hi - lo))
            cursors[best][1] += 1
            cursors[best][2] += hi - lo
            cursors[best][3] += hi - lo
            if done is not None:  # documents are counted only where limits may use them
                cursors[best][4] += 1
                done[best] = self._spent(best, cursors[best])
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

    def _choose(self, cursors: list[list[int]], weights: list[float], curve: bool,
                done: list[bool] | None) -> int | None:
        """The source of the next document: the largest deficit against the schedule's
        cumulative target (curve) or the fixed weights, among sources not done (None:
        every source of positive weight is done)."""
        n = len(cursors)
        targets: list[float] | None = None
        if curve:
            weights, targets = self._scheduled(sum(c[2] for c in cursors))
        if targets is not None and not any(done or ()):  # the hot path: no source done
            best, gap = -1, 0.0
            for i in range(n):
                if weights[i] > 0 and (best < 0 or targets[i] - cursors[i][2] > gap):
                    best, gap = i, targets[i] - cursors[i][2]
            if best >= 0:
                return best
        live = [i for i in range(n) if weights[i] > 0 and not (done and done[i])]
        if not live:
            return None  # every source of positive weight is done
        taken = [cursors[i][2] for i in live]
        if targets is not None and not any(done or ()):
            deficit = {i: targets[i] - cursors[i][2] for i in live}
        elif targets is not None and sum(targets[i] for i in live) > 0:
            # some sources are done: the live ones share the schedule's targets, scaled to
            # what they took (their deficits then sum to 0, as without a done source)
            scale = sum(taken) / sum(targets[i] for i in live)
            deficit = {i: targets[i] * scale - cursors[i][2] for i in live}
        else:
            share = sum(weights[i] for i in live)
            total = sum(taken)
            deficit = {i: weights[i] / share * total - cursors[i][2] for i in live}
        return max(live, key=lambda i: (deficit[i], -i))

    def _next_doc(self, source: int, cursor: list[int], depth: list[int], take: Take,
                  epoch_units: Callable[[int], int]) -> tuple[Unit, int, int] | str | None:
        """The document at `cursor` of `source` (moving the cursor past ended units), or
        DONE past the source's last unit (`ends`)."""
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
            end = self.ends[source]
            if end is not None and cursor[0] >= end:
                return DONE
