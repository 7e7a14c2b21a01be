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
`[from_unit, {name: weight}]`. A state (`cursor["mix"]`) holds the mixer at the
first virtual unit the packer still needs: `at`, every source's `[unit, doc, taken,
total]` (next document: its unit in the source's stream and index in it; tokens taken
since the last change; tokens taken in all), the schedule, and `mixed` (virtual units
mixed when the state was made: where a resume with other weights changes them).
Replaying from it with the same schedule reproduces the same virtual units.

Failure behaviour: a state naming a source this daemon does not serve, or malformed,
is a StateMismatchError naming it; a source whose rank reads no document at all in a
whole epoch is a DataError naming it (instead of spinning).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from tokenfeed.common.config import MAX_POSITION, MAX_SOURCES, check_source_name
from tokenfeed.common.errors import ConfigError, DataError, StateMismatchError
from tokenfeed.producer.pool import Result

DOCS_PER_UNIT = 64  # documents per virtual unit: a weight change waits at most this many
MAX_SCHEDULE = 1000  # weight changes one state may record
RECENT_BATCHES = 20  # status: realized shares over the last this many batches

Weights = dict[str, float]
Take = Callable[[int, int], "Result | None"]  # (source, unit) -> the unit, or None if not in


def initial_state(weights: Weights) -> dict[str, Any]:
    return {"at": 0, "mixed": 0, "sources": {n: [0, 0, 0, 0] for n in sorted(weights)},
            "weights": [[0, dict(sorted(weights.items()))]]}


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_POSITION


def parse_state(state: Any, served: tuple[str, ...]) -> dict[str, Any]:
    """`state` checked against the sources this daemon serves, in canonical form."""
    if not isinstance(state, dict) or not all(
            _count(state.get(k)) for k in ("at", "mixed")):
        raise StateMismatchError(f"mixture state {str(state)[:120]} lacks counts 'at' and "
                                 "'mixed'; pass the feed state unchanged")
    sources, schedule = state.get("sources"), state.get("weights")
    if not isinstance(sources, dict) or not 1 <= len(sources) <= MAX_SOURCES:
        raise StateMismatchError("mixture state has no 'sources' map")
    for name, cursor in sources.items():
        if name not in served:
            raise StateMismatchError(
                f"the saved mixture reads source {name!r}, which this daemon does not serve "
                f"(its sources: {', '.join(served)}); serve it with --source {name}=PATH, "
                "under the same name"
            )
        if not (isinstance(cursor, list) and len(cursor) == 4 and all(map(_count, cursor))):
            raise StateMismatchError(f"mixture state of source {name!r} is not "
                                     "[unit, doc, taken, total] counts")
    if not isinstance(schedule, list) or not 1 <= len(schedule) <= MAX_SCHEDULE:
        raise StateMismatchError(f"mixture state needs 1 to {MAX_SCHEDULE} weight entries")
    entries: list[list[Any]] = []
    for entry in schedule:
        if not (isinstance(entry, list) and len(entry) == 2 and _count(entry[0])
                and isinstance(entry[1], dict)):
            raise StateMismatchError(f"mixture weight entry {str(entry)[:80]} is not "
                                     "[from_unit, {source: weight}]")
        if entries and entry[0] <= entries[-1][0]:
            raise StateMismatchError("mixture weight entries are not in increasing order")
        try:
            weights = {check_source_name(n): float(w) for n, w in entry[1].items()}
        except (ConfigError, TypeError, ValueError) as e:
            raise StateMismatchError(f"mixture weights {entry[1]!r}: {e}") from None
        if set(weights) != set(sources) or not all(
                math.isfinite(w) and w >= 0 for w in weights.values()) or not any(
                weights.values()):
            raise StateMismatchError(f"mixture weights {entry[1]!r} must give every source "
                                     "of the state a weight >= 0, one of them > 0")
        entries.append([entry[0], dict(sorted(weights.items()))])
    if entries[0][0] > state["at"] or state["mixed"] < state["at"]:
        raise StateMismatchError("mixture state: its weights begin after its position")
    canonical = {"at": state["at"], "mixed": state["mixed"],
                 "sources": {n: list(sources[n]) for n in sorted(sources)}, "weights": entries}
    layouts = state.get("layouts")
    if layouts is not None:  # after an elastic resume: each source's units (elastic.py)
        if not isinstance(layouts, dict) or not set(layouts) <= set(sources):
            raise StateMismatchError("mixture state: 'layouts' must map its sources to "
                                     "elastic layouts")
        canonical["layouts"] = {n: layouts[n] for n in sorted(layouts)}
    return canonical


def with_weights(state: dict[str, Any], weights: Weights) -> dict[str, Any]:
    """`state`, changing to `weights` at the first virtual unit it has not mixed.
    Sources new to the state start at their beginning."""
    sources = dict(state["sources"])
    for name in weights:
        sources.setdefault(name, [0, 0, 0, 0])
    full = {n: float(weights.get(n, 0.0)) for n in sorted(sources)}
    schedule = [[at, {n: w.get(n, 0.0) for n in sorted(sources)}] for at, w in state["weights"]]
    if schedule[-1][1] == full:
        return {**state, "sources": dict(sorted(sources.items())), "weights": schedule}
    at = state["mixed"]
    schedule = [e for e in schedule if e[0] < at] + [[at, full]]
    return {**state, "sources": dict(sorted(sources.items())), "weights": schedule}


class Mixer:
    """Cuts the mixed document stream into virtual units, replaying from a state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.names: tuple[str, ...] = tuple(state["sources"])
        self.next_unit = int(state["at"])  # the next virtual unit to mix
        self.schedule: list[list[Any]] = [list(e) for e in state["weights"]]
        self.cursors = [list(state["sources"][n]) for n in self.names]
        self.pending: list[deque[Result]] = [deque() for _ in self.names]  # cursor's unit first
        self.blocked: tuple[int, int] | None = None  # (source, unit) the next unit waits for
        self.snapshots: dict[int, list[list[int]]] = {self.next_unit: self._copy()}
        # (source, its unit, its document, tokens) of each document of a virtual unit
        self.compositions: dict[int, list[tuple[int, int, int, int]]] = {}
        self.layouts: dict[str, Any] | None = state.get("layouts")
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
            self.schedule.append([self.next_unit, full])

    def state(self, at: int) -> dict[str, Any]:
        """The state to resume at virtual unit `at` (one this mixer has snapshotted)."""
        state = {"at": at, "mixed": self.next_unit,
                 "sources": dict(zip(self.names, (list(c) for c in self.snapshots[at]),
                                     strict=True)),
                 "weights": [[e[0], dict(e[1])] for e in self.schedule]}
        if self.layouts is not None:
            state["layouts"] = self.layouts
        return state

    def exact(self, position: dict[str, Any], bestfit: bool) -> dict[str, list[int]]:
        """Every source's next token not delivered at packer `position` (best fit: next
        document not read), as [unit, doc, token]: what an elastic resume divides."""
        v = int(position["unit"])
        comp = self.compositions.get(v, [])
        i, t = (int(position.get("doc", 0)), 0) if bestfit else (len(comp), 0)
        if not bestfit:
            left = int(position.get("offset", 0))
            for j, (_, _, _, n) in enumerate(comp):
                if left < n:
                    i, t = j, left
                    break
                left -= n
        after = self.snapshots[v + 1] if v in self.compositions else self.snapshots[v]
        exact = {}
        for s, name in enumerate(self.names):
            k = next((k for k in range(i, len(comp)) if comp[k][0] == s), None)
            exact[name] = ([comp[k][1], comp[k][2], t if k == i else 0] if k is not None
                           else [after[s][0], after[s][1], 0])
        return exact

    def pieces(self, refs: list[tuple[int, int, int, int, int]]) -> list[int]:
        """Best-fit buffer pieces (virtual unit, doc, start, ...) as [source, unit, doc,
        start] each, flat."""
        flat: list[int] = []
        for u, d, start, _tail, _born in refs:
            source, unit, doc, _ = self.compositions[u][d]
            flat += [source, unit, doc, start]
        return flat

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

    def mix(self, take: Take, epoch_units: Callable[[int], int]) -> Result | None:
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
        chosen: list[tuple[int, Result, int, int]] = []
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
        return Result.of_rows(chosen[0][1].task, tokens, lengths)

    def _next_doc(self, source: int, cursor: list[int], depth: list[int], take: Take,
                  epoch_units: Callable[[int], int]) -> tuple[Result, int, int] | None:
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
