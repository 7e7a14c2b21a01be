"""The packers' positions and elastic layouts: where a rank's next window starts.

`ConcatPosition` and `BestFitPosition` say where the packer resumes (best fit's buffer
coded by bestfit_codec.py); a `Layout` says which units a rank reads after an elastic
resume (elastic.py). The package's __init__ says how they form a `Position`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from typing import Any

from tokenfeed.common.config import MAX_POSITION
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer import bestfit_codec
from tokenfeed.producer.bestfit_codec import Piece

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
