"""Elastic resume: a job saved by W ranks continues on W' ranks, every token once.

A rank's units are normally its stride of the global row-group sequence: unit u is
global position g = rank + u * W (epoch g // N, ordinal g % N). After an elastic
resume a rank first reads a list of ITEMS, then its stride from unit `stride_from`
on: a `Layout`. An item is a global position and what is left of it:

    WHOLE  (g)          every document of g's row group
    TOKENS (g, a)       its tokens from token a on (concat: a prefix went to an old rank,
                        which may have cut a document: its rest comes first, no BOS)
    DOCS   (g, a)       its documents from document a on (best fit: the read position)
    PIECE  (g, a, b)    document a alone, from token b on (best fit: a buffered piece;
                        b > 0: a tail, the document's BOS then tokens b..)
    REST   (g, a, b)    its documents from document a on, the first from token b on (a
                        mixture's source under concat; b > 0: no BOS, a prefix went before)

The rule (`plan`): E* is the latest epoch any old rank is in (its read unit's). Every
old rank's remaining work up to the end of epoch E* — its partial unit from the exact
token (concat) or its buffered pieces and read position (best fit), then its unread
units with g < (E* + 1) * N, items of an earlier elastic resume included — is listed,
sorted by (g, document, token), and cut into W' consecutive chunks of about equal
weight (the row group's text bytes from the footer: whole, in proportion of documents
left, one document for a piece, text bytes minus 4 per token delivered for a partial
unit). New rank r' reads chunk r', then its own stride from the first unit past epoch
E*: later epochs are the new world size's normal order. A layout is saved in the
cursor (`elastic`), so such a rank checkpoints and resumes (elastically again, too).

A mixture is divided the same way, each source on its own (its own E*, items and
stride, `layouts` in the mixture state), from the exact position of every source the
mixture state records (`exact`: next token not delivered; best fit: next document not
read, and the buffered pieces as source documents); the new ranks mix their sources
from the start of their lists with the old job's current weights.

A declared recipe carries on. A source with `repeat = k` is divided only up to the end
of its pass k (a rank that finished its passes is in epoch k; no rank reads past it),
and a new rank's source ends where its layout reaches the end of pass k. Each new rank
starts from the old ranks' mean counts at their exact positions (`given`): tokens
mixed per source, which place it on the weight schedule (while no live change has
fixed the weights), and tokens and documents given, which its budgets count on from.
So a schedule's x and a budget stay per rank stream, as without a re-layout: after it,
each new rank is where an average old rank was.

Failure behaviour: a malformed layout or a state that does not fit the data is a
StateMismatchError naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer.dataset import RowGroupRef
from tokenfeed.producer.position import (
    DOCS,
    PIECE,
    REST,
    TOKENS,
    WHOLE,
    BestFitPosition,
    Item,
    Layout,
    MixState,
    Position,
    Run,
    SourceCursor,
)
from tokenfeed.producer.units import Unit


def layout_of(position: Position, rank: int, world_size: int) -> Layout:
    """The layout a saved rank reads: its own, or the plain stride."""
    return position.elastic or Layout.stride(rank, world_size)


def apply(item: Item, result: Unit) -> Unit:
    """What is left of a tokenized row group (`result`, every document) under `item`."""
    kind, g, a, b = item
    if kind == WHOLE:
        return result
    tokens, starts = result.tokens, result.doc_starts
    docs = len(starts)
    ends = [*starts[1:].tolist(), len(tokens)]
    if kind == TOKENS:
        if a > len(tokens):
            raise StateMismatchError(f"an elastic state resumes token {a} of global row group "
                                     f"{g}, which holds {len(tokens)}; it is of other data")
        kept = starts[starts >= a] - a
        return Unit(tokens[a:], kept)
    if a > docs or (kind == PIECE and (a == docs or b >= ends[a] - starts[a])):
        raise StateMismatchError(f"an elastic state resumes document {a} (token {b}) of global "
                                 f"row group {g}, which holds {docs}; it is of other data")
    if kind in (DOCS, REST):
        lo = int(starts[a]) + b if a < docs else len(tokens)
        if a < docs and lo >= ends[a] and b:
            raise StateMismatchError(f"an elastic state resumes token {b} of document {a} of "
                                     f"global row group {g}, which is shorter; other data?")
        return Unit(tokens[lo:], np.maximum(starts[a:] - lo, 0))
    doc = tokens[int(starts[a]):ends[a]]
    piece = np.concatenate([doc[:1], doc[b:]]) if b else doc
    return Unit(piece, np.zeros(1, dtype=np.int64))


def _compose(outer: Item, kind: int, a: int, b: int) -> Item:
    """The item left when an old rank read `outer` (one of its units, itself an item) up
    to (kind, a, b), counted within the unit as the old rank saw it."""
    okind, g, oa, ob = outer
    if okind == WHOLE:
        return (kind, g, a, b)
    if okind == TOKENS and kind == TOKENS:
        return (TOKENS, g, oa + a, 0)
    if okind == DOCS and kind in (DOCS, PIECE, REST):
        return (kind, g, oa + a, b)
    if okind == REST and kind in (DOCS, PIECE, REST):
        return (kind, g, oa + a, b + ob if a == 0 else b)  # its first document lacks ob
    if okind == PIECE and a == 0 and kind == PIECE:  # within the piece's one document
        if b == 0:
            return outer
        return (PIECE, g, oa, ob + b - 1 if ob else b)  # a tail's token 0 is the BOS
    raise StateMismatchError(f"an elastic state's position ({kind}, {a}, {b}) does not fit "
                             f"its item {outer}; pass the feed states unchanged")


def remaining(cursor: Position, layout: Layout, g_end: int) -> list[Item]:
    """One old rank's work left before global position `g_end`, in its stream order."""
    packed = cursor.packed
    unit = packed.unit
    out: list[Item] = []
    if isinstance(packed, BestFitPosition):
        for piece in packed.pieces:
            out.append(_compose(layout.item(piece.unit), PIECE, piece.doc, piece.start))
        if packed.doc:
            outer = layout.item(unit)
            if outer[0] != PIECE:
                out.append(_compose(outer, DOCS, packed.doc, 0))
            unit += 1
    elif packed.offset:
        out.append(_compose(layout.item(unit), TOKENS, packed.offset, 0))
        unit += 1
    return _and_units(out, layout, unit, g_end)


def _and_units(out: list[Item], layout: Layout, unit: int, g_end: int) -> list[Item]:
    """`out`, then the layout's units from `unit` on: its items, and its stride up to g_end."""
    while True:
        item = layout.item(unit)
        if unit >= layout.items and item[1] >= g_end:
            return out
        out.append(item)
        unit += 1


def source_remaining(exact: tuple[int, int, int], pieces: list[tuple[int, int, int]],
                     packing: str, layout: Layout, g_end: int) -> list[Item]:
    """One source's work left in one old rank's mixture: its buffered pieces (best fit),
    the rest of the unit `exact` = (unit, doc, token) points into, its later units."""
    out = [_compose(layout.item(u), PIECE, d, s) for u, d, s in pieces]
    unit, doc, tok = exact
    if doc or tok:
        outer = layout.item(unit)
        if outer[0] != PIECE:
            out.append(_compose(outer, DOCS if packing == "bestfit" else REST, doc, tok))
        unit += 1
    return _and_units(out, layout, unit, g_end)


def _weight(item: Item, ref_of: Callable[[int], RowGroupRef]) -> int:
    kind, g, a, _ = item
    ref = ref_of(g)
    rows = max(ref.num_rows, 1)
    if kind == WHOLE:
        return ref.text_bytes
    if kind == TOKENS:
        return max(ref.text_bytes - 4 * a, 1)
    if kind in (DOCS, REST):
        return ref.text_bytes * max(rows - a, 0) // rows
    return max(ref.text_bytes // rows, 1)


def own_layout(work: list[Item], g_end: int, rank: int, world_size: int) -> Layout:
    """All of `work` for `rank` of `world_size` (its own work left, at the same world
    size: a mixture resumed without one of its sources, changes.py), then its stride."""
    work = sorted(work, key=lambda it: (it[1], it[2], it[3], it[0]))
    return Layout(rank, world_size, _runs(work), max(0, -(-(g_end - rank) // world_size)))


def _divide(work: list[Item], ref_of: Callable[[int], RowGroupRef], g_end: int,
            new_rank: int, new_world_size: int) -> Layout:
    """New rank `new_rank`'s consecutive share of `work`, by weight, then its stride."""
    work = sorted(work, key=lambda it: (it[1], it[2], it[3], it[0]))
    weights = [_weight(it, ref_of) for it in work]
    total = sum(weights) or 1
    mine: list[Item] = []
    before = 0
    for item, w in zip(work, weights, strict=True):
        if (2 * before + w) * new_world_size // (2 * total) == new_rank:
            mine.append(item)
        before += w
    stride_from = max(0, -(-(g_end - new_rank) // new_world_size))
    return Layout(new_rank, new_world_size, _runs(mine), stride_from)


def _runs(mine: list[Item]) -> tuple[Run, ...]:
    """Items as layout runs: consecutive WHOLE items at a constant step become one run."""
    runs: list[list[int]] = []
    for kind, g, a, b in mine:
        last = runs[-1] if runs else None
        if (kind == WHOLE and last is not None and last[0] == WHOLE
                and (last[4] == 1 or g - (last[1] + (last[4] - 1) * last[5]) == last[5])
                and g > last[1] + (last[4] - 1) * last[5]):
            if last[4] == 1:
                last[5] = g - last[1]
            last[4] += 1
        else:
            runs.append([kind, g, a, b, 1, 1])
    return tuple((r[0], r[1], r[2], r[3], r[4], r[5]) for r in runs)


def plan_mixture(cursors: list[Position], packing: str,
                 sources: dict[str, tuple[int, Callable[[int], RowGroupRef]]], new_rank: int,
                 new_world_size: int) -> MixState:
    """New rank `new_rank`'s mixture state, from every old rank's mixture cursor: each
    source divided on its own (`sources`: name -> (row groups an epoch, ref_of))."""
    old_world = len(cursors)
    states = [c.mix for c in cursors]
    first = states[0]
    if first is None or any(m is None or m.names != first.names or m.exact is None
                            for m in states):
        raise StateMismatchError("the old ranks' mixture states name different sources, or "
                                 "lack the exact positions elastic resume needs; pass every "
                                 "rank's state unchanged")
    recipe = first.curve is not None or bool(first.limits)
    if recipe and any(m is None or m.given is None for m in states):
        raise StateMismatchError(
            "the saved job follows a [schedule] or source limits, and its mixture states "
            "lack 'given' (the counts an elastic resume carries on: states saved before this "
            "release); resume it at the world size it was saved at")
    limits = first.limits or {}
    layouts = {}
    for s, name in enumerate(first.names):
        n, ref_of = sources[name]
        olds, work = [], []
        for r, m in enumerate(states):
            assert m is not None and m.exact is not None  # checked above
            olds.append((m.layouts or {}).get(name) or Layout.stride(r, old_world))
        heads = [olds[r].item(m.exact[name][0])[1] // n
                 for r, m in enumerate(states)]
        g_end = (max(heads) + 1) * n
        repeat = limits[name].repeat if name in limits else None
        if repeat is not None:  # a rank done with its passes is in epoch `repeat`: no further
            g_end = min(g_end, repeat * n)
        for r, m in enumerate(states):
            assert m is not None and m.exact is not None
            pieces = [(u, d, start) for src, u, d, start in m.pieces or () if src == s]
            work += source_remaining(m.exact[name], pieces, packing, olds[r], g_end)
        layouts[name] = _divide(work, ref_of, g_end, new_rank, new_world_size)
    if not recipe:
        return MixState(0, {n: SourceCursor(0, 0, 0, 0) for n in first.names},
                        ((0, first.weights),), 0, layouts)
    # Every new rank goes on from the old ranks' mean: tokens mixed per source (the
    # schedule's x, while the schedule still decides) and tokens and documents given
    # (budgets), each at the old ranks' exact positions (docs/data-recipes.md).
    curve = first.curve if len(first.schedule) == 1 else None  # None: set live since
    new_cursors: dict[str, SourceCursor] = {}
    for name in first.names:
        tokens = sum(m.given[name][0] for m in states if m is not None and m.given) // old_world
        docs = sum(m.given[name][1] for m in states if m is not None and m.given) // old_world
        new_cursors[name] = SourceCursor(0, 0, tokens if curve is not None else 0, tokens, docs)
    return MixState(0, new_cursors, ((0, first.weights),), 0, layouts, curve=curve,
                    limits=first.limits)


def plan(cursors: list[Position], n: int, ref_of: Callable[[int], RowGroupRef],
         new_rank: int, new_world_size: int) -> Layout:
    """New rank `new_rank`'s layout, from every old rank's cursor (rank order); `n` row
    groups make an epoch, `ref_of(g)` is global position g's row group."""
    old_world = len(cursors)
    layouts = [layout_of(c, r, old_world) for r, c in enumerate(cursors)]
    epoch = max(layouts[r].item(c.packed.unit)[1] // n for r, c in enumerate(cursors))
    g_end = (epoch + 1) * n
    work = [item for r, c in enumerate(cursors) for item in remaining(c, layouts[r], g_end)]
    return _divide(work, ref_of, g_end, new_rank, new_world_size)
