"""The slot lifecycle on a real ring: fill, publish, announce, release, reclaim, attach-at."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tokenfeed.common.ring import EMPTY_SEQ, WRITING_SEQ, Ring, RingLayout
from tokenfeed.common.shm import segment_name
from tokenfeed.producer.position import ConcatPosition
from tokenfeed.producer.slots import SlotTable

A, B = b"consumer-a", b"consumer-b"


@pytest.fixture
def table() -> Iterator[SlotTable]:
    layout = RingLayout(slot_count=3, slot_tokens=16, itemsize=4)
    ring = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    try:
        yield SlotTable(ring)
    finally:
        ring.close()
        ring.segment.unlink()


def fill(table: SlotTable, n: int) -> list[int]:
    """Fill n batches that start at unit seq and end at unit seq + 1 (its JSON cursor)."""
    out = []
    for _ in range(n):
        index = table.begin_fill()
        seq = table.next_seq
        out.append(table.publish(index, ConcatPosition(seq), ConcatPosition(seq + 1).to_json()))
    return out


def test_a_slot_reads_writing_while_filled_and_its_seq_once_published(table):
    assert table.ring.seq_of(0) == EMPTY_SEQ
    index = table.begin_fill()
    assert table.ring.seq_of(index) == WRITING_SEQ
    seq = table.publish(index, ConcatPosition(0), {})
    assert table.ring.seq_of(index) == seq == 0


def test_each_consumer_is_announced_each_batch_once_in_order(table):
    table.attach(A, 0)
    fill(table, 2)
    table.attach(B, 1)
    first = [(who, seq) for who, _, seq, _ in table.announcements()]
    assert sorted(first) == [(A, 0), (A, 1), (B, 1)]
    assert table.announcements() == []
    fill(table, 1)
    assert sorted((who, seq) for who, _, seq, _ in table.announcements()) == [(A, 2), (B, 2)]


def test_a_slot_is_reclaimed_only_once_every_consumer_released_it(table):
    table.attach(A, 0)
    table.attach(B, 0)
    fill(table, 1)
    table.announcements()
    table.release(A, 0)
    assert table.reclaim() == 0  # B still holds it
    table.release(B, 0)
    assert table.reclaim() == 1
    assert table.depth == 0 and len(table.free) == 3


def test_a_batch_not_yet_announced_to_a_consumer_is_never_reclaimed(table):
    table.attach(A, 0)
    fill(table, 2)
    table.announcements()
    table.release(A, 0)
    table.release(A, 1)
    table.attach(B, 1)  # joins at batch 1, not announced to it yet
    assert table.reclaim() == 1  # batch 0 only
    assert list(table.by_seq) == [1]


def test_without_consumers_filled_slots_stay_for_a_warm_reattach(table):
    table.attach(A, 0)
    fill(table, 3)
    table.announcements()
    table.detach(A)
    assert table.reclaim() == 0
    assert table.seq_at(ConcatPosition(1), ConcatPosition(3)) == 1
    assert table.seq_at(ConcatPosition(1, doc=4), ConcatPosition(3)) == 1  # status field
    assert table.seq_at(ConcatPosition(1, 2), ConcatPosition(3)) is None
    assert table.seq_at(ConcatPosition(3), ConcatPosition(3)) == 3  # the next one to fill
    assert table.seq_at(ConcatPosition(7), ConcatPosition(3)) is None


def test_a_dropped_consumer_stops_holding_its_slots(table):
    table.attach(A, 0)
    table.attach(B, 0)
    fill(table, 2)
    table.announcements()
    for seq in (0, 1):
        table.release(A, seq)
    table.detach(B)  # dropped while holding both
    assert table.reclaim() == 2


def test_releases_of_strangers_and_unknown_seqs_are_ignored(table):
    table.attach(A, 0)
    fill(table, 1)
    table.announcements()
    table.release(b"stranger", 0)
    table.release(A, 99)
    assert table.reclaim() == 0
    assert table.consumers[A].held == {0}


def test_a_replica_group_holds_its_batches_until_every_replica_attached(table):
    table.attach(A, 0, replicas=2, wait_s=60)
    fill(table, 2)
    table.announcements()
    table.release(A, 0)
    table.release(A, 1)
    assert table.reclaim() == 0  # the second replica will want batch 0
    assert table.replicas()["awaited"] == 1
    table.attach(B, 0, replicas=2, wait_s=60)
    assert table.replicas() == {"expected": 2, "attached": 2, "awaited": 0, "lag_batches": 2}
    table.announcements()
    table.release(B, 0)
    assert table.reclaim() == 1


def test_a_replica_group_no_one_joins_stops_holding_after_its_wait(table):
    table.attach(A, 0, replicas=3, wait_s=0)
    fill(table, 1)
    table.announcements()
    table.release(A, 0)
    assert table.reclaim() == 0
    (gone,) = table.expire(time.monotonic() + 1)
    assert (gone.seq, gone.missing, gone.expected) == (0, 2, 3)
    assert table.reclaim() == 1
