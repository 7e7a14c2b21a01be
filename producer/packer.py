"""Packers turn a rank's ordered row-group token arrays into fixed windows.

Two modes (`StreamSpec.packing`): `concat`, here, and `bestfit` (B rows of T+1
tokens, each starting at a BOS), in `bestfit.py`.

`ConcatPacker` (the default) concatenates every document of the rank's stream and
cuts consecutive, non-overlapping windows of `B*T+1` tokens: batch k is
`stream[k*L:(k+1)*L]`. A position in the stream is `(unit, offset)`: the next
token is at `offset` of the rank's `unit`-th row group. A position derives only
from the last token written (never from how many units happen to be buffered),
so the same window always carries the same cursor, however workers were
scheduled, and resuming at `(unit, offset)` re-reads that unit and drops
`offset` tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tokenfeed.common.config import MAX_POSITION, StreamSpec
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer.bestfit import BestFitPacker


class Packer(Protocol):
    """What a stream needs from a packing mode.

    `position` is the JSON-serialisable state right after the last window filled
    (the resume point); a packer built with `start=position` produces the same
    windows that followed it. `next_unit` is the next unit `push` expects: after a
    resume, the earliest unit the state still needs. `buffered_tokens` is what the
    stream may count as pushed and not yet packed when it sizes its read-ahead
    (bestfit: negative, a shortfall, while it lacks documents). `needs_unit(u)` is
    False for a unit whose content the packer ignores (bestfit, resuming: units
    between the buffer's references), which a stream may push empty instead.
    `first_unit()` is the earliest unit `position` names: where a resume starts reading.
    """

    next_unit: int
    buffered_tokens: int
    position: dict[str, Any]

    def push(self, unit: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None: ...
    def ready(self) -> bool: ...
    def fill(self, out: np.ndarray) -> dict[str, Any]: ...
    def resume_key(self, position: dict[str, Any]) -> tuple[Any, ...]: ...
    def stats(self) -> dict[str, Any]: ...
    def needs_unit(self, unit: int) -> bool: ...
    def first_unit(self) -> int: ...


def make_packer(spec: StreamSpec, start: dict[str, Any] | None) -> Packer:
    """The packer of `spec.packing`, at `start` (None: the beginning of the stream)."""
    if spec.packing == "concat":
        return ConcatPacker(spec.window_tokens, start or {"unit": 0, "offset": 0})
    if spec.packing == "bestfit":
        return BestFitPacker(
            spec.batch_size, spec.seq_len, start,
            buffer_docs=spec.buffer_docs,
            min_tail=spec.min_tail,
        )
    raise StateMismatchError(f"packing {spec.packing!r} is not available in this daemon")


@dataclass
class _Chunk:
    unit: int
    tokens: np.ndarray
    doc_starts: np.ndarray
    pos: int


class ConcatPacker:
    def __init__(self, window_tokens: int, start: dict[str, Any]) -> None:
        if not all(
            isinstance(start.get(k), int) and 0 <= start[k] < MAX_POSITION
            for k in ("unit", "offset")
        ):
            raise StateMismatchError(
                f"concat position {start!r} lacks integers 'unit' and 'offset' in "
                f"[0, {MAX_POSITION})"
            )
        self.window_tokens = window_tokens
        self.tokens_packed = 0
        self.next_unit = int(start["unit"])  # next unit to accept from the reorder buffer
        self._skip = int(start["offset"])
        self._chunks: deque[_Chunk] = deque()
        self.buffered_tokens = 0
        self.position: dict[str, Any] = {"unit": self.next_unit, "offset": self._skip, "doc": 0}

    def push(self, unit: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        assert unit == self.next_unit, (unit, self.next_unit)
        self.next_unit += 1
        pos, self._skip = min(self._skip, len(tokens)), 0
        self._chunks.append(_Chunk(unit, tokens, doc_starts, pos))
        self.buffered_tokens += len(tokens) - pos

    def ready(self) -> bool:
        return self.buffered_tokens >= self.window_tokens

    def fill(self, out: np.ndarray) -> dict[str, Any]:
        """Write the next window into `out`; return the position right after it."""
        need, written = self.window_tokens, 0
        last: _Chunk | None = None
        while need:
            chunk = self._chunks[0]
            take = min(need, len(chunk.tokens) - chunk.pos)
            if take:
                out[written : written + take] = chunk.tokens[chunk.pos : chunk.pos + take]
                chunk.pos += take
                written += take
                need -= take
                last = chunk
            if chunk.pos == len(chunk.tokens):
                self._chunks.popleft()
        self.buffered_tokens -= self.window_tokens
        self.tokens_packed += self.window_tokens
        assert last is not None
        if last.pos < len(last.tokens):
            doc = int(np.searchsorted(last.doc_starts, last.pos, side="right")) - 1
            self.position = {"unit": last.unit, "offset": last.pos, "doc": doc}
        else:
            self.position = {"unit": last.unit + 1, "offset": 0, "doc": 0}
        return self.position

    def resume_key(self, position: dict[str, Any]) -> tuple[Any, ...]:
        """The part of a cursor that defines where the stream continues."""
        return (position.get("unit"), position.get("offset"))

    def stats(self) -> dict[str, Any]:
        return {"tokens_packed": self.tokens_packed, "tokens_cropped": 0}

    def needs_unit(self, unit: int) -> bool:
        return True

    def first_unit(self) -> int:
        return int(self.position["unit"])
