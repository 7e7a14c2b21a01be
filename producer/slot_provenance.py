"""Live provenance: the documents each ring slot's batch is made of, recorded while packing.

A stream attached with `provenance` (TokenFeed(provenance=True)) gets a `SlotProvenance`
before its first unit is read; other streams get none and pay nothing. It learns from
what the stream already does, through two hooks:

    SourceReader.recorder(reader, unit, row_tokens)   a source unit's documents: the
        rows of its row group in read order with their token counts (0: null, filtered
        or excluded), so document i is the i-th row of non-zero count, named by its row
        in the file (a shuffled unit's order is the reader's own `_row_order`)
    Stream.pack -> pushed(unit, Unit) / filled(slot, packed before)   what the packer
        takes and each window it fills (a mixture's virtual unit: the mixer's
        `compositions`, each entry a source unit's document)

Best fit's placements are not recorded while packing: they depend only on the position
before the window and the documents' lengths, so a record is cut by packing that one
window again, from that position, over units of the kept lengths (`_replay`), and the
packer (`_Replayer`) names each piece it placed.

A unit is kept as RUNS of documents (producer/doc_runs.py). A window is then runs sliced by
token range (concat: from the packer position before it, over the units it spans; best
fit: the placements, packed again from the position before it); cut into rows by the
consumer, they are the segments `tokenfeed explain` prints (producer/provenance.py),
compared in the tests.

Recording is what every batch pays, so it keeps only what the batch's record needs and
cuts nothing: per published batch `seq`, the packer position before it and the kept
units (one shared snapshot until units come or go), whose runs are made only when a
record of them is first cut (`LazyRuns`). Measured on B=32 T=2048
FineWeb-shaped windows, cutting spans at fill time cost 42 us a concat window (a 36 us
fill) and 110 us a best-fit one (a ~1 ms fill), and checking the record on arrival a
share of the consumer's link thread; keeping the makings costs ~1% of a warm concat
daemon's loop (py-spy; making each unit's runs as it was read cost 3.5%, and recording
best fit's placements as it packed, a tuple each, +3-6% of its packing). The record
is cut only when a consumer asks for it (`provenance {stream, seq, ring}`,
producer/ops.py, answered by `record`), so `ready` carries nothing extra. The record:

    files  [[source, file name], ...]
    spans  int64 LE (k, 5): index into files, row group, row, start, end

2.5-5.1 KB for B=32 T=2048 on FineWeb-shaped documents (62-128 spans). A record
over MAX_RECORD_BYTES (windows of thousands of tiny documents) is not sent:
`{"unavailable": why}` instead, and the consumer's last_provenance() names
`tokenfeed explain` for that batch. The last `2 * slots + 2` published batches are
kept: a consumer holds at most `slots` batches after the one it returned last (the
ring is full), so that batch's record is always there when it asks.

Failure behaviour: provenance never fails the stream. A unit whose runs, when made,
disagree with the tokens the packer got of it (a bug) logs an error once; that record
and every later one are `unavailable`.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenfeed.producer.bestfit import BestFitPacker
from tokenfeed.producer.doc_runs import (
    EMPTY_RUNS,
    NO_INT,
    NO_RUNS,
    LazyRuns,
    Runs,
    no_runs,
    virtual_runs,
)
from tokenfeed.producer.position import WHOLE, BestFitPosition, ConcatPosition, Packed
from tokenfeed.producer.units import Unit

if TYPE_CHECKING:
    from tokenfeed.common.config import StreamSpec
    from tokenfeed.producer.reader import SourceReader
    from tokenfeed.producer.stream import Stream

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 512 << 10  # half a control frame (protocol.MAX_FRAME_BYTES = 1 MiB)
@dataclass(slots=True)
class _Kept:
    """The kept units' runs at some fill, shared by the records of every batch filled
    until units come or go (a unit's runs never change); and their best-fit document
    table, built the first time a record of them is cut."""

    units: dict[int, LazyRuns]
    table: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def runs(self, unit: int) -> Runs | None:
        """The unit's runs (None: not kept); `_Disagree` when they disagree with the
        tokens the packer got of the unit (a bug: the batch's record is unavailable)."""
        later = self.units.get(unit)
        if later is None:
            return None
        runs = later.runs()
        if runs.n != later.tokens:
            raise _Disagree(f"unit {unit}: recorded {runs.n} tokens, the packer got "
                            f"{later.tokens}")
        return runs


class _Disagree(Exception):
    """A unit's runs disagree with what the packer got (`_Kept.runs`)."""


class SlotProvenance:
    """One stream's recorder: units' runs, the window being packed, and per published
    batch what its record is cut from (module docstring)."""

    def __init__(self, stream: Stream, names: list[str]) -> None:
        self.spec = stream.spec
        self.packer = stream.packer
        self.supply = stream.supply
        self.stream = stream  # its slot table numbers the batches (`next_seq`)
        self.names = names  # source names, in the readers' order
        self.files: list[list[str]] = []  # file key -> [source, file name]
        self._file_keys: dict[tuple[int, str], int] = {}
        self.source_units: dict[tuple[int, int], LazyRuns] = {}  # (reader, unit) -> as read
        self.units: dict[int, LazyRuns] = {}  # packer unit -> its runs, in unit order
        table = getattr(stream, "table", None)  # (absent in unit tests that never fill)
        self.keep_batches = 2 * len(table.slots) + 2 if table is not None else 1
        # What the last keep_batches published batches' records are cut from, at seq %
        # keep_batches: its seq, the units it names (or why it has no record) and where
        # its window starts. Rings of lists: a batch stores three references, no object.
        self._seqs: list[int] = [-1] * self.keep_batches
        self._kept_for: list[_Kept | str | None] = [None] * self.keep_batches
        self._before: list[Packed | None] = [None] * self.keep_batches
        self.broken: str | None = None
        self._kept: _Kept | None = None  # the snapshot of `units` batches share
        self._zeros = NO_INT.astype(np.uint16)  # a replayed unit's tokens (_replay)
        # the packer that replayed the last record cut: (its seq, it, the next unit it takes)
        self._replayer: tuple[int, _Replayer, int] | None = None

    # -- hooks --------------------------------------------------------------

    def read(self, reader: SourceReader, unit: int, row_tokens: np.ndarray) -> None:
        """A source unit's rows (read order, after exclusion): its documents, as runs
        when a record needs them (the reader's unit, order and layout never change)."""
        self.source_units[(reader.source, unit)] = LazyRuns(
            partial(self._source_runs, reader, unit, row_tokens))

    def _source_runs(self, reader: SourceReader, unit: int, row_tokens: np.ndarray) -> Runs:
        ref = reader._ref(unit)
        kept = np.flatnonzero(row_tokens > 0)
        order = reader._row_order(unit)
        rows = order[kept] if order is not None else kept
        key = self._file_key(reader.source, ref.path.rsplit("/", 1)[-1])
        runs = Runs.of_docs(key, ref.row_group, rows,
                            np.asarray(row_tokens, dtype=np.int64)[kept])
        if reader.layout is not None:
            item = reader.layout.item(unit)
            if item[0] != WHOLE:
                runs = runs.shaped(item)
        return runs

    def pushed(self, unit: int, got: Unit) -> None:
        """The packer's unit `unit` is `got`: keep its runs (made when first needed)."""
        mixer = getattr(self.supply, "mixer", None)
        if mixer is None:
            later = self.source_units.pop((0, unit), None) or LazyRuns(no_runs)
            later.tokens = len(got.tokens)
        else:  # the composition and its source units, as they are now
            composition = mixer.compositions.get(unit, [])
            sources = {(s, u): self.source_units.get((s, u), NO_RUNS)
                       for s, u, _, _ in composition}
            later = LazyRuns(partial(virtual_runs, composition, sources), len(got.tokens))
            for s, cursor in enumerate(mixer.cursors):  # source units fully mixed go
                for key in [k for k in self.source_units if k[0] == s and k[1] < cursor[0]]:
                    del self.source_units[key]
        # no window after the packer's position reads a unit before its first
        first = self.packer.position.first_unit
        for gone in [u for u in self.units if u < first]:
            del self.units[gone]
        self.units[unit] = later
        self._kept = None

    def filled(self, slot: int | None, before: Packed) -> None:
        """The packer filled the window after `before` into `slot` (None: a skipped
        batch), to be published as the table's next seq: keep what its record is cut
        from. A few reference stores: this runs for every batch (module docstring)."""
        if slot is not None:
            seq = self.stream.table.next_seq
            kept = self.broken if self.broken is not None else self._kept
            if kept is None:
                kept = self._kept = _Kept(dict(self.units))
            i = seq % self.keep_batches
            self._seqs[i], self._kept_for[i], self._before[i] = seq, kept, before

    def record(self, seq: int) -> dict[str, Any]:
        """The wire record of published batch `seq` (module docstring), cut now."""
        i = seq % self.keep_batches
        kept, before = self._kept_for[i], self._before[i]
        if self._seqs[i] != seq or kept is None:
            return {"unavailable": f"batch {seq} of this stream is not kept (the daemon keeps "
                    f"the last {self.keep_batches} published)"}
        if isinstance(kept, str):
            return {"unavailable": kept}
        try:
            if isinstance(before, BestFitPosition):
                return self._encode(*self._placed(self._replay(seq, before, kept), kept))
            assert isinstance(before, ConcatPosition)
            return self._encode(*self._concat(before, kept))
        except _Disagree as e:
            if self.broken is None:  # logged once; every later batch is unavailable
                self.broken = str(e)
                log.error("provenance of stream %s is off from here on: %s", self.spec, e)
            return {"unavailable": str(e)}

    # -- windows ------------------------------------------------------------

    def _file_key(self, source: int, file: str) -> int:
        key = self._file_keys.get((source, file))
        if key is None:
            key = self._file_keys[(source, file)] = len(self.files)
            self.files.append([self.names[source], file])
        return key

    def _concat(self, before: ConcatPosition, kept: _Kept
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window after concat position `before`: window_tokens from its unit and
        offset on, over the units that follow."""
        unit, pos, need = before.unit, before.offset, self.spec.window_tokens
        parts = []
        while need > 0:
            runs = kept.runs(unit) or EMPTY_RUNS
            take = min(runs.n - pos, need)
            if take > 0:
                parts.append(runs.slice(pos, pos + take))
                need -= take
            unit, pos = unit + 1, 0
            if unit > max(kept.units, default=-1) + 1:
                raise RuntimeError("provenance: the window runs past the units pushed")
        if len(parts) == 1:  # most windows: 65K tokens of a ~1M-token unit
            return parts[0]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def _replay(self, seq: int, before: BestFitPosition, kept: _Kept
                ) -> tuple[np.ndarray, array[int]]:
        """Best fit's placements in batch `seq`, the window after `before`: the same packer
        packs it again over units of the kept documents' lengths (their tokens do not
        matter). Built from `before`, that is ~1,000 buffered pieces to decode and copy
        (~6-10 ms, B=32 T=2048 nanochat); the packer is kept, so asking about every
        batch in turn costs one window's packing each."""
        last = self._replayer
        if last is not None and last[0] == seq - 1 and last[1].position == before:
            _, packer, unit = last
        else:
            packer = _Replayer(self.spec, before)
            unit = packer.next_unit
        self._replayer = None  # until this window is packed whole
        while not packer.ready():
            runs = kept.runs(unit)
            if runs is None:
                raise RuntimeError("provenance: the window runs past the units pushed")
            if len(self._zeros) < runs.n:
                self._zeros = np.zeros(runs.n, dtype=np.uint16)
            packer.push(unit, self._zeros[:runs.n], runs.doc_starts)
            unit += 1
        packer.fill(np.empty(self.spec.window_tokens, dtype=np.uint16))
        self._replayer = (seq, packer, unit)
        return packer.placed()

    def _placed(self, placed: tuple[np.ndarray, array[int]], kept: _Kept
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A best-fit window from its placements, in order: each (unit, doc, start) with
        its length `take` is tokens start..start+take of the unit's document, a tail's
        (start > 0) BOS first."""
        (unit, doc, first), take = placed[0], np.frombuffer(placed[1], dtype=np.int64)
        tail = (first > 0).astype(np.int64)
        first_unit, offsets, simple, table_ident, table_off = _doc_table(kept)
        rel = unit - first_unit
        plain = simple[rel]
        row = np.where(plain, offsets[rel] + doc, 0)
        ident = table_ident[row]
        base = table_off[row]  # the document token of the unit document's first token
        general = np.flatnonzero(~plain).tolist()
        # a tail is two spans: its BOS (token 0 of the unit's document), then the rest
        n = 1 + tail
        which = np.repeat(np.arange(len(unit)), n)
        second = np.zeros(len(which), dtype=bool)
        second[np.cumsum(n) - 1] = tail.astype(bool)
        lo = np.where(second | (tail[which] == 0), first[which], 0)
        hi = np.where(second, first[which] + take[which] - 1,
                      np.where(tail[which] == 1, 1, first[which] + take[which]))
        if not general:
            keep = hi > lo
            return (ident[which][keep], (base[which] + lo)[keep], (base[which] + hi)[keep])
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        special = set(general)
        for i, w in enumerate(which.tolist()):
            if hi[i] <= lo[i]:
                continue
            if w in special:  # a unit of several runs per document: through its runs
                runs = kept.runs(int(unit[w]))
                assert runs is not None  # (its document table row came from it)
                d0 = int(runs.doc_starts[doc[w]])
                parts.append(runs.slice(d0 + int(lo[i]), d0 + int(hi[i])))
            else:
                parts.append((ident[w:w + 1], base[w:w + 1] + lo[i], base[w:w + 1] + hi[i]))
        return (np.concatenate([q[0] for q in parts]), np.concatenate([q[1] for q in parts]),
                np.concatenate([q[2] for q in parts]))

    def _encode(self, ident: np.ndarray, start: np.ndarray, end: np.ndarray
                ) -> dict[str, Any]:
        """A window's spans as the wire record. Cutting them into rows is the consumer's,
        when asked (consumer/provenance.py): the daemon serves every rank of the node."""
        keys = ident[:, 0]
        if (keys == keys[0]).all():  # one file: the usual window
            used, file_index = keys[:1], np.zeros(len(keys), dtype=np.int64)
        else:
            used, file_index = np.unique(keys, return_inverse=True)
        spans = np.empty((len(keys), 5), dtype="<i8")
        spans[:, 0] = file_index.reshape(-1)
        spans[:, 1:3] = ident[:, 1:]
        spans[:, 3] = start
        spans[:, 4] = end
        files = [self.files[k] for k in used.tolist()]
        size = spans.nbytes + sum(len(f[0]) + len(f[1]) + 8 for f in files)
        if size > MAX_RECORD_BYTES:
            return {"unavailable": f"the batch's record of {len(spans)} spans takes {size} "
                    f"bytes, over {MAX_RECORD_BYTES}"}
        return {"files": files, "spans": spans.tobytes()}


def _doc_table(kept: _Kept) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kept units' documents in one table (built once per snapshot: units come or go
    every ~16 best-fit windows on FineWeb-shaped units): first unit, each unit's first
    row, whether it is simple, and every simple unit's documents' ident and offset."""
    if kept.table is None:
        first = min(kept.units)
        runs = [kept.runs(u) or EMPTY_RUNS for u in range(first, max(kept.units) + 1)]
        counts = np.array([len(r.ident) for r in runs], dtype=np.int64)
        kept.table = (first, np.cumsum(counts) - counts,
                      np.array([r.simple for r in runs], dtype=bool),
                      np.concatenate([r.ident for r in runs]),
                      np.concatenate([r.off for r in runs]))
    return kept.table


class _Replayer(BestFitPacker):
    """Best fit packing a window again for its record (`_replay`): the same packer, told
    each placement's length, its pieces read off the position's table."""

    def __init__(self, spec: StreamSpec, before: BestFitPosition) -> None:
        super().__init__(spec.batch_size, spec.seq_len, before, buffer_docs=spec.buffer_docs,
                         min_tail=spec.min_tail)  # as packer.make_packer builds the stream's
        self.takes = array("q")
        self._refs.keep_placed = True

    def placed(self) -> tuple[np.ndarray, array[int]]:
        """The window just filled: its pieces (rows unit, doc, start) and each one's length,
        in placement order."""
        assert self.takes is not None
        takes = self.takes[:]
        del self.takes[:]  # in place: the packing loop holds its bound append
        return self._refs.placed, takes


def enable(stream: Stream, names: list[str]) -> SlotProvenance:
    """Record `stream`'s provenance from now on: call before its first unit is read."""
    if stream.provenance is None:
        recorder = SlotProvenance(stream, names)
        for reader in stream.readers:
            reader.recorder = recorder.read
        stream.provenance = recorder
    return stream.provenance
