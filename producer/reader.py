"""One source's reading for one stream: its rank's row groups -> tokenized units, in order.

A reader schedules its row groups as units (each split into tasks of about
`task_bytes` of text; of a filtered source, about `task_bytes` of the text its filter has
kept so far, so a row group is read by fewer workers: each decodes all of its text, kept
or not, `benchmarks/filter.py`), re-runs lost tasks, serves units the token cache holds, and
hands finished units out whole and in order (`take`). The stream above it decides
how far to read ahead, and packs (one source) or mixes (a mixture) them: supply.py.
Its tasks name their stream and source (the reader's index in the stream), so a
result finds its way back without any arithmetic.

Failure behaviour: a task whose worker died is re-run (same input, same output);
a task that fails MAX_ATTEMPTS times fails the reader (`on_error="fail"`: `error`
names the file and row group); with `on_error="skip"` its whole row group delivers
nothing instead, logged and listed in `skipped_row_groups`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenfeed.producer import elastic
from tokenfeed.producer.cache import FileTokens, TokenCache, file_order
from tokenfeed.producer.config import DEFAULT_TASK_BYTES
from tokenfeed.producer.dataset import RowGroupRef, SplitPlan
from tokenfeed.producer.exclude import SourceRows, exclude_unit
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.position import Layout, unit_position
from tokenfeed.producer.units import EMPTY, Unit
from tokenfeed.producer.valstore import ValStore

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
MIN_KEPT_SHARE = 1 / 64  # a filter keeping less still splits a ~64-task row group in parts
INITIAL_TOKENS_PER_TEXT_BYTE = 0.25  # English under cl100k; learnt from results as they come


def epoch_order(n: int, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """The order an epoch reads a split's `n` row groups in (shuffled: per seed, epoch)."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Source:
    """A named source as a stream reads it: one split's plan, its text column, its cache."""

    name: str
    plan: SplitPlan
    column: str
    cache: TokenCache | ValStore | None = None
    exclude: SourceRows | None = None  # excluded rows by (shard path, row group)
    filter: Filter | None = None  # filters.py: only rows it keeps deliver documents


class SourceReader:
    def __init__(
        self, stream: int, source: int, plan: SplitPlan, column: str, *, rank: int,
        world_size: int, shuffle_seed: int | None, first_unit: int = 0,
        task_bytes: int = DEFAULT_TASK_BYTES, on_error: str = "fail",
        cache: TokenCache | ValStore | None = None, itemsize: int = 4,
        skip: frozenset[int] = frozenset(), layout: Layout | None = None,
        exclude: SourceRows | None = None, exclude_keep: tuple[int, int, bool] = (0, 0, False),
        filter: Filter | None = None, counted: tuple[int, int, int] | None = None,
        in_file: bool = False,
    ) -> None:
        self.stream, self.source = stream, source
        self.layout = layout  # elastic.py: after an elastic resume, the rank's units
        self.itemsize = itemsize
        self.plan = plan
        self.column = column
        self.rank, self.world_size, self.shuffle_seed = rank, world_size, shuffle_seed
        self.task_bytes = task_bytes
        self.on_error = on_error
        self.cache = cache
        # Cached units whose tokens a packer takes as they lie (concat) stay in their file
        # until cut into a slot (cache.py: FileTokens), when nothing reorders or drops rows.
        self.in_file = in_file and shuffle_seed is None and layout is None
        self.skip = skip  # units the packer reads past without their content (supply.py)
        self.exclude = exclude or {}  # rows never delivered (exclude.py)
        self.exclude_keep = exclude_keep  # (unit, tokens or documents) read before the list
        self.excluded = 0  # documents dropped because the list names them
        self.units_cached = 0  # units served from the token cache
        self._cache_missed = -1  # the last unit the cache did not hold
        self.next_unit = first_unit  # next (unit, part) to schedule
        self.next_part = 0
        self.retry: deque[tuple[int, int]] = deque()
        self.attempts: dict[tuple[int, int], int] = {}
        self.inflight: dict[tuple[int, int], int] = {}  # (unit, part) -> estimated bytes
        self.results: dict[int, dict[int, Result]] = {}  # unit -> finished parts
        self.whole: dict[int, Unit | None] = {}  # units from the cache; None: delivers nothing
        self.staged_bytes = 0  # bytes of the finished parts in `results` and units in `whole`
        self.error: str | None = None
        self.tokens_per_text_byte = INITIAL_TOKENS_PER_TEXT_BYTE  # running, sizes estimates
        self.tasks_done = 0
        self.units_done = 0
        self.documents = 0
        self.skipped = 0
        # With a filter, rows that deliver nothing are `dropped` (the filter is false or
        # null, or the text is): a cached unit cannot tell those apart, so counting them
        # together keeps a warm epoch's figures those of a cold one. Kept: `documents`.
        self.filter = filter
        self.dropped = 0
        # Exact counts for positions: unit -> (kept, dropped) in the rank's units before
        # it, from `counted` = (unit, kept, dropped), a resumed state's (else 0, 0, 0), on
        # (units taken in order extend it). None: not counted (no filter, or an elastic
        # layout, whose units are pieces of row groups).
        self._counts: dict[int, tuple[int, int]] | None = None
        if filter is not None and layout is None:
            unit0, kept0, dropped0 = counted or (0, 0, 0)
            self._counts = {unit0: (kept0, dropped0)}
        self._unit_counts: dict[int, tuple[int, int]] = {}  # cached units' (kept, dropped)
        self.skipped_row_groups: list[str] = []  # --on-error skip: "path#row_group", in order
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))
        # slot_provenance.py: told each unit's rows as read (set only with provenance on)
        self.recorder: Callable[[SourceReader, int, np.ndarray], None] | None = None
        self._unit_parts: dict[int, list[tuple[int, int]]] = {}  # fixed at a unit's first task
        self._task_share = (-1, 1.0)  # (unit, its tasks' share of a full task): task_tokens

    # -- where units come from ----------------------------------------------

    @property
    def waits_for_plan(self) -> bool:
        """Its next unit is past what an early plan knows (dataset.scan_dataset: the daemon
        still reads the rest of the footers); it reads on once `on_whole_plan`. A unit is
        read only when the one after it is known too, so every position the stream can
        reach names a known row group (its epoch, in every cursor)."""
        return (not self.plan.complete and not self.retry and self.next_part == 0
                and self.rank + (self.next_unit + 1) * self.world_size >= len(self.plan))

    def on_whole_plan(self, plan: SplitPlan) -> None:
        """The whole plan, which begins with the early one this reader read from."""
        self.plan = plan
        self._epoch_order = (-1, np.arange(0))

    def unit_position(self, unit: int) -> tuple[int, int]:
        """(epoch, ordinal) of the rank's `unit`-th row group in the global sequence."""
        return unit_position(self.plan, self.layout, self.rank, self.world_size, unit)

    def _ref(self, unit: int) -> RowGroupRef:
        epoch, ordinal = self.unit_position(unit)
        return self.plan.row_groups[self._order(epoch)[ordinal]]

    def _parts(self, unit: int) -> list[tuple[int, int]]:
        """The unit's row ranges, one a task: fixed once asked, so a share learnt later
        never re-cuts a unit whose parts are out."""
        parts = self._unit_parts.get(unit)
        if parts is None:
            ref = self._ref(unit)
            parts = self._unit_parts[unit] = ref.parts(self._task_text_bytes(ref))
        return parts

    @property
    def task_tokens(self) -> float:
        """About the tokens one task brings (read-ahead keeps a task per pool place): a
        filtered source's tasks hold `task_bytes` of the text it keeps, more in all; a
        task of a row group smaller than that brings less. (Counted as `task_bytes`,
        row groups of 17 documents were read ~100 tasks ahead: a stream left after a
        few batches had its workers tokenize ~25 epochs of a small corpus for nothing.)"""
        unit = self.next_unit
        if self._task_share[0] != unit and not self.waits_for_plan:  # once a unit
            ref = self._ref(unit)
            want = self._task_text_bytes(ref)
            self._task_share = (unit, min(1.0, ref.text_bytes / ref.part_count(want) / want))
        return (self.task_bytes * self.tokens_per_text_byte / self._kept_share()
                * self._task_share[1])

    def _kept_share(self) -> float:
        """The share of rows this source's filter kept so far (1: none yet, no filter)."""
        seen = self.documents + self.dropped
        if self.filter is None or not seen:
            return 1.0
        return max(self.documents / seen, MIN_KEPT_SHARE)

    def _task_text_bytes(self, ref: RowGroupRef) -> int:
        """Text per task: `task_bytes`; of a filtered source, enough that each part
        keeps at least `task_bytes` of text at the share of rows its filter kept so far
        (a part's tokenizing then weighs what an unfiltered one does, and a row group
        whose text is mostly dropped is decoded by one worker, not by every worker that
        gets a part of it: decoding the dropped text is the filter's main cost)."""
        share = self._kept_share()
        if share == 1.0:
            return self.task_bytes
        n = max(1, int(ref.text_bytes * share // self.task_bytes))
        return max(1, -(-ref.text_bytes // n))

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:  # asked for every part: compute once per epoch
            self._epoch_order = (epoch, epoch_order(len(self.plan), self.shuffle_seed, epoch))
        return self._epoch_order[1]

    def _row_order(self, unit: int) -> np.ndarray | None:
        """The order a shuffled epoch reads the unit's rows in (None: file order)."""
        if self.shuffle_seed is None:
            return None
        epoch, ordinal = self.unit_position(unit)
        n = self._ref(unit).num_rows
        return np.random.default_rng([self.shuffle_seed, epoch, ordinal]).permutation(n)

    # -- scheduling ---------------------------------------------------------

    def pending_bytes(self) -> int:
        """Bytes finished or in flight and not yet taken."""
        return self.staged_bytes + sum(self.inflight.values())

    def head_unscheduled(self, wanted_unit: int) -> bool:
        """`wanted_unit` (the next one to take) waits for a task not yet out: a lost
        part, or the rest of that unit. Finished parts of a unit that still lacks one
        must never count as enough read-ahead (nor hold the budget against it)."""
        return bool(self.retry) or self.next_unit <= wanted_unit

    def next_task(self) -> Task:
        if self.retry:
            unit, part = self.retry.popleft()
        else:
            unit, part = self._advance()
        epoch, ordinal = self.unit_position(unit)
        ref = self._ref(unit)
        rows = self._parts(unit)[part]
        doc_seed = None
        if self.shuffle_seed is not None:
            doc_seed = [self.shuffle_seed, epoch, ordinal]
        text_bytes = ref.text_bytes * (rows[1] - rows[0]) // max(ref.num_rows, 1)
        estimate = int(text_bytes * self.tokens_per_text_byte * self.itemsize)
        self.inflight[(unit, part)] = estimate
        return Task(self.stream, self.source, unit, part, ref.path, ref.row_group, self.column,
                    rows, doc_seed, text_bytes, ref.shard_stamp,
                    self.filter.text if self.filter is not None else "")

    def serve_cached(self) -> int:
        """Take the next unit from the token cache instead of the workers, if it is there;
        returns the bytes it staged (0: not cached, the workers will tokenize it)."""
        if self.cache is None or self.retry or self.next_part != 0 or self.error is not None:
            return 0
        unit = self.next_unit
        if unit == self._cache_missed or unit in self.skip:
            return 0  # asked once already / _advance pushes it empty
        ref = self._ref(unit)
        if isinstance(self.cache, TokenCache):
            in_file = self.in_file and (ref.path, ref.row_group) not in self.exclude
            cached = self.cache.get(ref.path, ref.shard_stamp, ref.row_group, in_file=in_file)
        else:
            cached = self.cache.get(ref.path, ref.shard_stamp, ref.row_group)
        if cached is None or len(cached.row_tokens) != ref.num_rows:
            self._cache_missed = unit  # one lookup (and one miss counted) per unit
            return 0
        if isinstance(cached.tokens, FileTokens):  # in file order, nothing excluded
            tokens, row_tokens = cached.tokens, cached.row_tokens
        else:
            tokens, row_tokens = self._excluding(unit, *cached.in_order(self._row_order(unit)))
        if self.recorder is not None:
            self.recorder(self, unit, row_tokens)
        got = Unit.of_lengths(tokens, row_tokens)
        self.whole[unit] = got
        if self._counts is not None:
            self._unit_counts[unit] = (len(got.doc_starts),
                                       len(row_tokens) - len(got.doc_starts))
        self.staged_bytes += _nbytes(got)
        self.documents += len(got.doc_starts)
        self._count_empty(len(row_tokens) - len(got.doc_starts))
        self.units_cached += 1
        self.next_unit += 1
        return _nbytes(got)

    def _advance(self) -> tuple[int, int]:
        """The next (unit, part) in stream order."""
        # After a bestfit resume, units between the buffer's oldest piece and the read
        # position hold nothing the packer needs: they are pushed empty, not tokenized.
        while self.next_part == 0 and self.next_unit in self.skip:
            self.whole[self.next_unit] = None
            self.next_unit += 1
        unit, part = self.next_unit, self.next_part
        if part + 1 < len(self._parts(unit)):
            self.next_part += 1
        else:
            self.next_unit, self.next_part = unit + 1, 0
        return unit, part

    # -- outcomes -----------------------------------------------------------

    def on_failure(self, task: Task, error: str) -> None:
        key = (task.unit, task.part)
        if self.inflight.pop(key, None) is None:
            return  # not ours to re-run (already finished, or scheduled again)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] < MAX_ATTEMPTS:
            self.retry.appendleft(key)
        elif self.on_error == "skip":
            self._skip_unit(task, error)
        else:
            self.error = (f"{task.path} row group {task.row_group} (unit {task.unit}, part "
                          f"{task.part}) failed {MAX_ATTEMPTS} times: {error}; "
                          "fix or remove the file, or serve with --on-error skip")

    def _skip_unit(self, task: Task, error: str) -> None:
        """--on-error skip: the whole row group delivers nothing, whichever part failed.

        Whole, so the outcome does not depend on which parts happened to finish: a
        resume that meets the same bad row group skips it the same way.
        """
        unit = task.unit
        log.warning("stream %d source %d: skipping %s row group %d (unit %d) after %d "
                    "failures: %s", self.stream, self.source, task.path, task.row_group, unit,
                    MAX_ATTEMPTS, error)
        self.skipped_row_groups.append(f"{task.path}#{task.row_group}")
        for part in self.results.pop(unit, {}).values():
            self.staged_bytes -= _nbytes(part)
        self._unit_parts.pop(unit, None)
        for key in [k for k in self.inflight if k[0] == unit]:
            del self.inflight[key]  # their results are dropped as strays when they come
        self.retry = deque(k for k in self.retry if k[0] != unit)
        self.whole[unit] = None
        if self.next_unit == unit:
            self.next_unit, self.next_part = unit + 1, 0

    def on_result(self, result: Result) -> None:
        task = result.task
        if self.inflight.pop((task.unit, task.part), None) is None:
            return  # a duplicate (re-run after a worker death that had in fact finished)
        parts = self.results.setdefault(task.unit, {})
        parts[task.part] = result
        self.staged_bytes += _nbytes(result)
        self.tasks_done += 1
        if len(parts) == len(self._parts(task.unit)):  # counted whole: status shows the
            for part in parts.values():                # counts of a prefix of units read
                self.documents += len(part.doc_starts)
                self._count_empty(part.skipped)
        if task.text_bytes > 0:  # learn the corpus's tokens per byte of text for estimates
            ratio = len(result.tokens) / task.text_bytes
            self.tokens_per_text_byte += (ratio - self.tokens_per_text_byte) / min(
                self.tasks_done, 16)

    def _count_empty(self, rows: int) -> None:
        if self.filter is not None:
            self.dropped += rows
        else:
            self.skipped += rows

    def take(self, unit: int) -> Unit | None:
        """Unit `unit` once all its parts are in, its parts joined in order (None: not yet)."""
        if unit in self.whole:
            got = self.whole.pop(unit)
            self.units_done += 1
            self._counted(unit, self._unit_counts.pop(unit, (0, 0)))
            if got is None:
                return EMPTY
            self.staged_bytes -= _nbytes(got)
            return self._shaped(unit, got)
        parts = self.results.get(unit)
        if parts is None or len(parts) < len(self._parts(unit)):
            return None
        del self.results[unit]
        self._unit_parts.pop(unit, None)
        ordered = [parts[i] for i in range(len(parts))]
        self.staged_bytes -= sum(_nbytes(r) for r in ordered)
        self.units_done += 1
        tokens = (ordered[0].tokens if len(ordered) == 1
                  else np.concatenate([r.tokens for r in ordered]))
        row_tokens = (ordered[0].row_tokens if len(ordered) == 1
                      else np.concatenate([r.row_tokens for r in ordered]))
        if self._counts is not None:
            kept = int(np.count_nonzero(row_tokens))
            self._counted(unit, (kept, len(row_tokens) - kept))
        if self.cache is not None:  # tokenized here: keep it
            ref = self._ref(unit)
            if len(row_tokens) == ref.num_rows:
                self.cache.put(ref.path, ref.shard_stamp, ref.row_group,
                               *file_order(tokens, row_tokens, self._row_order(unit)))
        tokens, row_tokens = self._excluding(unit, tokens, row_tokens)
        if self.recorder is not None:
            self.recorder(self, unit, row_tokens)
        return self._shaped(unit, Unit.of_lengths(tokens, row_tokens))

    def _excluding(self, unit: int, tokens: np.ndarray, row_tokens: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """A whole unit without its excluded rows (exclude.py)."""
        ref = self._ref(unit)
        rows = self.exclude.get((ref.path, ref.row_group))
        if rows is None or len(row_tokens) != ref.num_rows:
            return tokens, row_tokens
        tokens, kept = exclude_unit(tokens, row_tokens, rows, self._row_order(unit), unit,
                                    self.exclude_keep)
        self.excluded += int(np.count_nonzero(kept != row_tokens))
        return tokens, kept

    def _counted(self, unit: int, counts: tuple[int, int]) -> None:
        """Unit `unit` was taken with `counts` (kept, dropped): the counts before the next."""
        if self._counts is not None and unit in self._counts:
            kept, dropped = self._counts[unit]
            self._counts[unit + 1] = (kept + counts[0], dropped + counts[1])

    def counts_before(self, unit: int) -> tuple[int, int] | None:
        """(kept, dropped) in the rank's units before `unit`, exactly (None: not known).
        Positions ask in order, so older entries go."""
        if self._counts is None:
            return None
        got = self._counts.get(unit)
        if got is not None:
            for u in [u for u in self._counts if u < unit]:
                del self._counts[u]
        return got

    def _shaped(self, unit: int, got: Unit) -> Unit:
        """What the rank's layout keeps of a unit's row group (all of it, normally)."""
        return got if self.layout is None else elastic.apply(self.layout.item(unit), got)


def _nbytes(u: Unit | Result) -> int:
    return int(u.tokens.nbytes + u.doc_starts.nbytes)
