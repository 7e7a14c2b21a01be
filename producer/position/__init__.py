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
    exclude   ExcludeMark: the exclusion list in force, and where it began (exclude.py)

The parts live in this package: packed.py (the packers' positions and `Layout`),
mixture.py (`MixState`), and here `ExcludeMark`, `Position` and the cursor JSON.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenfeed.common.config import MAX_POSITION, MAX_SOURCES, StreamSpec
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer.dataset import SplitPlan
from tokenfeed.producer.position.mixture import MAX_SCHEDULE, MixState, Schedule, SourceCursor
from tokenfeed.producer.position.packed import (
    DOCS,
    PIECE,
    REST,
    TOKENS,
    WHOLE,
    BestFitPosition,
    ConcatPosition,
    Item,
    Layout,
    Packed,
    Run,
    is_count,
)

__all__ = [
    "DOCS", "MAX_SCHEDULE", "PIECE", "REST", "TOKENS", "WHOLE", "BestFitPosition",
    "ConcatPosition", "ExcludeMark", "Item", "Layout", "MixState", "Packed", "Position",
    "Run", "Schedule", "SourceCursor", "cursor_json", "is_count", "unit_position",
]


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
