"""One stream: a rank's units -> packed windows -> ring slots, and who holds which.

A stream takes its units from its supply (supply.py: one source as it is, or several
mixed), packs them in order into free slots, and tracks which attached consumer has
been sent and has released which batch. Slots and the consumers holding them are
`SlotTable`'s (slots.py): the stream fills and publishes, the table announces,
releases and reclaims. Where the stream is, is its `Position` (position/); the JSON
cursor consumers get is made from it once per batch.

Read-ahead: the stream exposes what it holds and wants, and the scheduler decides:
`blocked_reader` (packing waits for a task not yet out: always served),
`hungry_readers` (under their share of the free slots plus one task per pool place).
A lazy supply (a mixture) makes units only while a free slot waits for tokens, so a
weight change applies from the next batch not yet filled, give or take the packer's
own buffer and one virtual unit.

A bounded stream (`spec.max_batches`: a fixed validation round) fills exactly that
many batches and reads no unit packing does not wait for, so every round reads the
same row groups and a round served from the cache tokenizes nothing (docs/recipes.md).

Change tracking: `changed` is set by whatever can change what the stream wants or can
deliver (a release, an attach or detach, a result, a task, a unit pushed, a slot filled or
freed, new weights) and cleared by the registry once a pass found nothing to do; the
daemon's loop passes then look only at changed streams (and at all of them at least
every heartbeat), so a message for one stream no longer costs a walk over eight.

Failure behaviour: a reader's task that fails MAX_ATTEMPTS times fails the stream
(`on_error="fail"`), and its consumers get an error naming the file and row group;
with `on_error="skip"` its whole row group delivers nothing instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import TokenfeedError
from tokenfeed.common.ring import Ring
from tokenfeed.producer.dataset import Dataset
from tokenfeed.producer.exclude import mark_at
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.position import Packed, Position, cursor_json
from tokenfeed.producer.reader import Source, SourceReader
from tokenfeed.producer.slot_provenance import SlotProvenance
from tokenfeed.producer.slots import Attachment, SlotTable
from tokenfeed.producer.supply import filter_counts, make_supply

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 20  # status lists the latest skipped row groups, and counts them all


class Stream:
    def __init__(self, sid: int, spec: StreamSpec, ring: Ring, sources: list[Source],
                 start: Position, skip: int = 0, **reader_options: Any) -> None:
        """A stream of `spec` from `start` over `sources` (a mixture's: in its state's
        name order) whose first `skip` batches are packed and dropped, never published;
        `reader_options` go to every SourceReader (task_bytes, on_error)."""
        self.sid = sid
        self.spec = spec
        self.ring = ring
        self.packer = make_packer(spec, start.packed)
        self.supply = make_supply(sid, spec, sources, start,
                                  {"itemsize": ring.layout.itemsize, **reader_options})
        self.readers: list[SourceReader] = self.supply.readers
        self._source_names = [s.name for s in sources]  # the readers', in order
        self.table = SlotTable(ring)
        self.error: str | None = None
        self.told: set[bytes] = set()  # consumers already sent `error`
        self.idle_since: float | None = None
        self.batches = 0
        self.origin = (start, skip)  # where it began: replicas skipping alike share it
        self.skip_left = skip
        # a skipped window is cut here, not into a ring slot
        self._scratch = np.empty(spec.window_tokens, dtype=ring.slots[0].dtype) if skip else None
        self._memo: tuple[Packed, Position] | None = None  # the Position at packer position
        self._exclude = start.exclude  # the exclusion list in force, where it began
        self.provenance: SlotProvenance | None = None  # slot_provenance.enable: recording
        self.changed = True  # something happened since the registry last found nothing to do
        self.wants = True  # the scheduler's last answer to "wants work?" (scheduler.py)

    # -- positions ----------------------------------------------------------

    def position(self) -> Position:
        """Where the next batch to be filled starts."""
        packed = self.packer.position
        if self._memo is None or self._memo[0] is not packed:
            position = self.supply.position(packed)
            if self._exclude is not None:
                position = dataclasses.replace(
                    position, exclude=mark_at(self._exclude, position))
            self._memo = (packed, position)
        return self._memo[1]

    def cursor(self, position: Position | None = None) -> dict[str, Any]:
        """`position` (default: the next batch's) as the JSON cursor consumers get."""
        return cursor_json(position or self.position(), self.supply.plans, self.spec)

    def seq_at(self, start: Position, skip: int = 0) -> int | None:
        """Seq of a still-held batch that starts at `start` (`skip` batches past it), or of
        the next one to fill; None when this stream no longer has it."""
        if skip:
            first_held = 0 in self.table.by_seq or self.table.next_seq == 0
            return 0 if self.origin == (start, skip) and first_held else None
        return self.table.seq_at(start, self.position())

    # -- what read-ahead needs (the scheduler decides) ----------------------

    @property
    def depth(self) -> int:
        return self.table.depth

    @property
    def consumers(self) -> dict[bytes, Attachment]:
        return self.table.consumers

    @property
    def inflight_count(self) -> int:
        return sum(len(r.inflight) for r in self.readers)

    def estimate(self, task: Task) -> int:
        """The staged bytes a task just handed out is expected to bring."""
        return self.readers[task.source].inflight[(task.unit, task.part)]

    def _packer_tokens(self) -> int:
        """Tokens pushed and not yet packed, less an estimate of what packing lacks."""
        return self.packer.buffered_tokens - self.packer.lacking_tokens

    def staged(self) -> int:
        """Bytes this stream holds or expects outside its ring: the staging budget's share."""
        held = self.packer.buffered_tokens + sum(self.supply.held_tokens())
        return held * self.ring.layout.itemsize + sum(r.pending_bytes() for r in self.readers)

    def wanted_tokens(self, pool_capacity: int) -> float:
        """Read-ahead: the free slots plus one task per pool place (every worker busy with
        a second task queued), whatever the ring's size."""
        task_tokens = max(r.task_tokens for r in self.readers)
        windows = len(self.table.free) + 1 + min(self.skip_left, self.ring.layout.slot_count)
        return windows * self.spec.window_tokens + pool_capacity * task_tokens

    @property
    def done(self) -> bool:
        """A bounded stream (max_batches) that filled all its batches: it reads nothing more."""
        limit = self.spec.max_batches
        return limit is not None and self.batches >= limit

    def blocked_reader(self) -> int | None:
        """The reader packing waits on for a task not yet out: a lost part, the rest of
        the next unit, or the next unit while the packer holds less than a window."""
        if self.done:
            return None
        short = self._packer_tokens() < self.spec.window_tokens
        blocked = self.supply.blocked(self.packer.next_unit, short)
        return None if blocked is None or self.readers[blocked].waits_for_plan else blocked

    def hungry_readers(self, pool_capacity: int) -> list[int]:
        """Readers under their share of the read-ahead, the hungriest first. A bounded
        stream reads ahead nothing: it reads what packing waits for, the same every round."""
        if self.spec.max_batches is not None:
            return []
        wanted = self.wanted_tokens(pool_capacity)
        packed = self._packer_tokens()
        itemsize = self.ring.layout.itemsize
        hungry: list[tuple[float, int]] = []
        for i, (reader, share, held) in enumerate(zip(
                self.readers, self.supply.shares(), self.supply.held_tokens(), strict=True)):
            if share <= 0 or reader.waits_for_plan:
                continue
            have = reader.pending_bytes() // itemsize + held + share * packed
            if have < share * wanted:
                hungry.append((have / share, i))
        return [i for _, i in sorted(hungry)]

    def on_whole_plan(self, datasets: Mapping[str, Dataset]) -> bool:
        """The daemon learnt every shard's row groups: readers of an early plan read on
        through the whole one, which begins with theirs. True if this stream had one."""
        early = False
        for reader, name in zip(self.readers, self._source_names, strict=True):
            if not reader.plan.complete:
                reader.on_whole_plan(datasets[name].splits[reader.plan.name])
                early = True
        self.changed = self.changed or early
        return early

    def starvation(self) -> float:
        """Lower is hungrier: fraction of the ring already filled."""
        return self.depth / self.ring.layout.slot_count

    def next_task(self, reader: int) -> Task:
        self.changed = True
        return self.readers[reader].next_task()

    def serve_cached(self, reader: int) -> int:
        """Take `reader`'s next unit from the token cache, if it is there; returns the
        bytes it staged (0: not cached, the workers will tokenize it)."""
        served = self.readers[reader].serve_cached()
        self.changed = self.changed or bool(served)
        if served and self.spec.max_batches is not None:
            # A bounded stream reads only what packing waits for: pack at once, so the next
            # unit it waits for is known in this same pass (not one unit per loop pass).
            self.pack()
        return served

    @property
    def units_cached(self) -> int:
        return sum(r.units_cached for r in self.readers)

    # -- outcomes -----------------------------------------------------------

    def on_failure(self, task: Task, error: str) -> None:
        self.changed = True
        reader = self.readers[task.source]
        reader.on_failure(task, error)
        if reader.error is not None and self.error is None:
            self.error = f"stream {self.sid}: {reader.error}"
            log.error(self.error)

    def on_result(self, result: Result) -> None:
        self.changed = True
        self.readers[result.task.source].on_result(result)

    # -- packing and delivery -----------------------------------------------

    def pack(self) -> bool:
        """Move finished units into the packer in order and fill free slots; True if any.

        A lazy supply makes units only while a free slot waits for tokens; otherwise
        whatever is finished is pushed."""
        before = self._progress()
        filled = self._pack()
        if self._progress() != before:
            self.changed = True
        return filled

    def _progress(self) -> tuple[Any, ...]:
        """What packing moves: units pushed and taken (a mixture takes some without
        pushing), batches filled or skipped, an error."""
        return (self.packer.next_unit, sum(r.units_done for r in self.readers), self.batches,
                self.skip_left, self.error)

    def _pack(self) -> bool:
        filled = False
        lazy = self.supply.lazy
        while not self.done:
            while not (lazy and (not self.table.free or self.packer.ready())):
                try:
                    unit = self.supply.take(self.packer.next_unit)
                    if unit is None:
                        break
                    if self.provenance is not None:
                        self.provenance.pushed(self.packer.next_unit, unit)
                    self.packer.push(self.packer.next_unit, unit.tokens, unit.doc_starts)
                except TokenfeedError as e:  # a resumed position the data cannot hold
                    self.error = f"stream {self.sid}: {e}"
                    log.error(self.error)
                    return filled
            if self.skip_left and self._scratch is not None and self.packer.ready():
                skipped = self.packer.position
                self.packer.fill(self._scratch)  # skipped: never published, never sent
                if self.provenance is not None:
                    self.provenance.filled(None, skipped)
                self.skip_left -= 1
                self.supply.forget_before(self.packer.position.first_unit)
                continue
            if not (self.table.free and self.packer.ready()):
                return filled
            index = self.table.begin_fill()
            before = self.position()
            try:
                self.packer.fill(self.ring.slots[index])
            except TokenfeedError as e:  # a cache entry truncated under it (cache.py)
                self.error = f"stream {self.sid}: {e}"
                log.error(self.error)
                return filled
            if self.provenance is not None:
                self.provenance.filled(index, before.packed)
            after = self.position()
            self.table.publish(index, before, self.cursor(after))
            self.supply.forget_before(after.first_unit)  # no position before it is made again
            self.supply.on_batch()
            self.batches += 1
            filled = True
        return filled

    def reweight(self, weights: Mapping[str, float]) -> None:
        """A mixture's new weights, from the next virtual unit not yet mixed."""
        self.supply.reweight(weights)
        self._memo = None  # positions carry the schedule
        self.changed = True

    def announcements(self) -> list[tuple[bytes, dict[str, Any]]]:
        """`ready` messages now due: each consumer gets each filled batch once, in order."""
        return [(identity, {"stream": self.sid, "slot": index, "seq": seq, "cursor": after})
                for identity, index, seq, after in self.table.announcements()]

    def reclaim(self) -> None:
        if self.table.reclaim():
            self.changed = True

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, first_seq: int, replicas: int = 1,
               replica_wait_s: float = 0.0) -> None:
        self.table.attach(identity, first_seq, replicas, replica_wait_s)
        self.idle_since = None
        self.changed = True

    def release(self, identity: bytes, seq: int) -> None:
        self.table.release(identity, seq)
        self.changed = True

    def detach(self, identity: bytes) -> None:
        self.table.detach(identity)
        self.changed = True
        if not self.consumers:
            self.idle_since = time.monotonic()

    # -- status (reads only) ------------------------------------------------

    def _sum(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.readers)

    @property
    def skipped(self) -> int:
        return self._sum("skipped")

    def progress(self, cursor: Mapping[str, Any]) -> float:
        """How far into its epoch `cursor` is (a mixture: its source furthest behind)."""
        plans = self.supply.plans
        if not all(p.complete for p in plans.values()):
            return 0.0  # an early plan's length is not the epoch's
        epochs = cursor.get("epochs")
        name = min(epochs, key=lambda n: epochs[n]) if epochs else next(iter(plans))
        return int(cursor["row_group"]) / max(len(plans[name]), 1)

    def describe(self) -> dict[str, Any]:
        skips = [g for r in self.readers for g in r.skipped_row_groups]
        cursor = self.cursor()
        return {
            "stream": self.sid,
            **self.spec.to_dict(),
            "depth": self.depth,
            "slots": self.ring.layout.slot_count,
            "token_bytes": self.ring.layout.itemsize,
            "consumers": len(self.consumers),
            "replicas": self.table.replicas(),
            "batches": self.batches,
            "batches_to_skip": self.skip_left,
            "tasks_inflight": self.inflight_count,
            "tasks_done": self._sum("tasks_done"),
            "units_cached": self.units_cached,
            "units_done": self._sum("units_done"),
            "staged_bytes": self.staged(),
            "documents": self._sum("documents"),
            "skipped_values": self.skipped,
            "excluded_documents": self._sum("excluded"),
            "skipped_row_groups": skips[-MAX_LISTED_SKIPS:],
            "skipped_row_group_count": len(skips),
            "position": {k: v for k, v in cursor.items() if k not in ("buffer", "mix")},
            "mix": self.supply.status(cursor.get("epochs") or {}),
            "filters": filter_counts(self.supply),
            **self.packer.stats(),
            "error": self.error,
        }
