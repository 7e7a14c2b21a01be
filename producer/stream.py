"""One stream: a rank's row groups -> tokenized units -> packed windows -> ring slots.

A stream owns its ring segment, schedules its row groups as units (bounded
read-ahead), reorders finished units, packs them in order into free slots, and
tracks which attached consumer has been sent and has released which batch.

Slots and the consumers holding them are `SlotTable`'s (slots.py): the stream fills
and publishes, the table announces, releases and reclaims.

Failure behaviour: a task whose worker died is re-run (same input, same output);
a task that fails MAX_ATTEMPTS times fails the stream (`on_error="fail"`), and its
consumers get an error naming the file and row group; with `on_error="skip"` its
whole row group delivers nothing instead, logged and listed in `describe()`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np

from tokenfeed.common.config import MAX_POSITION, StreamSpec
from tokenfeed.common.errors import StateMismatchError, TokenfeedError
from tokenfeed.common.ring import Ring
from tokenfeed.producer.cache import TokenCache, file_order
from tokenfeed.producer.config import DEFAULT_TASK_BYTES
from tokenfeed.producer.dataset import RowGroupRef, SplitPlan
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.slots import Attachment, SlotTable

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
WHOLE = -1  # the part number of a result that stands for its whole unit
MAX_LISTED_SKIPS = 20  # status lists the latest skipped row groups, and counts them all
INITIAL_TOKENS_PER_TEXT_BYTE = 0.25  # English under cl100k; learnt from results as they come
_NO_TOKENS = np.zeros(0, dtype=np.uint32)
_NO_STARTS = np.zeros(0, dtype=np.int64)


def cursor_at(plan: SplitPlan, spec: StreamSpec, position: dict[str, Any]) -> dict[str, Any]:
    """A packer position with the epoch and row-group ordinal its unit falls on."""
    epoch, ordinal = plan.unit_position(spec.rank, spec.world_size, int(position["unit"]))
    if epoch >= MAX_POSITION:
        raise StateMismatchError(
            f"position unit {position['unit']} of rank {spec.rank}/{spec.world_size} lies in "
            f"epoch {epoch}, past the largest exact position {MAX_POSITION}; the state is "
            "corrupt or from another data set"
        )
    return {**position, "epoch": epoch, "row_group": ordinal}


class Stream:
    def __init__(
        self, sid: int, spec: StreamSpec, plan: SplitPlan, ring: Ring, column: str,
        start: dict[str, Any], *, task_bytes: int = DEFAULT_TASK_BYTES, on_error: str = "fail",
        cache: TokenCache | None = None,
    ) -> None:
        self.sid = sid
        self.spec = spec
        self.plan = plan
        self.ring = ring
        self.column = column
        self.task_bytes = task_bytes
        self.on_error = on_error
        self.cache = cache
        self.units_cached = 0  # units served from the token cache
        self._cache_missed = -1  # the last unit the cache did not hold
        self.packer = make_packer(spec, start)
        self.table = SlotTable(ring)
        self.next_unit = self.packer.next_unit  # next (unit, part) to schedule
        self.next_part = 0
        self.retry: deque[tuple[int, int]] = deque()
        self.attempts: dict[tuple[int, int], int] = {}
        self.inflight: dict[tuple[int, int], int] = {}  # (unit, part) -> estimated bytes
        self.results: dict[int, dict[int, Result]] = {}  # unit -> finished parts
        self.staged_bytes = 0  # bytes of the finished parts in `results`
        self.error: str | None = None
        self.told: set[bytes] = set()  # consumers already sent `error`
        self.idle_since: float | None = None
        self.tokens_per_text_byte = INITIAL_TOKENS_PER_TEXT_BYTE  # running, sizes estimates
        self.tasks_done = 0
        self.units_done = 0
        self.documents = 0
        self.skipped = 0
        self.skipped_row_groups: list[str] = []  # --on-error skip: "path#row_group", in order
        self.batches = 0
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    # -- positions ----------------------------------------------------------

    def cursor(self, position: dict[str, Any]) -> dict[str, Any]:
        return cursor_at(self.plan, self.spec, position)

    def next_position(self) -> dict[str, Any]:
        """Cursor of the next batch to be filled."""
        return self.cursor(self.packer.position)

    def seq_at(self, cursor: dict[str, Any]) -> int | None:
        """Seq of a still-held batch that starts at `cursor`, or of the next one to fill."""
        key = self.packer.resume_key
        return self.table.seq_at(key, key(cursor), self.packer.position)

    # -- scheduling ---------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.table.depth

    @property
    def consumers(self) -> dict[bytes, Attachment]:
        return self.table.consumers

    def _ref(self, unit: int) -> RowGroupRef:
        epoch, ordinal = self.plan.unit_position(self.spec.rank, self.spec.world_size, unit)
        return self.plan.row_groups[self._order(epoch)[ordinal]]

    def _parts(self, unit: int) -> list[tuple[int, int]]:
        return self._ref(unit).parts(self.task_bytes)

    def staged(self) -> int:
        """Bytes this stream holds or expects outside its ring: the staging budget's share."""
        buffered = max(self.packer.buffered_tokens, 0) * self.ring.layout.itemsize
        return self.staged_bytes + buffered + sum(self.inflight.values())

    def wants_work(self, pool_capacity: int) -> bool:
        """More tasks would be used: the ring has room, or the pool would idle without them.

        Read-ahead covers the free slots plus one task per pool place (every worker busy
        with a second task queued), whatever the ring's size; the daemon's staging budget
        bounds it across streams.
        """
        if self.error is not None or len(self.inflight) >= pool_capacity:
            return False
        if self.head_unscheduled():
            return True
        itemsize = self.ring.layout.itemsize
        task_tokens = self.task_bytes * self.tokens_per_text_byte
        wanted = (len(self.table.free) + 1) * self.spec.window_tokens + pool_capacity * task_tokens
        pending = (self.staged_bytes + sum(self.inflight.values())) // itemsize
        return self.packer.buffered_tokens + pending < wanted

    def head_unscheduled(self) -> bool:
        """Packing waits for a task not yet out: a lost part, the rest of the next unit,
        or the next unit while the packer holds less than a window.

        Parts are packed only as whole units, so finished parts of a unit that still
        lacks one must never count as enough read-ahead (nor hold the budget against it).
        A packer that holds a window or more with nothing out is not waiting: without
        that test every loop pass took one more unit, so cached units (served in the
        loop itself) filled the whole staging budget (issue 15: +1.2-1.9 MB a unit).
        """
        if self.retry:
            return True
        return self.next_unit <= self.packer.next_unit and (
            self.next_part > 0 or self.packer.buffered_tokens < self.spec.window_tokens)

    def starvation(self) -> float:
        """Lower is hungrier: fraction of the ring already filled."""
        return self.depth / self.ring.layout.slot_count

    def next_task(self) -> Task:
        if self.retry:
            unit, part = self.retry.popleft()
        else:
            unit, part = self._advance()
        epoch, ordinal = self.plan.unit_position(self.spec.rank, self.spec.world_size, unit)
        ref = self._ref(unit)
        rows = ref.parts(self.task_bytes)[part]
        doc_seed = None
        if self.spec.shuffle_seed is not None:
            doc_seed = [self.spec.shuffle_seed, epoch, ordinal]
        text_bytes = ref.text_bytes * (rows[1] - rows[0]) // max(ref.num_rows, 1)
        estimate = int(text_bytes * self.tokens_per_text_byte * self.ring.layout.itemsize)
        self.inflight[(unit, part)] = estimate
        return Task(self.sid, unit, part, ref.path, ref.row_group, self.column, rows, doc_seed,
                    text_bytes)

    def serve_cached(self) -> int:
        """Take the next unit from the token cache instead of the workers, if it is there;
        returns the bytes it staged (0: not cached, the workers will tokenize it)."""
        if self.cache is None or self.retry or self.next_part != 0 or self.error is not None:
            return 0
        unit = self.next_unit
        if unit == self._cache_missed or not self.packer.needs_unit(unit):
            return 0  # asked once already / _advance pushes it empty
        ref = self._ref(unit)
        cached = self.cache.get(ref.path, ref.shard_stamp, ref.row_group)
        if cached is None or len(cached.row_tokens) != ref.num_rows:
            self._cache_missed = unit  # one lookup (and one miss counted) per unit
            return 0
        tokens, row_tokens = cached.in_order(self._row_order(unit))
        task = Task(self.sid, unit, WHOLE, ref.path, ref.row_group, self.column,
                    (0, ref.num_rows))
        result = Result.of_rows(task, tokens, row_tokens)
        self.results[unit] = {WHOLE: result}
        self.staged_bytes += result.tokens.nbytes + result.doc_starts.nbytes
        self.documents += len(result.doc_starts)
        self.skipped += result.skipped
        self.units_cached += 1
        self.next_unit += 1
        return result.tokens.nbytes + result.doc_starts.nbytes

    def _row_order(self, unit: int) -> np.ndarray | None:
        """The order a shuffled epoch reads the unit's rows in (None: file order)."""
        if self.spec.shuffle_seed is None:
            return None
        epoch, ordinal = self.plan.unit_position(self.spec.rank, self.spec.world_size, unit)
        n = self._ref(unit).num_rows
        return np.random.default_rng([self.spec.shuffle_seed, epoch, ordinal]).permutation(n)

    def _advance(self) -> tuple[int, int]:
        """The next (unit, part) in stream order."""
        # After a bestfit resume, units between the buffer's oldest piece and the read
        # position hold nothing the packer needs: they are pushed empty, not tokenized.
        while self.next_part == 0 and not self.packer.needs_unit(self.next_unit):
            self.results[self.next_unit] = {WHOLE: self._empty(self.next_unit)}
            self.next_unit += 1
        unit, part = self.next_unit, self.next_part
        if part + 1 < len(self._parts(unit)):
            self.next_part += 1
        else:
            self.next_unit, self.next_part = unit + 1, 0
        return unit, part

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:  # asked for every part: compute once per epoch
            n = len(self.plan)
            order = np.arange(n) if self.spec.shuffle_seed is None else (
                np.random.default_rng([self.spec.shuffle_seed, epoch]).permutation(n))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

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
            self.error = (f"stream {self.sid}: {task.path} row group {task.row_group} (unit "
                          f"{task.unit}, part {task.part}) failed {MAX_ATTEMPTS} times: {error}; "
                          "fix or remove the file, or serve with --on-error skip")
            log.error(self.error)

    def _skip_unit(self, task: Task, error: str) -> None:
        """--on-error skip: the whole row group delivers nothing, whichever part failed.

        Whole, so the outcome does not depend on which parts happened to finish: a
        resume that meets the same bad row group skips it the same way.
        """
        unit = task.unit
        log.warning("stream %d: skipping %s row group %d (unit %d) after %d failures: %s",
                    self.sid, task.path, task.row_group, unit, MAX_ATTEMPTS, error)
        self.skipped_row_groups.append(f"{task.path}#{task.row_group}")
        for part in self.results.pop(unit, {}).values():
            self.staged_bytes -= part.tokens.nbytes + part.doc_starts.nbytes
        for key in [k for k in self.inflight if k[0] == unit]:
            del self.inflight[key]  # their results are dropped as strays when they come
        self.retry = deque(k for k in self.retry if k[0] != unit)
        self.results[unit] = {WHOLE: self._empty(unit)}
        if self.next_unit == unit:
            self.next_unit, self.next_part = unit + 1, 0

    def on_result(self, result: Result) -> None:
        task = result.task
        if self.inflight.pop((task.unit, task.part), None) is None:
            return  # a duplicate (re-run after a worker death that had in fact finished)
        self.results.setdefault(task.unit, {})[task.part] = result
        self.staged_bytes += result.tokens.nbytes + result.doc_starts.nbytes
        self.tasks_done += 1
        self.documents += len(result.doc_starts)
        self.skipped += result.skipped
        if task.text_bytes > 0:  # learn the corpus's tokens per byte of text for estimates
            ratio = len(result.tokens) / task.text_bytes
            self.tokens_per_text_byte += (ratio - self.tokens_per_text_byte) / min(
                self.tasks_done, 16)

    def _empty(self, unit: int) -> Result:
        """A unit that delivers nothing (skipped, or not needed by a resumed packer)."""
        task = Task(self.sid, unit, WHOLE, "", -1, self.column, (0, 0))
        return Result(task, _NO_TOKENS, _NO_STARTS, 0, _NO_STARTS)

    def _take_unit(self) -> Result | None:
        """The packer's next unit once all its parts are in, its parts joined in order."""
        unit = self.packer.next_unit
        parts = self.results.get(unit)
        if parts is None or (WHOLE not in parts and len(parts) < len(self._parts(unit))):
            return None
        del self.results[unit]
        ordered = [parts[WHOLE]] if WHOLE in parts else [parts[i] for i in range(len(parts))]
        self.staged_bytes -= sum(r.tokens.nbytes + r.doc_starts.nbytes for r in ordered)
        self.units_done += 1
        joined = ordered[0] if len(ordered) == 1 else Result.of_rows(
            ordered[0].task, np.concatenate([r.tokens for r in ordered]),
            np.concatenate([r.row_tokens for r in ordered]))
        if self.cache is not None and WHOLE not in parts:  # tokenized here: keep it
            ref = self._ref(unit)
            if len(joined.row_tokens) == ref.num_rows:
                self.cache.put(ref.path, ref.shard_stamp, ref.row_group,
                               *file_order(joined.tokens, joined.row_tokens,
                                           self._row_order(unit)))
        return joined

    # -- packing and delivery -----------------------------------------------

    def pack(self) -> bool:
        """Move finished units into the packer in order and fill free slots; True if any."""
        filled = False
        while True:
            while (r := self._take_unit()) is not None:
                try:
                    self.packer.push(r.task.unit, r.tokens, r.doc_starts)
                except TokenfeedError as e:  # a resumed position the data cannot hold
                    self.error = f"stream {self.sid}: {e}"
                    log.error(self.error)
                    return filled
            if not (self.table.free and self.packer.ready()):
                return filled
            index = self.table.begin_fill()
            before = self.next_position()
            self.packer.fill(self.ring.slots[index])
            self.table.publish(index, before, self.next_position())
            self.batches += 1
            filled = True

    def announcements(self) -> list[tuple[bytes, dict[str, Any]]]:
        """`ready` messages now due: each consumer gets each filled batch once, in order."""
        return [(identity, {"stream": self.sid, "slot": index, "seq": seq, "cursor": after})
                for identity, index, seq, after in self.table.announcements()]

    def reclaim(self) -> None:
        self.table.reclaim()

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, first_seq: int, replicas: int = 1,
               replica_wait_s: float = 0.0) -> None:
        self.table.attach(identity, first_seq, replicas, replica_wait_s)
        self.idle_since = None

    def release(self, identity: bytes, seq: int) -> None:
        self.table.release(identity, seq)

    def detach(self, identity: bytes) -> None:
        self.table.detach(identity)
        if not self.consumers:
            self.idle_since = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "stream": self.sid,
            **self.spec.to_dict(),
            "depth": self.depth,
            "slots": self.ring.layout.slot_count,
            "token_bytes": self.ring.layout.itemsize,
            "consumers": len(self.consumers),
            "replicas": self.table.replicas(),
            "batches": self.batches,
            "tasks_inflight": len(self.inflight),
            "tasks_done": self.tasks_done,
            "units_cached": self.units_cached,
            "units_done": self.units_done,
            "staged_bytes": self.staged(),
            "documents": self.documents,
            "skipped_values": self.skipped,
            "skipped_row_groups": self.skipped_row_groups[-MAX_LISTED_SKIPS:],
            "skipped_row_group_count": len(self.skipped_row_groups),
            "position": {k: v for k, v in self.next_position().items() if k != "buffer"},
            **self.packer.stats(),
            "error": self.error,
        }
