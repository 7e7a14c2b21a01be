"""A stream's ring slots and who holds them: the one owner of the slot lifecycle.

    FREE --begin_fill--> FILLING --publish--> FILLED(seq) --announcements--> sent to each
    attached consumer once, in seq order, and held by it --release--> not held by it
    FILLED, sent to every attached consumer and held by none --reclaim--> FREE

With no consumer attached nothing is reclaimed: filled slots stay for a trainer that
re-attaches at their position (warm re-attach, `seq_at`). A consumer that detaches
or is dropped holds nothing any more, so its slots are reclaimed once its siblings
on a shared stream are done with them.

Replicas (the tensor- or pipeline-parallel processes of one data-parallel rank) that
declare a group of N hold the group's batches for the N - 1 that have not attached
yet: a reservation at the group's first seq counts as a consumer that was sent
nothing, so the first replica runs ahead by the ring's depth and then waits, however
late the others attach. A reservation no replica took within `wait_s` is dropped (a
misconfigured N must not stall the group forever).

The ring's per-slot seq is a seqlock: `begin_fill` sets it to WRITING before any token
changes and `publish` writes the batch's seq after the last one, so a consumer that
reads a slot it no longer holds (dropped while paused, its slot refilled for another
consumer) sees another seq after its copy and discards the copy instead of returning
a torn batch (consumer/link.py). This relies on the slot's stores becoming visible in
program order, as on x86-64 (TSO); the numpy writes are separate calls.

Failure behaviour: releases of unknown consumers or seqs are ignored (a late release
from a dropped consumer is harmless); nothing here raises on peer input.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tokenfeed.common.ring import Ring


@dataclass
class Attachment:
    """One consumer's progress on a stream."""

    identity: bytes
    next_send: int  # seq of the next batch to announce to it
    held: set[int] = field(default_factory=set)  # seqs announced and not yet released
    replicas: int = 1  # the size of the group it declared
    stall_s: float = 0.0  # its caller's seconds waiting in next(), as last reported
    step_s: float = 0.0  # its caller's seconds between next() calls, as last reported


@dataclass
class Reservation:
    """Replicas of a group expected at `seq` that have not attached yet."""

    seq: int
    expected: int  # the group's size, as declared
    missing: int
    deadline: float  # monotonic; dropped after it


@dataclass
class Slot:
    seq: int = -1  # -1: free
    before: Any = None  # the Position of the batch's first token
    after: dict[str, Any] = field(default_factory=dict)  # JSON cursor right after the batch


class SlotTable:
    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.slots = [Slot() for _ in range(ring.layout.slot_count)]
        self.free: deque[int] = deque(range(ring.layout.slot_count))
        self.by_seq: dict[int, int] = {}  # filled seq -> slot
        self.next_seq = 0
        self.consumers: dict[bytes, Attachment] = {}
        self.reservations: dict[int, Reservation] = {}
        self.consumed = 0  # batches released by some consumer: the highest released seq + 1
        # Seconds reported by consumers, summed over every consumer this stream ever had
        # (deltas of each one's cumulative figures), so the totals never go down.
        self.stall_s = 0.0
        self.step_s = 0.0

    @property
    def depth(self) -> int:
        """Filled slots, announced or not."""
        return len(self.by_seq)

    def slot_of(self, seq: int) -> Slot:
        return self.slots[self.by_seq[seq]]

    # -- filling ------------------------------------------------------------

    def begin_fill(self) -> int:
        """Take a free slot for the next batch; its ring seq reads WRITING until `publish`."""
        index = self.free.popleft()
        self.ring.invalidate(index)
        return index

    def publish(self, index: int, before: Any, after: dict[str, Any]) -> int:
        """The slot holds the next batch, which starts at `before` and ends at `after`."""
        seq = self.next_seq
        self.slots[index] = Slot(seq, before, after)
        self.ring.publish(index, seq, self.ring.layout.slot_tokens)
        self.by_seq[seq] = index
        self.next_seq += 1
        return seq

    # -- delivery -----------------------------------------------------------

    def announcements(self) -> list[tuple[bytes, int, int, dict[str, Any]]]:
        """(consumer, slot, seq, cursor after) now due: each filled batch once each, in order."""
        out = []
        for c in self.consumers.values():
            while c.next_send in self.by_seq:
                index = self.by_seq[c.next_send]
                out.append((c.identity, index, c.next_send, self.slots[index].after))
                c.held.add(c.next_send)
                c.next_send += 1
        return out

    def release(self, identity: bytes, seq: int) -> None:
        c = self.consumers.get(identity)
        if c is not None and seq in c.held:
            c.held.discard(seq)
            self.consumed = max(self.consumed, seq + 1)

    def report(self, identity: bytes, stall_s: float, step_s: float) -> None:
        """A consumer's cumulative wait and step seconds (from its heartbeat). A figure
        lower than the last one (a new link restarts its count) adds nothing."""
        c = self.consumers.get(identity)
        if c is None:
            return
        self.stall_s += max(stall_s - c.stall_s, 0.0)
        self.step_s += max(step_s - c.step_s, 0.0)
        c.stall_s, c.step_s = stall_s, step_s

    def reclaim(self) -> int:
        """Free the slots every attached consumer was sent and released; returns how many."""
        if not self.consumers:
            return 0
        low = min([c.next_send for c in self.consumers.values()]
                  + [r.seq for r in self.reservations.values()])
        held = set().union(*(c.held for c in self.consumers.values()))
        freed = 0
        for seq in sorted(self.by_seq):
            if seq >= low:
                break
            if seq not in held:
                index = self.by_seq.pop(seq)
                self.slots[index].seq = -1
                self.free.append(index)
                freed += 1
        return freed

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, first_seq: int, replicas: int = 1,
               wait_s: float = 0.0) -> None:
        """`identity` reads from `first_seq` on; as one of `replicas`, it joins (or starts)
        the group at that seq, which holds its batches for the replicas still missing."""
        self.consumers[identity] = Attachment(identity, first_seq, replicas=replicas)
        group = self.reservations.get(first_seq)
        if group is not None and replicas > 1:
            group.missing -= 1
            if group.missing <= 0:
                del self.reservations[first_seq]
        elif replicas > 1:
            self.reservations[first_seq] = Reservation(
                first_seq, replicas, replicas - 1, time.monotonic() + wait_s)

    def expire(self, now: float) -> list[Reservation]:
        """Drop the reservations past their deadline; returns them (to be logged)."""
        gone = [r for r in self.reservations.values() if now > r.deadline]
        for r in gone:
            del self.reservations[r.seq]
        return gone

    def replicas(self) -> dict[str, int]:
        """The largest group declared, consumers attached, replicas still awaited, and how
        many batches the fastest consumer is ahead of the slowest."""
        sent = [c.next_send for c in self.consumers.values()]
        return {
            "expected": max([c.replicas for c in self.consumers.values()], default=1),
            "attached": len(self.consumers),
            "awaited": sum(r.missing for r in self.reservations.values()),
            "lag_batches": max(sent) - min(sent) if sent else 0,
        }

    def detach(self, identity: bytes) -> None:
        self.consumers.pop(identity, None)

    def seq_at(self, wanted: Any, next_fill: Any) -> int | None:
        """Seq of a filled batch that starts at position `wanted`, else of the next to
        fill if that is `next_fill`, else None (that position is gone from this ring)."""
        for seq in sorted(self.by_seq):
            if self.slots[self.by_seq[seq]].before == wanted:
                return seq
        return self.next_seq if next_fill == wanted else None
