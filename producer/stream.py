"""One stream: a rank's row groups -> tokenized units -> packed windows -> ring slots.

A stream owns its ring segment, schedules its row groups as units (bounded
read-ahead), reorders finished units, packs them in order into free slots, and
tracks which attached consumer has been sent and has released which batch.

Slot lifecycle: FREE -> filled with batch `seq` -> sent (`ready`) to every
attached consumer -> reclaimed once every attached consumer was sent it and none
still holds it. With no consumer attached, filled slots are kept (the stream is
warm for a consumer that re-attaches at its position).

Failure behaviour: a unit whose worker died is re-run (same input, same output);
a unit that fails MAX_ATTEMPTS times fails the stream, and its consumers get an
error naming the row group.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import TokenfeedError
from tokenfeed.common.ring import Ring
from tokenfeed.producer.dataset import SplitPlan
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Result, Task

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
_NO_TOKENS = np.zeros(0, dtype=np.uint32)
_NO_STARTS = np.zeros(0, dtype=np.int64)


@dataclass
class Attachment:
    """One consumer's progress on a stream."""

    identity: bytes
    next_send: int  # seq of the next batch to announce to it
    held: set[int] = field(default_factory=set)  # seqs announced and not yet released


@dataclass
class Slot:
    seq: int = -1  # -1: free
    before: dict[str, Any] = field(default_factory=dict)  # cursor of the batch's first token
    after: dict[str, Any] = field(default_factory=dict)  # cursor right after the batch


class Stream:
    def __init__(
        self, sid: int, spec: StreamSpec, plan: SplitPlan, ring: Ring, column: str,
        start: dict[str, Any],
    ) -> None:
        self.sid = sid
        self.spec = spec
        self.plan = plan
        self.ring = ring
        self.column = column
        self.packer = make_packer(spec, start)
        self.slots = [Slot() for _ in range(ring.layout.slot_count)]
        self.free: deque[int] = deque(range(ring.layout.slot_count))
        self.by_seq: dict[int, int] = {}  # filled seq -> slot
        self.next_seq = 0
        self.consumers: dict[bytes, Attachment] = {}
        self.next_unit = self.packer.next_unit
        self.retry: deque[int] = deque()
        self.attempts: dict[int, int] = {}
        self.inflight: set[int] = set()
        self.results: dict[int, Result] = {}
        self.error: str | None = None
        self.told: set[bytes] = set()  # consumers already sent `error`
        self.idle_since: float | None = None
        self.tokens_per_unit = 0.0  # running mean, for read-ahead sizing
        self.units_done = 0
        self.documents = 0
        self.skipped = 0
        self.batches = 0

    # -- positions ----------------------------------------------------------

    def cursor(self, position: dict[str, Any]) -> dict[str, Any]:
        epoch, ordinal = self.plan.unit_position(self.spec.rank, self.spec.world_size,
                                                 int(position["unit"]))
        return {**position, "epoch": epoch, "row_group": ordinal}

    def next_position(self) -> dict[str, Any]:
        """Cursor of the next batch to be filled."""
        return self.cursor(self.packer.position)

    def seq_at(self, cursor: dict[str, Any]) -> int | None:
        """Seq of a still-held batch that starts at `cursor`, or of the next one to fill."""
        key = self.packer.resume_key(cursor)
        for seq in sorted(self.by_seq):
            if self.packer.resume_key(self.slots[self.by_seq[seq]].before) == key:
                return seq
        if self.packer.resume_key(self.packer.position) == key:
            return self.next_seq
        return None

    # -- scheduling ---------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self.by_seq)

    def wants_work(self, max_inflight: int) -> bool:
        if self.error is not None or len(self.inflight) >= max_inflight:
            return False
        if self.retry:  # a lost unit blocks packing: finished later units must not hide it
            return True
        window = self.spec.window_tokens
        wanted = (len(self.free) + 1) * window
        pending = sum(len(r.tokens) for r in self.results.values())
        estimate = self.tokens_per_unit or window
        have = self.packer.buffered_tokens + pending + estimate * len(self.inflight)
        return have < wanted

    def starvation(self) -> float:
        """Lower is hungrier: fraction of the ring already filled."""
        return self.depth / len(self.slots)

    def next_task(self) -> Task:
        unit = self.retry.popleft() if self.retry else self._advance()
        self.inflight.add(unit)
        epoch, ordinal = self.plan.unit_position(self.spec.rank, self.spec.world_size, unit)
        ref = self.plan.row_groups[self._order(epoch)[ordinal]]
        doc_seed = None
        if self.spec.shuffle_seed is not None:
            doc_seed = [self.spec.shuffle_seed, epoch, ordinal]
        return Task(self.sid, unit, ref.path, ref.row_group, self.column, doc_seed)

    def _advance(self) -> int:
        # After a bestfit resume, units between the buffer's oldest piece and the read
        # position hold nothing the packer needs: they are pushed empty, not tokenized.
        while not self.packer.needs_unit(self.next_unit):
            task = Task(self.sid, self.next_unit, "", -1, self.column)
            self.results[self.next_unit] = Result(task, _NO_TOKENS, _NO_STARTS, 0)
            self.next_unit += 1
        unit = self.next_unit
        self.next_unit += 1
        return unit

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.plan)
        if self.spec.shuffle_seed is None:
            return np.arange(n)
        return np.random.default_rng([self.spec.shuffle_seed, epoch]).permutation(n)

    def on_failure(self, unit: int, error: str) -> None:
        self.inflight.discard(unit)
        self.attempts[unit] = self.attempts.get(unit, 0) + 1
        if self.attempts[unit] >= MAX_ATTEMPTS:
            self.error = f"stream {self.sid}: unit {unit} failed {MAX_ATTEMPTS} times: {error}"
            log.error(self.error)
        else:
            self.retry.appendleft(unit)

    def on_result(self, result: Result) -> None:
        unit = result.task.unit
        self.inflight.discard(unit)
        if unit < self.packer.next_unit or unit in self.results:
            return  # a duplicate (re-run after a worker death that had in fact finished)
        self.results[unit] = result
        self.units_done += 1
        self.documents += len(result.doc_starts)
        self.skipped += result.skipped
        n = len(result.tokens)
        self.tokens_per_unit += (n - self.tokens_per_unit) / min(self.units_done, 16)

    # -- packing and delivery -----------------------------------------------

    def pack(self) -> bool:
        """Move finished units into the packer in order and fill free slots; True if any."""
        filled = False
        while True:
            while self.packer.next_unit in self.results:
                r = self.results.pop(self.packer.next_unit)
                try:
                    self.packer.push(r.task.unit, r.tokens, r.doc_starts)
                except TokenfeedError as e:  # a resumed position the data cannot hold
                    self.error = f"stream {self.sid}: {e}"
                    log.error(self.error)
                    return filled
            if not (self.free and self.packer.ready()):
                return filled
            slot_index = self.free.popleft()
            slot = self.slots[slot_index]
            slot.before = self.next_position()
            self.packer.fill(self.ring.slots[slot_index])
            slot.after = self.next_position()
            slot.seq = self.next_seq
            self.ring.publish(slot_index, slot.seq, self.spec.window_tokens)
            self.by_seq[slot.seq] = slot_index
            self.next_seq += 1
            self.batches += 1
            filled = True

    def announcements(self) -> list[tuple[bytes, dict[str, Any]]]:
        """`ready` messages now due: each consumer gets each filled batch once, in order."""
        out = []
        for c in self.consumers.values():
            while c.next_send in self.by_seq:
                slot_index = self.by_seq[c.next_send]
                out.append((c.identity, {
                    "stream": self.sid, "slot": slot_index, "seq": c.next_send,
                    "cursor": self.slots[slot_index].after,
                }))
                c.held.add(c.next_send)
                c.next_send += 1
        return out

    def reclaim(self) -> None:
        """Free slots that every attached consumer was sent and released."""
        if not self.consumers:
            return
        low = min(c.next_send for c in self.consumers.values())
        held = set().union(*(c.held for c in self.consumers.values()))
        for seq in sorted(self.by_seq):
            if seq >= low:
                break
            if seq not in held:
                slot_index = self.by_seq.pop(seq)
                self.slots[slot_index].seq = -1
                self.free.append(slot_index)

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, first_seq: int) -> None:
        self.consumers[identity] = Attachment(identity, first_seq)
        self.idle_since = None

    def release(self, identity: bytes, seq: int) -> None:
        c = self.consumers.get(identity)
        if c is not None:
            c.held.discard(seq)

    def detach(self, identity: bytes) -> None:
        self.consumers.pop(identity, None)
        if not self.consumers:
            self.idle_since = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "stream": self.sid,
            **self.spec.to_dict(),
            "depth": self.depth,
            "slots": len(self.slots),
            "token_bytes": self.ring.layout.itemsize,
            "consumers": len(self.consumers),
            "batches": self.batches,
            "units_inflight": len(self.inflight),
            "units_done": self.units_done,
            "documents": self.documents,
            "skipped_values": self.skipped,
            "position": {k: v for k, v in self.next_position().items() if k != "buffer"},
            **self.packer.stats(),
            "error": self.error,
        }
