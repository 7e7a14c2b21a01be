"""A stream's position, typed: where its next batch starts, and nothing else.

A `Position` is what a packer needs to cut the same windows again:

    packed    ConcatPosition (unit, offset): the next token is `offset` into the rank's
              `unit`-th unit; or BestFitPosition (unit, doc, docs_read, buffer): the next
              document to read and the buffered pieces (bestfit_codec.py)
    elastic   Layout: after an elastic resume, which units the rank reads (elastic.py)
    mix       MixState: a mixture's per-source cursors and weight schedule (mixer.py);
              its units are then virtual units of the mixed document stream
    filters   the filters in force, normalized, per source (filters.py): a resume under
              other filters is refused unless the daemon allows it (admission.py)
    filtered  per filtered source, documents kept and rows dropped before the position

Every module past the attach handler receives these frozen values; JSON exists only
at the edges: `Position.parse` checks what a consumer sends (a `state_dict()` cursor)
and `to_json` writes the cursor of every `ready`, with `cursor_json` adding where the
position lies (epoch and row-group ordinal, per source for a mixture) for status and
for the consumer's `epoch`. Two positions are equal exactly when they continue the
same way (derived fields are left out of the comparison): that is how a re-attaching
consumer finds its stream.

Failure behaviour: malformed or inconsistent JSON raises StateMismatchError naming the
field and the fix ("pass the feed state unchanged"); nothing else is constructed to
check it.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from typing import Any, NamedTuple

from tokenfeed.common.config import MAX_POSITION, MAX_SOURCES, StreamSpec, check_source_name
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer import bestfit_codec
from tokenfeed.producer.bestfit_codec import Piece
from tokenfeed.producer.dataset import SplitPlan
from tokenfeed.producer.recipe import Curve, Limits, parse_limits

MAX_SCHEDULE = 1000  # weight changes one mixture state may record

# Layout item kinds (elastic.py says what each keeps of its row group).
WHOLE, TOKENS, DOCS, PIECE, REST = 0, 1, 2, 3, 4
Item = tuple[int, int, int, int]  # (kind, g, a, b)
Run = tuple[int, int, int, int, int, int]  # (kind, g, a, b, count, step)


def is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_POSITION


@dataclass(frozen=True, slots=True)
class ConcatPosition:
    unit: int
    offset: int = 0
    doc: int = field(default=0, compare=False)  # the document `offset` is in: status only

    @property
    def first_unit(self) -> int:
        return self.unit

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "offset": self.offset, "doc": self.doc}

    @classmethod
    def parse(cls, d: Mapping[str, Any]) -> ConcatPosition:
        if not all(is_count(d.get(k)) for k in ("unit", "offset")):
            raise StateMismatchError(
                f"concat position {dict(d)!r} lacks integers 'unit' and 'offset' in "
                f"[0, {MAX_POSITION})")
        return cls(d["unit"], d["offset"])  # `doc` is recomputed at the next window


@dataclass(frozen=True)
class BestFitPosition:
    unit: int  # next document to read: (unit, doc)
    doc: int
    docs_read: int  # documents read into the buffer so far
    buffer: str  # the buffered pieces, compact (bestfit_codec.py)
    first_unit: int = field(compare=False)  # the earliest unit it names: where a resume reads

    @cached_property
    def pieces(self) -> tuple[Piece, ...]:
        return bestfit_codec.decode(self.buffer, self.unit, self.doc, self.docs_read,
                                    MAX_POSITION)

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "doc": self.doc, "docs_read": self.docs_read,
                "buffer": self.buffer}

    @classmethod
    def parse(cls, d: Mapping[str, Any], buffer_docs: int) -> BestFitPosition:
        unit: Any = d.get("unit")
        doc: Any = d.get("doc", 0)
        buf: Any = d.get("buffer", "")
        # Only differences of docs_read and born matter, so an empty buffer may omit it.
        docs_read: Any = d.get("docs_read", 0 if not buf else None)
        if not (is_count(unit) and is_count(doc) and is_count(docs_read)
                and isinstance(buf, str)):
            raise StateMismatchError(
                f"bestfit position lacks non-negative integers 'unit', 'doc' and 'docs_read' "
                f"and a string 'buffer' (got unit={unit!r}, doc={doc!r}, "
                f"docs_read={docs_read!r}, buffer of type {type(buf).__name__}); pass the "
                "feed state unchanged")
        pieces = bestfit_codec.decode(buf, unit, doc, docs_read, buffer_docs)
        position = cls(unit, doc, docs_read, buf, min([unit, *(p.unit for p in pieces)]))
        position.__dict__["pieces"] = pieces  # decoded once
        return position


Packed = ConcatPosition | BestFitPosition


@dataclass(frozen=True)
class Layout:
    """A rank's units after an elastic resume: `runs` of items (count > 1 only for WHOLE:
    global positions g, g + step, ...), then its stride from unit `stride_from`."""

    rank: int
    world_size: int
    runs: tuple[Run, ...]
    stride_from: int
    _ends: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ends", list(accumulate(r[4] for r in self.runs)))

    @property
    def items(self) -> int:
        return self._ends[-1] if self._ends else 0

    def item(self, unit: int) -> Item:
        """What unit `unit` of this rank is."""
        if unit >= self.items:
            return (WHOLE, self.rank + (self.stride_from + unit - self.items) * self.world_size,
                    0, 0)
        i = bisect_right(self._ends, unit)
        kind, g, a, b, count, step = self.runs[i]
        k = unit - (self._ends[i] - count)
        return (kind, g + k * step, a, b)

    def to_json(self) -> dict[str, Any]:
        return {"items": [list(r) for r in self.runs], "stride_from": self.stride_from}

    @classmethod
    def stride(cls, rank: int, world_size: int) -> Layout:
        """The plain layout: unit u is global position rank + u * world_size."""
        return cls(rank, world_size, (), 0)

    @classmethod
    def parse(cls, d: Any, rank: int, world_size: int) -> Layout:
        items = d.get("items") if isinstance(d, dict) else None
        if not (isinstance(items, list) and is_count(d.get("stride_from")) and all(
                isinstance(r, list) and len(r) == 6 and all(map(is_count, r))
                and r[0] in (WHOLE, TOKENS, DOCS, PIECE, REST) and r[4] >= 1
                and (r[0] == WHOLE or r[4] == 1) for r in items)):
            raise StateMismatchError(
                f"elastic layout {str(d)[:120]} is not {{'items': [[kind, g, a, b, count, "
                "step], ...], 'stride_from': unit}}; pass the feed state unchanged")
        return cls(rank, world_size, tuple(tuple(r) for r in items),
                   d["stride_from"])


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


@dataclass(frozen=True)
class ExcludeMark:
    """The exclusion list in force (producer/exclude.py), by its sha256, and where it
    began: in the rank's unit `unit`, the first `keep` tokens (concat) or documents (best
    fit) were read without it; every later row is subject to it. (0, 0) from the start.
    A mixture's list begins per source instead: `sources` holds (name, unit, documents
    kept) for each."""

    sha256: str
    unit: int = 0
    keep: int = 0
    sources: tuple[tuple[str, int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sha256": self.sha256, "unit": self.unit, "keep": self.keep}
        if self.sources:
            d["sources"] = {name: [unit, keep] for name, unit, keep in self.sources}
        return d

    @classmethod
    def parse(cls, d: Any) -> ExcludeMark:
        sha = d.get("sha256") if isinstance(d, dict) else None
        sources = d.get("sources", {}) if isinstance(d, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64
                and all(c in "0123456789abcdef" for c in sha)
                and is_count(d.get("unit", 0)) and is_count(d.get("keep", 0))
                and isinstance(sources, dict) and len(sources) <= MAX_SOURCES
                and all(isinstance(n, str) and isinstance(v, list) and len(v) == 2
                        and all(map(is_count, v)) for n, v in sources.items())):
            raise StateMismatchError(f"exclusion {str(d)[:120]} is not {{'sha256': 64 hex "
                                     "digits, 'unit': count, 'keep': count[, 'sources': "
                                     "{name: [unit, keep]}]}; pass the feed state unchanged")
        return cls(sha, d.get("unit", 0), d.get("keep", 0),
                   tuple((n, v[0], v[1]) for n, v in sorted(sources.items())))


@dataclass(frozen=True)
class Position:
    packed: Packed
    elastic: Layout | None = None
    mix: MixState | None = None
    exclude: ExcludeMark | None = None  # documents never delivered (None: no list)
    # The filters in force (filters.py), normalized, per source name: what the tokens up
    # to here were filtered by. Only its sources with a filter; None: none has one.
    filters: Mapping[str, str] | None = field(default=None, compare=False)
    # Per filtered source, (kept, dropped): documents kept and rows dropped in the rank's
    # units before the one the position reads (one source: its unit, best fit's next to
    # read; a mixture: the source cursor's). None: not counted (e.g. after an elastic
    # resume, or a state saved before filters).
    filtered: Mapping[str, tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def first_unit(self) -> int:
        """The earliest unit the packer needs: where reading starts on a resume."""
        return self.packed.first_unit

    def to_json(self) -> dict[str, Any]:
        d = self.packed.to_json()
        if self.elastic is not None:
            d["elastic"] = self.elastic.to_json()
        if self.mix is not None:
            d["mix"] = self.mix.to_json()
        if self.exclude is not None:
            d["exclude"] = self.exclude.to_json()
        if self.filters:
            d["filters"] = dict(self.filters)
        if self.filtered:
            d["filtered"] = {n: list(c) for n, c in self.filtered.items()}
        return d

    @classmethod
    def start(cls, spec: StreamSpec) -> Position:
        """The beginning of a stream."""
        if spec.packing == "bestfit":
            return cls(BestFitPosition(0, 0, 0, "", 0))
        return cls(ConcatPosition(0))

    @classmethod
    def parse(cls, d: Any, spec: StreamSpec, served: tuple[str, ...]) -> Position:
        """A consumer's saved cursor for a stream of `spec`, checked (its mixture state
        against the sources this daemon serves)."""
        if not isinstance(d, dict):
            raise StateMismatchError(f"position {str(d)[:80]} is not a map; pass the feed "
                                     "state unchanged")
        packed: Packed = (BestFitPosition.parse(d, spec.buffer_docs)
                          if spec.packing == "bestfit" else ConcatPosition.parse(d))
        elastic = (Layout.parse(d["elastic"], spec.rank, spec.world_size)
                   if "elastic" in d else None)
        mix = (MixState.parse(d["mix"], served, spec.rank, spec.world_size)
               if d.get("mix") is not None else None)
        if mix is not None and packed.first_unit != mix.at:
            raise StateMismatchError(
                f"the mixture state is at virtual unit {mix.at}, its position reads from unit "
                f"{packed.first_unit}; pass the feed state unchanged")
        exclude = ExcludeMark.parse(d["exclude"]) if d.get("exclude") is not None else None
        filters = d.get("filters")
        if filters is not None and not (
                isinstance(filters, dict) and len(filters) <= MAX_SOURCES and all(
                    isinstance(n, str) and isinstance(t, str) for n, t in filters.items())):
            raise StateMismatchError(f"position filters {str(filters)[:120]} are not "
                                     "{source: filter}; pass the feed state unchanged")
        filtered = d.get("filtered")
        if filtered is not None and not (
                isinstance(filtered, dict) and len(filtered) <= MAX_SOURCES and all(
                    isinstance(n, str) and isinstance(c, list) and len(c) == 2
                    and all(map(is_count, c)) for n, c in filtered.items())):
            raise StateMismatchError(f"position counts {str(filtered)[:120]} are not "
                                     "{source: [kept, dropped]}; pass the feed state unchanged")
        return cls(packed, elastic, mix, exclude, filters or None,
                   {n: (c[0], c[1]) for n, c in filtered.items()} if filtered else None)


def unit_position(plan: SplitPlan, layout: Layout | None, rank: int, world_size: int,
                  unit: int) -> tuple[int, int]:
    """(epoch, ordinal) of a rank's `unit`-th unit in the global row-group sequence."""
    if layout is not None:
        return divmod(layout.item(unit)[1], len(plan))
    return plan.unit_position(rank, world_size, unit)


def cursor_json(position: Position, plans: Mapping[str, SplitPlan], spec: StreamSpec
                ) -> dict[str, Any]:
    """`position` as the cursor consumers get: its JSON plus the epoch and row-group
    ordinal it lies in (a mixture: per source in `epochs`, and the furthest behind)."""
    d = position.to_json()
    mix = position.mix
    if mix is None:
        plan = next(iter(plans.values()))
        epoch, ordinal = unit_position(plan, position.elastic, spec.rank, spec.world_size,
                                       position.packed.unit)
        if epoch >= MAX_POSITION:
            raise StateMismatchError(
                f"position unit {position.packed.unit} of rank {spec.rank}/{spec.world_size} "
                f"lies in epoch {epoch}, past the largest exact position {MAX_POSITION}; the "
                "state is corrupt or from another data set")
        return {**d, "epoch": epoch, "row_group": ordinal}
    layouts = mix.layouts or {}
    epochs = {name: list(unit_position(plans[name], layouts.get(name), spec.rank,
                                       spec.world_size, cursor.unit))
              for name, cursor in mix.sources.items()}
    limits = mix.limits or {}

    def done(name: str) -> bool:  # a source past its repeat passes or budget: not behind
        lim, cursor = limits.get(name), mix.sources[name]
        return lim is not None and (
            (lim.repeat is not None and epochs[name][0] >= lim.repeat)
            or (lim.max_tokens is not None and cursor.total >= lim.max_tokens)
            or (lim.max_documents is not None and cursor.docs >= lim.max_documents))

    behind = min([e for n, e in epochs.items() if not done(n)] or epochs.values())
    return {**d, "epoch": behind[0], "row_group": behind[1], "epochs": epochs}
