"""Packers turn a rank's ordered row-group token arrays into fixed windows.

Two modes (`StreamSpec.packing`): `concat`, here, and `bestfit` (B rows of T+1
tokens, each starting at a BOS), in `bestfit.py`.

`ConcatPacker` (the default) concatenates every document of the rank's stream and
cuts consecutive, non-overlapping windows of `B*T+1` tokens: batch k is
`stream[k*L:(k+1)*L]`. A position in the stream is `(unit, offset)` (position/'s
ConcatPosition): the next token is at `offset` of the rank's `unit`-th row group.
A position derives only from the last token written (never from how many units
happen to be buffered),
so the same window always carries the same cursor, however workers were
scheduled, and resuming at `(unit, offset)` re-reads that unit and drops
`offset` tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tokenfeed.common.config import StreamSpec
from tokenfeed.producer.bestfit import BestFitPacker
from tokenfeed.producer.cache import FileTokens
from tokenfeed.producer.position import BestFitPosition, ConcatPosition, Packed


class Packer(Protocol):
    """What a stream needs from a packing mode.

    `position` is the state right after the last window filled (the resume point);
    a packer built with `start=position` produces the same windows that followed it.
    `next_unit` is the next unit `push` expects: after a resume, the earliest unit the
    state still needs. `buffered_tokens` counts tokens
    pushed and not yet packed, `lacking_tokens` an estimate of the tokens packing still
    needs before its next window while it lacks documents (bestfit: pushed tokens do
    not measure readiness; concat: always 0). A stream sizes its read-ahead on both.
    """

    next_unit: int
    buffered_tokens: int
    lacking_tokens: int

    @property
    def position(self) -> Packed: ...
    def push(self, unit: int, tokens: np.ndarray, doc_starts: np.ndarray) -> None: ...
    def ready(self) -> bool: ...
    def fill(self, out: np.ndarray) -> Packed: ...
    def stats(self) -> dict[str, Any]: ...


def make_packer(spec: StreamSpec, start: Packed) -> Packer:
    """The packer of `spec.packing`, at `start` (position/ checked it against spec)."""
    if isinstance(start, BestFitPosition):
        return BestFitPacker(spec.batch_size, spec.seq_len, start,
                             buffer_docs=spec.buffer_docs, min_tail=spec.min_tail)
    return ConcatPacker(spec.window_tokens, start)


@dataclass
class _Chunk:
    unit: int
    tokens: np.ndarray | FileTokens  # FileTokens: a cache entry's, read straight into `out`
    doc_starts: np.ndarray
    pos: int


_START = ConcatPosition(0)


class ConcatPacker:
    lacking_tokens = 0  # ready as soon as a window's tokens are pushed
    def __init__(self, window_tokens: int, start: ConcatPosition = _START) -> None:
        self.window_tokens = window_tokens
        self.tokens_packed = 0
        self.next_unit = start.unit  # next unit to accept from the reorder buffer
        self._skip = start.offset
        self._chunks: deque[_Chunk] = deque()
        self.buffered_tokens = 0
        self.position = ConcatPosition(start.unit, start.offset)

    def push(self, unit: int, tokens: np.ndarray | FileTokens, doc_starts: np.ndarray) -> None:
        assert unit == self.next_unit, (unit, self.next_unit)
        self.next_unit += 1
        pos, self._skip = min(self._skip, len(tokens)), 0
        self._chunks.append(_Chunk(unit, tokens, doc_starts, pos))
        self.buffered_tokens += len(tokens) - pos

    def ready(self) -> bool:
        return self.buffered_tokens >= self.window_tokens

    def fill(self, out: np.ndarray) -> ConcatPosition:
        """Write the next window into `out`; return the position right after it."""
        need, written = self.window_tokens, 0
        last: _Chunk | None = None
        while need:
            chunk = self._chunks[0]
            take = min(need, len(chunk.tokens) - chunk.pos)
            if take:
                if isinstance(chunk.tokens, FileTokens):
                    chunk.tokens.read_into(out[written : written + take], chunk.pos)
                else:
                    out[written : written + take] = chunk.tokens[chunk.pos : chunk.pos + take]
                chunk.pos += take
                written += take
                need -= take
                last = chunk
            if chunk.pos == len(chunk.tokens):
                self._chunks.popleft()
                if isinstance(chunk.tokens, FileTokens):
                    chunk.tokens.close()  # read to the end: its descriptor goes now
        self.buffered_tokens -= self.window_tokens
        self.tokens_packed += self.window_tokens
        assert last is not None
        if last.pos < len(last.tokens):
            doc = int(np.searchsorted(last.doc_starts, last.pos, side="right")) - 1
            self.position = ConcatPosition(last.unit, last.pos, doc)
        else:
            self.position = ConcatPosition(last.unit + 1)
        return self.position

    def stats(self) -> dict[str, Any]:
        return {"tokens_packed": self.tokens_packed, "tokens_cropped": 0}
