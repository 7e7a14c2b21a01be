"""Replay: a stream's supply and packer, run in this process over units of token addresses.

`explain` (provenance.py) builds a stream's start as an attach does; this runs it. The
supply (supply.py: the SourceReader's epoch and row orders, the Mixer) and the packer
(packer.py, bestfit.py) run here over the units they ask for, tokenized here with the
workers' own code (worker.py). No packing rule is written twice: before a unit reaches
the supply, each of its tokens is replaced by its ADDRESS,

    address = document id << 32 | index of the token in the document's [BOS] + tokens

and readers, elastic layouts, the mixer and both packers move tokens without reading
them, so the windows they cut are windows of addresses. A row's addresses fall into
runs of consecutive tokens of one document: its segments, each naming the document's
(source, file, row group, row of the Parquet row group) and a token range of it. A
best-fit tail is two segments: its BOS (0:1), then the rest of the document. Rows of
null text, which the workers skip, are never documents; a shuffled row group's rows
are named by their row in the file (the worker's `doc_seed` permutation, read back).

Only the row groups the packer asks for are read: from the position's first needed
unit on (best fit: the units holding its buffered pieces, and the read position's;
units in between are read past untokenized, as by the daemon). Of a best-fit resume's
units before its read position, only the documents of buffered pieces can ever be
packed (bestfit.py, Resume): the others are tokenized as empty documents (a BOS alone,
an address no window may hold), so a state whose buffer spans 8 row groups tokenizes
about one buffer of documents, not 8 row groups (one source, no elastic layout; else
every document). Documents are tokenized on every core (tiktoken releases the GIL).

Rows are read as the readers read them: the exclusion list's rows dropped by the
readers' rule (keep_rule, exclude_unit), the filters by worker.read_filtered; a row
group that fails to read fails the reader or, with `on_error="skip"`, delivers nothing
(reader.py's rule, after the same MAX_ATTEMPTS reads).

Failure behaviour: a row group that cannot be read under `on_error="fail"`: DataError
naming the file, the row group and the fix; a position the data cannot hold raises the
packer's StateMismatchError.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import DataError, TokenizerError
from tokenfeed.producer import exclude
from tokenfeed.producer.admission import Admission
from tokenfeed.producer.backends import check_parity, make_encoder
from tokenfeed.producer.config import PARITY_SAMPLE_BYTES
from tokenfeed.producer.exclude import Exclusion
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.position import BestFitPosition, Position, cursor_json
from tokenfeed.producer.reader import MAX_ATTEMPTS
from tokenfeed.producer.supply import make_supply
from tokenfeed.producer.tokenizer import Tokenizer
from tokenfeed.producer.worker import RowGroupReader, tokenize_documents

log = logging.getLogger(__name__)

OFFSET_BITS = 32  # a document's token index in an address; its id above
OFFSET_MASK = (1 << OFFSET_BITS) - 1
UNREAD = (1 << 31) - 1  # the document id of a document tokenized empty: never packed
MIN_DOCS_PER_THREAD = 16
WHOLE_UNIT = sys.maxsize  # task_bytes: one task a unit


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens `start:end` of a document's [BOS] + encode_ordinary(text)."""

    source: str
    file: str  # the shard's file name in its source's folder
    row_group: int
    row: int  # in the row group, as the file stores it (nulls counted)
    start: int
    end: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def document(self) -> tuple[str, str, int, int]:
        return (self.source, self.file, self.row_group, self.row)


Row = list[Segment]  # the T+1 tokens inputs[r] + targets[r][-1]


class _TaskFailed(Exception):
    """Reading or tokenizing a task failed, as a worker would report it."""

    @classmethod
    def of(cls, e: Exception) -> _TaskFailed:  # one line: Arrow's messages span several
        return cls(f"{type(e).__name__}: {' '.join(str(e).split())}")


class Replay:
    """A stream's supply and packer, run in this process over units of token addresses."""

    def __init__(self, spec: StreamSpec, admission: Admission, start: Position,
                 tokenizer: Tokenizer, backend: str = "tiktoken", *,
                 exclusion: Exclusion = exclude.NONE, on_error: str = "fail") -> None:
        self.spec = spec
        sources = [dataclasses.replace(s, exclude=exclusion.rows(s.name))
                   for s in admission.sources(start, spec.split)]  # as ops.py's attach
        self.names = [s.name for s in sources]
        # a unit is one task here (its rows are tokenized on every core by _encode), so
        # the rules of whole units apply to what a task reads: _unread, exclude_unit
        self.supply = make_supply(0, spec, sources, start, {
            "itemsize": 8, "on_error": on_error, "task_bytes": WHOLE_UNIT})
        self.mark = start.exclude  # the exclusion list in force, where it began
        self.packer = make_packer(spec, start.packed)
        self.tokenizer = tokenizer
        self.encoder = make_encoder(tokenizer, backend)
        self.checked = self.encoder.backend == "tiktoken"  # tiktoken defines the ids
        self.bos_id = tokenizer.bos_id
        self.reader = RowGroupReader()
        self.docs: list[tuple[str, str, int, int]] = []  # document id -> (source, file, rg, row)
        self.documents: dict[tuple[str, str, int, int], np.ndarray] = {}
        self.keep = False  # keep documents' tokens (skipping: only their addresses)
        self.paths: dict[tuple[str, str], tuple[str, str]] = {}  # (source, file) -> path, column
        self.window = np.empty(spec.window_tokens, dtype=np.int64)
        self.cores = os.cpu_count() or 1
        self.threads = ThreadPoolExecutor(self.cores, "explain")
        # best fit, one source, plain layout: per unit before the read position, the
        # documents its buffered pieces name (the only ones of those units ever packed)
        packed = start.packed
        self.pieces: dict[int, set[int]] | None = None
        if isinstance(packed, BestFitPosition) and start.mix is None and start.elastic is None:
            self.pieces = {}
            for piece in packed.pieces:
                self.pieces.setdefault(piece.unit, set()).add(piece.doc)
        self.read_at = (packed.unit, getattr(packed, "doc", 0))
        self.excluded = sources[0].exclude or {}
        self.exclude_rule = exclude.keep_rule(start.exclude, True)  # best fit: by documents

    def close(self) -> None:
        self.threads.shutdown()

    def next_window(self) -> np.ndarray:
        """The next window, as addresses (stream.py's pack: take, push, fill, forget)."""
        packer, supply = self.packer, self.supply
        while not packer.ready():
            unit = supply.take(packer.next_unit)
            if unit is None:
                self._read(supply.blocked(packer.next_unit, True))
                continue
            packer.push(packer.next_unit, unit.tokens, unit.doc_starts)
        packer.fill(self.window)
        supply.forget_before(packer.position.first_unit)
        return self.window

    def cursor(self) -> dict[str, Any]:
        """The cursor of the next window, as consumers get it (stream.py's position)."""
        position = self.supply.position(self.packer.position)
        if self.mark is not None:
            position = dataclasses.replace(position, exclude=exclude.mark_at(self.mark,
                                                                               position))
        return cursor_json(position, self.supply.plans, self.spec)

    def skipped_row_groups(self) -> tuple[tuple[str, str, int], ...]:
        """(source, file, row_group) of the row groups skipped under on_error="skip"."""
        return tuple((name, ref.rsplit("#", 1)[0].rsplit("/", 1)[-1],
                      int(ref.rsplit("#", 1)[1]))
                     for name, reader in zip(self.names, self.supply.readers, strict=True)
                     for ref in reader.skipped_row_groups)

    def _read(self, index: int | None) -> None:
        """One task of the reader packing waits on, tokenized here; a task that fails is
        the reader's to re-run, skip (on_error="skip") or fail on, as in the daemon."""
        if index is None:  # every task is run at once here: the unit must be in
            raise RuntimeError("the packer waits for a unit no reader schedules")
        reader = self.supply.readers[index]
        task = reader.next_task()
        try:
            result = self._tokenize(self.names[index], task)
        except _TaskFailed as e:
            reader.on_failure(task, str(e))
            if reader.error is not None:
                raise DataError(
                    f"{task.path} row group {task.row_group} cannot be read ({e}; "
                    f"{MAX_ATTEMPTS} attempts); the run's stream failed on it too unless it "
                    "served with --on-error skip: then pass explain --on-error skip (the row "
                    "group delivers nothing, as in the daemon), else fix the file") from None
            return
        reader.on_result(result)

    def _tokenize(self, source: str, task: Task) -> Result:
        try:  # what a worker reports as `failed` (worker.py): reading and tokenizing
            values = self.reader.values(task.path, task.row_group, task.column, task.rows,
                                        task.doc_seed, task.stamp, task.filter)
        except Exception as e:
            raise _TaskFailed.of(e) from None
        lo, hi = task.rows
        order = self.reader.order if task.doc_seed is not None else None
        rows = order[lo:hi] if order is not None else np.arange(lo, hi)
        unread = self._unread(task, values, order)
        if unread is not None:
            values = ["" if skip else v for v, skip in zip(values, unread, strict=True)]
        try:
            tokens, row_tokens = tokenize_documents(values, self._encode, self.bos_id)
        except Exception as e:
            raise _TaskFailed.of(e) from None
        kept = row_tokens > 0
        starts = np.cumsum(row_tokens) - row_tokens
        lengths = row_tokens[kept]
        file = task.path.rsplit("/", 1)[-1]
        self.paths[(source, file)] = (task.path, task.column)
        ids_of = []
        empty = np.zeros(len(values), dtype=bool) if unread is None else np.array(unread)
        for row, s, n, skip in zip(rows[kept].tolist(), starts[kept].tolist(),
                                   lengths.tolist(), empty[kept].tolist(), strict=True):
            if skip:
                ids_of.append(UNREAD)
                continue
            key = (source, file, task.row_group, row)
            ids_of.append(len(self.docs))
            self.docs.append(key)
            if self.keep:
                self.documents[key] = tokens[s:s + n]
        ids = np.repeat(np.array(ids_of, dtype=np.int64), lengths)
        offsets = np.arange(len(tokens), dtype=np.int64) - np.repeat(starts[kept], lengths)
        return Result.of_rows(task, (ids << OFFSET_BITS) | offsets, row_tokens)

    def fetch(self, documents: set[tuple[str, str, int, int]]) -> None:
        """Tokens of `documents` not kept (read while skipping), read and tokenized again."""
        for key in sorted(documents - self.documents.keys()):  # row groups in order: one read
            source, file, row_group, row = key
            path, column = self.paths[(source, file)]
            [text] = self.reader.values(path, row_group, column, (row, row + 1), None)
            self.documents[key] = tokenize_documents([text], self._encode, self.bos_id)[0]

    def _unread(self, task: Task, values: list[Any], order: np.ndarray | None
                ) -> list[bool] | None:
        """Which of a unit's values (read in `order`; None: file order) to tokenize empty:
        documents of a unit before a best-fit read position that no buffered piece names,
        and those the exclusion list drops there (None: tokenize every one). A piece's and
        the read position's document index are of the unit the packer gets: without the
        rows the reader's own rule (exclude.exclude_unit) drops."""
        unit = task.unit
        read_unit, read_doc = self.read_at
        if self.pieces is None or unit > read_unit:
            return None
        named = self.pieces.get(unit, set())
        first = read_doc if unit == read_unit else sys.maxsize  # from there on: all read
        is_doc = np.fromiter((isinstance(v, str) for v in values), dtype=np.int64,
                             count=len(values))  # a document: one token will do here
        listed = self.excluded.get((task.path, task.row_group))
        kept = is_doc if listed is None else exclude.exclude_unit(
            np.zeros(int(is_doc.sum())), is_doc, listed, order, unit, self.exclude_rule)[1]
        index = np.cumsum(kept) - kept  # each kept document's index in the packer's unit
        return [bool(d) and (not k or (i not in named and i < first))  # dropped, or unread
                for d, k, i in zip(is_doc.tolist(), kept.tolist(), index.tolist(),
                                   strict=True)]

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's batch, split over the cores."""
        if not self.checked:  # a faster backend: on these documents it must be tiktoken
            sample, size = [], 0
            for text in texts:
                if size > PARITY_SAMPLE_BYTES:
                    break
                sample.append(text)
                size += len(text)
            try:
                check_parity(self.tokenizer, self.encoder, sample)
            except TokenizerError as e:
                log.warning("explain falls back to tokenizer backend tiktoken: %s", e)
                self.encoder = make_encoder(self.tokenizer, "tiktoken")
            self.checked = True
        encode = self.encoder.encode_batch
        k = min(self.cores, len(texts) // MIN_DOCS_PER_THREAD)
        if k <= 1:
            return encode(texts)
        chunks = [texts[i * len(texts) // k:(i + 1) * len(texts) // k] for i in range(k)]
        parts = list(self.threads.map(encode, chunks))
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def rows(self, window: np.ndarray) -> list[Row]:
        """A window of addresses as its B rows of segments."""
        b, t = self.spec.batch_size, self.spec.seq_len
        if self.spec.packing == "bestfit":  # B rows of T+1
            rows = [window[r * (t + 1):(r + 1) * (t + 1)] for r in range(b)]
        else:  # row r: inputs[r] = w[rT:(r+1)T], and targets[r][-1] = w[(r+1)T]
            rows = [window[r * t:(r + 1) * t + 1] for r in range(b)]
        return [self._segments(row) for row in rows]

    def _segments(self, row: np.ndarray) -> Row:
        doc, offset = row >> OFFSET_BITS, row & OFFSET_MASK
        cuts = np.flatnonzero((doc[1:] != doc[:-1]) | (offset[1:] != offset[:-1] + 1)) + 1
        out = []
        for a, b in pairwise([0, *cuts.tolist(), len(row)]):
            if doc[a] == UNREAD:
                raise RuntimeError("explain packed a document it did not tokenize")
            source, file, row_group, r = self.docs[int(doc[a])]
            out.append(Segment(source, file, row_group, r, int(offset[a]),
                               int(offset[b - 1]) + 1))
        return out
