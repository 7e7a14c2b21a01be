"""Where a stream's units come from: one source as it is, or several sources mixed.

A stream packs a sequence of units. `OneSource` hands out its reader's units as they
are (unit u: the rank's u-th row group, or the u-th unit of an elastic layout);
`Mixture` interleaves whole documents of its sources into virtual units (mixer.py).
Both offer one interface, so the stream never asks which one it has:

    readers               one SourceReader per source (reader.py), in name order
    lazy                  units are made only while a free slot waits (a mixture: a
                          weight change then applies to the next batch not yet filled)
    take(unit)            the packer's next unit, or None while it is not finished
    blocked(unit, short)  the reader packing waits on for a task not yet out, or None
    shares()              per reader, its share of the stream's read-ahead (0: none)
    held_tokens()         per reader, tokens taken from it and not yet packed
    position(packed)      the stream's Position when its packer is at `packed`
    weights               a mixture's current weights (None: one source)

Failure behaviour: a reweight of one source is a StateMismatchError (it has no
weights); anything else is the readers' and the mixer's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer.dataset import SplitPlan
from tokenfeed.producer.exclude import keep_rule
from tokenfeed.producer.mixer import RECENT_BATCHES, Mixer
from tokenfeed.producer.position import BestFitPosition, Layout, Packed, Position
from tokenfeed.producer.reader import Source, SourceReader
from tokenfeed.producer.units import Unit


def skipped_units(start: Packed) -> frozenset[int]:
    """Units a best-fit resume reads past without needing them: between its buffer's
    earliest piece and its read position, holding no piece (pushed empty, untokenized)."""
    if not isinstance(start, BestFitPosition):
        return frozenset()
    held = {p.unit for p in start.pieces}
    return frozenset(u for u in range(start.first_unit, start.unit) if u not in held)


class OneSource:
    lazy = False
    filters: Mapping[str, str] | None = None  # the sources' filters, for positions

    def __init__(self, reader: SourceReader, layout: Layout | None) -> None:
        self.readers = [reader]
        self.layout = layout  # elastic.py: after an elastic resume, the rank's units

    @property
    def plans(self) -> dict[str, SplitPlan]:
        return {"": self.readers[0].plan}

    def take(self, unit: int) -> Unit | None:
        return self.readers[0].take(unit)

    def blocked(self, unit: int, short: bool) -> int | None:
        # A packer that holds a window or more with nothing out is not waiting: without
        # that test every loop pass took one more unit, so cached units (served in the
        # loop itself) filled the whole staging budget (+1.2-1.9 MB a unit).
        reader = self.readers[0]
        waiting = reader.retry or reader.next_part > 0 or short
        return 0 if waiting and reader.head_unscheduled(unit) else None

    weights = None

    def shares(self) -> list[float]:
        return [1.0]

    def held_tokens(self) -> list[int]:
        return [0]

    def position(self, packed: Packed) -> Position:
        counts = self.readers[0].counts_before(packed.unit)
        return Position(packed, elastic=self.layout, filters=self.filters,
                        filtered={n: counts for n in self.filters or ()} if counts else None)

    def forget_before(self, unit: int) -> None:
        pass

    def on_batch(self) -> None:
        pass

    def status(self, epochs: Mapping[str, list[int]]) -> dict[str, Any] | None:
        return None

    def reweight(self, weights: Mapping[str, float]) -> None:
        raise StateMismatchError("this stream reads one source: it has no weights")


class Mixture:
    lazy = True
    filters: Mapping[str, str] | None = None  # the sources' filters, for positions

    def __init__(self, mixer: Mixer, readers: list[SourceReader]) -> None:
        self.mixer = mixer
        self.readers = readers
        # per-source tokens mixed at each of the last batches filled (status: recent shares)
        self._recent: deque[list[int]] = deque(maxlen=RECENT_BATCHES + 1)

    @property
    def plans(self) -> dict[str, SplitPlan]:
        return {name: r.plan for name, r in zip(self.mixer.names, self.readers, strict=True)}

    def take(self, unit: int) -> Unit | None:
        return self.mixer.mix(lambda source, u: self.readers[source].take(u),
                              lambda source: len(self.readers[source].plan))

    def blocked(self, unit: int, short: bool) -> int | None:
        if self.mixer.blocked is not None:
            source, source_unit = self.mixer.blocked
            if self.readers[source].head_unscheduled(source_unit):
                return source
        return None

    @property
    def weights(self) -> dict[str, float]:
        return self.mixer.weights

    def shares(self) -> list[float]:
        weights = self.mixer.weights
        if not self.mixer.bounded:
            return [weights[name] if reader.error is None else 0.0
                    for name, reader in zip(self.mixer.names, self.readers, strict=True)]
        # a done source, or one whose reader scheduled its last unit, reads nothing more
        done, ends = self.mixer.done(), self.mixer.ends
        return [weights[name] if reader.error is None and not done[i] and (
                    ends[i] is None or reader.next_unit < ends[i]) else 0.0
                for i, (name, reader) in enumerate(zip(self.mixer.names, self.readers,
                                                       strict=True))]

    def held_tokens(self) -> list[int]:
        return [self.mixer.pending_tokens(i) for i in range(len(self.readers))]

    def position(self, packed: Packed) -> Position:
        mix = self.mixer.state(packed.first_unit, packed)
        counts = {name: reader.counts_before(mix.sources[name].unit)
                  for name, reader in zip(self.mixer.names, self.readers, strict=True)
                  if reader.filter is not None}
        return Position(packed, mix=mix, filters=self.filters,
                        filtered={n: c for n, c in counts.items() if c is not None} or None)

    def forget_before(self, unit: int) -> None:
        self.mixer.forget_before(unit)

    def on_batch(self) -> None:
        self._recent.append(self.mixer.totals())

    def reweight(self, weights: Mapping[str, float]) -> None:
        """New weights from the next virtual unit not yet mixed."""
        self.mixer.reweight(weights)

    def status(self, epochs: Mapping[str, list[int]]) -> dict[str, Any]:
        """Per source: target weight, realized token share over the stream's life and
        over the last RECENT_BATCHES batches, and epoch (counted as mixed, which runs
        ahead of delivery by the packer's buffer)."""
        totals = self.mixer.totals()
        first = self._recent[0] if self._recent else [0] * len(totals)
        recent = [t - f for t, f in zip(totals, first, strict=True)]

        def shares(counts: list[int]) -> list[float | None]:
            total = sum(counts)
            return [c / total if total else None for c in counts]

        weights = self.mixer.weights  # the target now (a schedule's: at the tokens mixed)
        done = self.mixer.done()
        documents = [c[4] for c in self.mixer.cursors]
        return {name: {"weight": weights[name], "share": whole, "share_recent": last,
                       "epoch": epochs[name][0], "tokens": tokens, "documents": docs,
                       "done": is_done}
                for name, whole, last, tokens, docs, is_done in zip(
                    self.mixer.names, shares(totals), shares(recent), totals, documents, done,
                    strict=True)}


Supply = OneSource | Mixture


def make_supply(sid: int, spec: StreamSpec, sources: list[Source], start: Position,
                reader_options: dict[str, Any]) -> Supply:
    """The supply of a stream `sid` starting at `start`: a mixture when the position
    holds a mixture state (its sources in the state's name order), else one source."""
    supply = _make_supply(sid, spec, sources, start, reader_options)
    supply.filters = source_filters(sources)
    return supply


def filter_counts(supply: Supply) -> dict[str, dict[str, Any]] | None:
    """Per filtered source (status): its filter, documents kept and rows dropped (the
    filter false or null, or no text), as read so far (read-ahead included)."""
    if not supply.filters:
        return None
    names = supply.mixer.names if isinstance(supply, Mixture) else tuple(supply.filters)
    return {name: {"filter": r.filter.text, "kept": r.documents, "dropped": r.dropped}
            for name, r in zip(names, supply.readers, strict=True) if r.filter is not None}


def _counted(start: Position, name: str, unit: int) -> tuple[int, int, int] | None:
    """(unit, kept, dropped) a resumed source's counts continue from (None: from 0)."""
    counts = (start.filtered or {}).get(name)
    return (unit, *counts) if counts is not None else None


def source_filters(sources: list[Source]) -> dict[str, str] | None:
    """The filters of `sources` that have one, normalized, by name (None: none has)."""
    return {s.name: s.filter.text for s in sources if s.filter is not None} or None


def _make_supply(sid: int, spec: StreamSpec, sources: list[Source], start: Position,
                 reader_options: dict[str, Any]) -> Supply:
    common = {"rank": spec.rank, "world_size": spec.world_size,
              "shuffle_seed": spec.shuffle_seed, **reader_options}
    mix = start.mix
    if mix is None:
        src = sources[0]
        reader = SourceReader(sid, 0, src.plan, src.column, cache=src.cache,
                              first_unit=start.first_unit, skip=skipped_units(start.packed),
                              layout=start.elastic, exclude=src.exclude,
                              exclude_keep=keep_rule(start.exclude, spec.packing == "bestfit"),
                              filter=src.filter,
                              counted=_counted(start, src.name, start.packed.unit),
                              in_file=spec.packing == "concat", **common)
        return OneSource(reader, start.elastic)
    if [s.name for s in sources] != list(mix.names):
        raise StateMismatchError(f"a mixture of {', '.join(mix.names)} needs those sources")
    layouts = mix.layouts or {}
    limits = mix.limits or {}
    readers, ends = [], []
    for i, src in enumerate(sources):
        options = dict(common)
        repeat = limits[src.name].repeat if src.name in limits else None
        if repeat is not None and options["shuffle_seed"] is None:
            options["shuffle_seed"] = REPEAT_SEED  # each pass in a new order, even unshuffled
        readers.append(SourceReader(sid, i, src.plan, src.column, cache=src.cache,
                                    first_unit=mix.sources[src.name].unit,
                                    layout=layouts.get(src.name), exclude=src.exclude,
                                    exclude_keep=keep_rule(start.exclude, True, src.name),
                                    filter=src.filter,
                                    counted=_counted(start, src.name,
                                                     mix.sources[src.name].unit),
                                    **options))
        ends.append(None if repeat is None else
                    layout_units(layouts.get(src.name),
                                 rank_units(len(src.plan), repeat, spec.rank, spec.world_size)))
    return Mixture(Mixer(mix, ends), readers)


REPEAT_SEED = 0  # the order of a repeated source's passes when the stream has no shuffle_seed


def layout_units(layout: Layout | None, stride_units: int) -> int:
    """Units of a rank that reads `layout` (elastic.py: its items, then its stride from
    unit `stride_from`) before its stride's unit `stride_units`: where a repeated source
    ends after an elastic resume (its items never pass the last pass: plan_mixture)."""
    if layout is None:
        return stride_units
    return layout.items + max(0, stride_units - layout.stride_from)


def rank_units(row_groups: int, epochs: int, rank: int, world_size: int) -> int:
    """Units of rank `rank` in the first `epochs` epochs of `row_groups` row groups a
    epoch (rank r reads global positions r, r + W, ...): where a repeated source ends."""
    return max(0, -(-(epochs * row_groups - rank) // world_size))
