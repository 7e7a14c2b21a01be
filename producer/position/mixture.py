"""A mixture's position: per-source cursors, the weight schedule, the declared recipe.

`MixState` is what mixer.py needs to mix the same virtual units again; its JSON is the
`mix` field of a cursor (the package's __init__ says how it joins a `Position`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tokenfeed.common.config import MAX_SOURCES, check_source_name
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.position.packed import Layout, is_count
from tokenfeed.producer.recipe import Curve, Limits, parse_limits

MAX_SCHEDULE = 1000  # weight changes one mixture state may record


class SourceCursor(NamedTuple):
    """A mixture source's next document (its unit in the source's stream, and index in
    it), tokens taken since the weights last changed, tokens and documents taken in all
    (a state saved by 0.2.0 lacks `docs`: 0, used only by max_documents)."""

    unit: int
    doc: int
    taken: int
    total: int
    docs: int = 0


Schedule = tuple[tuple[int, Mapping[str, float]], ...]  # (from virtual unit, weights)


@dataclass(frozen=True)
class MixState:
    """A mixture at virtual unit `at` (mixer.py): enough to mix the same units again."""

    at: int
    sources: Mapping[str, SourceCursor]  # in name order
    schedule: Schedule
    mixed: int = field(default=0, compare=False)  # virtual units mixed when it was made
    layouts: Mapping[str, Layout] | None = None  # after an elastic resume, per source
    # Only in cursors (what an elastic resume divides): every source's next token not
    # delivered as (unit, doc, token) (best fit: next document not read), and best fit's
    # buffered pieces as source documents, (source index, unit, doc, start) each.
    exact: Mapping[str, tuple[int, int, int]] | None = field(default=None, compare=False)
    pieces: tuple[tuple[int, int, int, int], ...] | None = field(default=None, compare=False)
    # The declared recipe (recipe.py): a weight schedule over tokens mixed, in force until
    # the first live change of `schedule`, and per-source limits (repeat, budgets).
    curve: Curve | None = None
    limits: Mapping[str, Limits] | None = None
    # Only in cursors of a mixture with a schedule or limits: every source's tokens and
    # documents given at `exact` (the counts of `sources` are at `at`): what an elastic
    # resume carries on (elastic.plan_mixture).
    given: Mapping[str, tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.sources)

    @property
    def weights(self) -> dict[str, float]:
        """The latest weights of the schedule."""
        return dict(self.schedule[-1][1])

    @classmethod
    def initial(cls, weights: Mapping[str, float], curve: Curve | None = None,
                limits: Mapping[str, Limits] | None = None) -> MixState:
        """A new mixture; with a `curve`, its weights at 0 tokens replace `weights`."""
        names = sorted(weights)
        if curve is not None:
            at_zero = dict(zip(curve.names, curve.weights(0), strict=True))
            weights = {n: at_zero.get(n, 0.0) for n in names}
        limits = {n: v for n, v in (limits or {}).items() if v and n in weights} or None
        return cls(0, {n: SourceCursor(0, 0, 0, 0) for n in names},
                   ((0, {n: float(weights[n]) for n in names}),), curve=curve, limits=limits)

    def with_weights(self, weights: Mapping[str, float]) -> MixState:
        """This state, changing to `weights` at the first virtual unit it has not mixed.
        Sources new to the state start at their beginning."""
        sources = dict(self.sources)
        for name in weights:
            sources.setdefault(name, SourceCursor(0, 0, 0, 0))
        names = sorted(sources)
        full = {n: float(weights.get(n, 0.0)) for n in names}
        schedule = [(at, {n: w.get(n, 0.0) for n in names}) for at, w in self.schedule]
        curve = self.curve
        if schedule[-1][1] != full or (curve is not None and len(schedule) == 1):
            schedule = [e for e in schedule if e[0] < self.mixed] + [(self.mixed, full)]
            if len(schedule) == 1:  # the new weights hold from the start: no schedule left
                curve = None
        return MixState(self.at, {n: sources[n] for n in names}, tuple(schedule), self.mixed,
                        self.layouts, curve=curve, limits=self.limits)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "at": self.at, "mixed": self.mixed,
            # `docs` only where limits count them: 0.2.0's states stay as they were
            "sources": {n: list(c) if self.limits else list(c)[:4]
                        for n, c in self.sources.items()},
            "weights": [[at, dict(w)] for at, w in self.schedule]}
        if self.layouts is not None:
            d["layouts"] = {n: layout.to_json() for n, layout in self.layouts.items()}
        if self.exact is not None:
            d["exact"] = {n: list(e) for n, e in self.exact.items()}
        if self.pieces is not None:
            d["pieces"] = [v for p in self.pieces for v in p]
        if self.curve is not None:
            d["curve"] = self.curve.to_json()
        if self.limits:
            d["limits"] = {n: v.to_json() for n, v in self.limits.items()}
        if self.given is not None:
            d["given"] = {n: list(g) for n, g in self.given.items()}
        return d

    @classmethod
    def parse(cls, state: Any, served: tuple[str, ...], rank: int, world_size: int) -> MixState:
        """`state` checked against the sources this daemon serves."""
        if not isinstance(state, dict) or not all(is_count(state.get(k)) for k in ("at", "mixed")):
            raise StateMismatchError(f"mixture state {str(state)[:120]} lacks counts 'at' and "
                                     "'mixed'; pass the feed state unchanged")
        sources, schedule = state.get("sources"), state.get("weights")
        if not isinstance(sources, dict) or not 1 <= len(sources) <= MAX_SOURCES:
            raise StateMismatchError("mixture state has no 'sources' map")
        for name, cursor in sources.items():
            if name not in served:
                raise StateMismatchError(
                    f"the saved mixture reads source {name!r}, which this daemon does not "
                    f"serve (its sources: {', '.join(served)}); serve it with --source "
                    f"{name}=PATH, under the same name")
            if not (isinstance(cursor, list) and len(cursor) in (4, 5)
                    and all(map(is_count, cursor))):
                raise StateMismatchError(f"mixture state of source {name!r} is not "
                                         "[unit, doc, taken, total] counts (then docs)")
        names = sorted(sources)
        entries = _parse_schedule(schedule, set(names))
        if entries[0][0] > state["at"] or state["mixed"] < state["at"]:
            raise StateMismatchError("mixture state: its weights begin after its position")
        layouts = state.get("layouts")
        if layouts is not None:
            if not isinstance(layouts, dict) or not set(layouts) <= set(sources):
                raise StateMismatchError("mixture state: 'layouts' must map its sources to "
                                         "elastic layouts")
            layouts = {n: Layout.parse(layouts[n], rank, world_size) for n in sorted(layouts)}
        exact, pieces = _parse_exact(state, names)
        curve = Curve.parse(state["curve"]) if state.get("curve") is not None else None
        limits = (parse_limits(state["limits"], tuple(names))
                  if state.get("limits") is not None else None)
        given = state.get("given")
        if given is not None and not (isinstance(given, dict) and set(given) == set(names) and all(
                isinstance(g, list) and len(g) == 2 and all(map(is_count, g))
                for g in given.values())):
            raise StateMismatchError("mixture state's 'given' must map every source to "
                                     "[tokens, documents]; pass the feed state unchanged")
        return cls(state["at"], {n: SourceCursor(*sources[n]) for n in names}, entries,
                   state["mixed"], layouts, exact, pieces, curve=curve, limits=limits,
                   given=({n: (given[n][0], given[n][1]) for n in names}
                          if given is not None else None))


def _parse_schedule(schedule: Any, names: set[str]) -> Schedule:
    if not isinstance(schedule, list) or not 1 <= len(schedule) <= MAX_SCHEDULE:
        raise StateMismatchError(f"mixture state needs 1 to {MAX_SCHEDULE} weight entries")
    entries: list[tuple[int, Mapping[str, float]]] = []
    for entry in schedule:
        if not (isinstance(entry, list) and len(entry) == 2 and is_count(entry[0])
                and isinstance(entry[1], dict)):
            raise StateMismatchError(f"mixture weight entry {str(entry)[:80]} is not "
                                     "[from_unit, {source: weight}]")
        if entries and entry[0] <= entries[-1][0]:
            raise StateMismatchError("mixture weight entries are not in increasing order")
        try:
            weights = {check_source_name(n): float(w) for n, w in entry[1].items()}
        except (ConfigError, TypeError, ValueError) as e:
            raise StateMismatchError(f"mixture weights {entry[1]!r}: {e}") from None
        if set(weights) != names or not all(
                math.isfinite(w) and w >= 0 for w in weights.values()) or not any(
                weights.values()):
            raise StateMismatchError(f"mixture weights {entry[1]!r} must give every source "
                                     "of the state a weight >= 0, one of them > 0")
        entries.append((entry[0], dict(sorted(weights.items()))))
    return tuple(entries)


def _parse_exact(state: dict[str, Any], names: list[str]) -> tuple[
        dict[str, tuple[int, int, int]] | None, tuple[tuple[int, int, int, int], ...] | None]:
    exact, flat = state.get("exact"), state.get("pieces")
    if exact is None:
        return None, None
    if not (isinstance(exact, dict) and set(exact) == set(names) and all(
            isinstance(e, list) and len(e) == 3 and all(map(is_count, e))
            for e in exact.values())):
        raise StateMismatchError("its mixture state lacks 'exact' [unit, doc, token] for "
                                 "every source; pass the feed state unchanged")
    if flat is None:
        return {n: tuple(exact[n]) for n in names}, None
    if not (isinstance(flat, list) and len(flat) % 4 == 0 and all(map(is_count, flat))
            and all(flat[i] < len(names) for i in range(0, len(flat), 4))):
        raise StateMismatchError("its mixture state's 'pieces' are not [source, unit, doc, "
                                 "start] counts")
    pieces = tuple(tuple(flat[i:i + 4]) for i in range(0, len(flat), 4))
    return ({n: tuple(exact[n]) for n in names},
            pieces)
