"""Sources added or removed between a mixture's save and its resume (opt-in).

A mixture state names the sources it reads. A resume on a daemon that serves other
sources is a change, refused unless the consumer opts in (`TokenFeed(...,
allow_source_changes=True)`, the attach's `allow_source_changes`): the state is the
consumer's, so the consent travels with it. What changes, when allowed:

- **Added** (the daemon serves a source the state lacks, and the feed names no `mix`):
  the mixture changes to the daemon's weights at the first virtual unit it has not
  mixed (`MixState.with_weights`, as a live weight change): the new source starts at
  its beginning, the kept ones replay exactly up to there and continue.
- **Removed** (the state names a source the daemon no longer serves): its virtual
  units cannot be mixed again, so the mixture is rebuilt (`rebase`): every kept
  source continues from the exact position the state records (`exact`: its next token
  not delivered; best fit: its next document not read, and its buffered pieces), laid
  out as an elastic resume lays out one rank's own remaining work (elastic.py), with
  the new weights (the feed's `mix`, else the daemon's: the removed source's weight is
  shared among the others); added sources start at their beginning. The removed
  source's cursor (and buffered pieces) are dropped.

In both cases no document of a kept source is delivered twice or skipped.

Failure behaviour: a change without the opt-in is a StateMismatchError naming the
added and removed sources and the fix; a state without exact positions is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenfeed.common.config import StreamSpec, normalize_mix
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer import elastic
from tokenfeed.producer.dataset import RowGroupRef
from tokenfeed.producer.position import Layout, MixState, Position, SourceCursor

log = logging.getLogger(__name__)

Refs = Callable[[str], tuple[int, Callable[[int], RowGroupRef]]]


@dataclass(frozen=True)
class SourceChange:
    """The sources a resumed mixture gains and loses (sorted names)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def describe(self) -> str:
        parts = ([f"added {', '.join(self.added)}"] if self.added else []) + (
            [f"removed {', '.join(self.removed)}"] if self.removed else [])
        return "; ".join(parts)


def source_change(start: Any, spec: StreamSpec, served: tuple[str, ...],
                  allowed: bool) -> SourceChange:
    """The change between a saved cursor's mixture and the sources served now; refused
    (StateMismatchError) unless `allowed`. A cursor without a readable mixture has no
    change here (position/ reports what is malformed)."""
    mix = start.get("mix") if isinstance(start, dict) else None
    sources = mix.get("sources") if isinstance(mix, dict) else None
    if not isinstance(sources, dict) or not sources:
        return SourceChange()
    saved = {n for n in sources if isinstance(n, str)}
    removed = tuple(sorted(saved - set(served)))
    # With `mix`, the feed chose its sources: ones it names that the state lacks are
    # added by the weight change, as before (MixState.with_weights).
    added = tuple(sorted(set(served) - saved)) if spec.mix is None else ()
    change = SourceChange(added, removed)
    if change and not allowed:
        if removed:
            what = (f"the saved mixture reads source {removed[0]!r}, which this daemon does not "
                    f"serve" + (f" (nor {', '.join(removed[1:])})" if removed[1:] else ""))
        else:
            what = "the saved mixture does not read every source this daemon serves"
        fixes = []
        if removed:
            fixes.append(f"serve {', '.join(removed)} again with --source NAME=PATH, under the "
                         "same name")
        if added:
            fixes.append("name the sources to read with mix={...}")
        raise StateMismatchError(
            f"{what} (saved: {', '.join(sorted(saved))}; served: {', '.join(served)}; "
            f"{change.describe()}); {', or '.join(fixes)}, or pass TokenFeed(..., "
            "allow_source_changes=True) to resume with the sources changed (kept sources "
            "continue exactly, added ones start at their beginning)")
    return change


def rebase(position: Position, spec: StreamSpec, weights: Mapping[str, float],
           refs: Refs) -> Position:
    """A fresh mixture of `weights`' sources in which every source of `position`'s
    mixture that is kept continues exactly where the state left it (see above)."""
    mix = position.mix
    if mix is None or mix.exact is None:
        raise StateMismatchError("the saved mixture state lacks 'exact' [unit, doc, token] "
                                 "for every source, which a resume without one of its "
                                 "sources needs; pass the feed state unchanged")
    weights = dict(normalize_mix(dict(weights)))
    names = sorted(weights)
    layouts: dict[str, Layout] = {}
    for s, name in enumerate(mix.names):
        if name not in weights:
            continue
        n, _ = refs(name)
        old = (mix.layouts or {}).get(name) or Layout.stride(spec.rank, spec.world_size)
        unit = mix.exact[name][0]
        g_end = (old.item(unit)[1] // n + 1) * n  # the end of the epoch it is in
        pieces = [(u, d, start) for src, u, d, start in mix.pieces or () if src == s]
        work = elastic.source_remaining(mix.exact[name], pieces, spec.packing, old, g_end)
        layouts[name] = elastic.own_layout(work, g_end, spec.rank, spec.world_size)
    state = MixState(0, {n: SourceCursor(0, 0, 0, 0) for n in names},
                     ((0, {n: float(weights[n]) for n in names}),), 0, layouts)
    return Position(Position.start(spec).packed, mix=state)
