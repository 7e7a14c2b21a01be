"""A stream's scheduling and packing bookkeeping, without processes: a real ring, fake units."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.ring import Ring, RingLayout
from tokenfeed.common.shm import segment_name
from tokenfeed.producer.cache import TokenCache
from tokenfeed.producer.dataset import RowGroupRef, SplitPlan
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.position import Position
from tokenfeed.producer.reader import Source
from tokenfeed.producer.scheduler import next_reader, schedule, wants_work
from tokenfeed.producer.stream import Stream

SPEC = StreamSpec(batch_size=1, seq_len=63)


@pytest.fixture
def stream() -> Iterator[Stream]:
    layout = RingLayout(slot_count=4, slot_tokens=SPEC.window_tokens, itemsize=4)
    ring = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    plan = SplitPlan("train", ("a.parquet",),
                     tuple(RowGroupRef("a.parquet", i, 10, 1000) for i in range(6)))
    try:
        yield Stream(0, SPEC, ring, [Source("a", plan, "text")], Position.start(SPEC))
    finally:
        ring.close()
        ring.segment.unlink()


def next_task(stream: Stream, pool_capacity: int = 1) -> Task:
    """The task the scheduler would hand out next for `stream`."""
    return stream.next_task(next_reader(stream, pool_capacity))


def result_for(stream: Stream, unit: int, n_tokens: int) -> Result:
    """Unit `unit`'s tokens: unit*1000, unit*1000+1, ... (one document)."""
    tokens = np.arange(unit * 1000, unit * 1000 + n_tokens, dtype=np.uint32)
    task = Task(stream.sid, 0, unit, 0, "a.parquet", unit, "text", (0, 10))
    return Result.of_rows(task, tokens, np.array([n_tokens], dtype=np.int64))


def test_lost_head_unit_is_rescheduled_although_later_units_finished(stream):
    tasks = [next_task(stream) for _ in range(3)]
    assert [t.unit for t in tasks] == [0, 1, 2]
    for unit in (1, 2):  # plenty of tokens, but unusable until unit 0 is back
        stream.on_result(result_for(stream, unit, 10 * SPEC.window_tokens))
    stream.on_failure(tasks[0], "worker died")
    assert wants_work(stream, 4)
    assert next_task(stream).unit == 0


def test_duplicate_result_of_a_rerun_unit_is_ignored(stream):
    next_task(stream)
    stream.on_result(result_for(stream, 0, 200))
    stream.pack()
    stream.on_result(result_for(stream, 0, 200))
    assert 0 not in stream.readers[0].results


def test_unit_failing_three_times_fails_the_stream_with_its_reason(stream):
    for _ in range(3):
        task = next_task(stream)
        assert task.unit == 0
        stream.on_failure(task, "a.parquet row group 0: boom")
    assert stream.error is not None and "boom" in stream.error
    assert not wants_work(stream, 4)


def test_windows_fill_free_slots_in_order_with_cursors(stream):
    for unit in range(2):
        next_task(stream)
        stream.on_result(result_for(stream, unit, 100))
    stream.pack()
    assert stream.depth == 3  # 200 tokens -> three 64-token windows
    assert [stream.table.slot_of(s).after["unit"] for s in range(3)] == [0, 1, 1]
    window = stream.ring.slots[stream.table.by_seq[1]]
    np.testing.assert_array_equal(window[:36], np.arange(64, 100))


@pytest.fixture
def split_stream() -> Iterator[Stream]:
    """Row groups of 10 rows and 4000 text bytes, in tasks of ~1 KiB: 4 parts each."""
    layout = RingLayout(slot_count=4, slot_tokens=SPEC.window_tokens, itemsize=4)
    ring = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    plan = SplitPlan("train", ("a.parquet",),
                     tuple(RowGroupRef("a.parquet", i, 10, 4000) for i in range(6)))
    try:
        yield Stream(0, SPEC, ring, [Source("a", plan, "text")], Position.start(SPEC),
                     task_bytes=1024)
    finally:
        ring.close()
        ring.segment.unlink()


def part_result(task: Task) -> Result:
    """Tokens unit*1000 + row*10 + k for k < 10 of each row of the part: one document a row."""
    lo, hi = task.rows
    tokens = np.concatenate([np.arange(10, dtype=np.uint32) + task.unit * 1000 + row * 10
                             for row in range(lo, hi)])
    return Result.of_rows(task, tokens, np.full(hi - lo, 10, dtype=np.int64))


def test_row_group_is_split_into_even_row_ranges_in_order(split_stream):
    tasks = [next_task(split_stream) for _ in range(5)]
    assert [(t.unit, t.part, t.rows) for t in tasks] == [
        (0, 0, (0, 2)), (0, 1, (2, 5)), (0, 2, (5, 7)), (0, 3, (7, 10)), (1, 0, (0, 2))]


def test_parts_finishing_out_of_order_pack_as_the_whole_row_group(split_stream):
    tasks = [next_task(split_stream) for _ in range(4)]
    for task in reversed(tasks[1:]):
        split_stream.on_result(part_result(task))
    split_stream.pack()
    assert split_stream.depth == 0  # part 0 is missing: nothing of the unit is packed
    split_stream.on_result(part_result(tasks[0]))
    split_stream.pack()
    assert split_stream.depth == 1  # 100 tokens: one 64-token window
    np.testing.assert_array_equal(split_stream.ring.slots[split_stream.table.by_seq[0]],
                                  np.arange(64, dtype=np.uint32) + 0)
    assert split_stream.readers[0].staged_bytes == 0


def test_a_lost_part_is_rerun_alone(split_stream):
    tasks = [next_task(split_stream) for _ in range(4)]
    for task in (tasks[0], tasks[1], tasks[3]):
        split_stream.on_result(part_result(task))
    split_stream.on_failure(tasks[2], "worker died")
    rerun = next_task(split_stream)
    assert (rerun.unit, rerun.part, rerun.rows) == (0, 2, (5, 7))
    split_stream.on_result(part_result(rerun))
    split_stream.on_result(part_result(tasks[2]))  # the lost run's late duplicate
    split_stream.pack()
    window = split_stream.ring.slots[split_stream.table.by_seq[0]]
    np.testing.assert_array_equal(window, np.arange(64, dtype=np.uint32))


def test_staged_bytes_count_finished_parts_until_packed(split_stream):
    tasks = [next_task(split_stream) for _ in range(4)]
    split_stream.on_result(part_result(tasks[3]))
    assert split_stream.readers[0].staged_bytes == 30 * 4 + 3 * 8  # tokens and document starts
    assert split_stream.staged() >= split_stream.readers[0].staged_bytes


def test_finished_parts_of_an_incomplete_unit_never_count_as_enough(split_stream):
    first, second = next_task(split_stream), next_task(split_stream)
    for task in (first, second):  # far more tokens than the ring wants, but unpackable
        tokens = np.arange(20 * SPEC.window_tokens, dtype=np.uint32)
        split_stream.on_result(Result.of_rows(task, tokens, np.array([len(tokens)])))
    assert wants_work(split_stream, 4)
    rest = next_task(split_stream)
    assert (rest.unit, rest.part) == (0, 2)


def test_a_packer_holding_plenty_wants_no_more_work_with_nothing_out(stream):
    next_task(stream)
    stream.on_result(result_for(stream, 0, 1 << 21))  # more than the read-ahead rule wants
    stream.pack()  # 4 slots filled, the rest still in the packer, no task out
    assert stream.readers[0].next_unit == stream.packer.next_unit
    assert stream.blocked_reader() is None
    assert not wants_work(stream, 4)


def test_a_starved_packer_wants_the_next_unit_whatever_the_budget(stream):
    next_task(stream)
    stream.on_result(result_for(stream, 0, SPEC.window_tokens // 2))
    stream.pack()  # half a window: packing waits for unit 1, which is not out
    assert stream.blocked_reader() is not None
    assert wants_work(stream, 4)


class NoFreeWorkers:
    """A pool whose workers are all busy: `schedule` can only serve from the cache."""

    capacity = 4

    def free(self) -> list[object]:
        return []

    def inflight(self) -> int:
        return self.capacity


def test_cached_units_are_read_ahead_only_as_far_as_the_ring_wants(tmp_path):
    """Issue 15: served from the cache, a stream took one more unit at every loop pass
    until the staging budget (1 GiB by default) was spent, whatever its ring held."""
    unit_tokens = 5 * SPEC.window_tokens
    layout = RingLayout(slot_count=4, slot_tokens=SPEC.window_tokens, itemsize=4)
    ring = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    refs = tuple(RowGroupRef("a.parquet", i, 1, 1000, "1:1") for i in range(50))
    cache = TokenCache(tmp_path, 1 << 30, "test-tokenizer", 4, "text")
    try:
        for ref in refs:
            cache.put(ref.path, ref.shard_stamp, ref.row_group,
                      np.arange(unit_tokens, dtype=np.uint32), np.array([unit_tokens]))
        cache.flush()
        source = Source("a", SplitPlan("train", ("a.parquet",), refs), "text", cache)
        stream = Stream(0, SPEC, ring, [source], Position.start(SPEC), task_bytes=1024)
        for _ in range(len(refs)):  # loop passes of a daemon whose consumer never releases
            schedule([stream], NoFreeWorkers(), budget_bytes=1 << 30)
            stream.pack()
        assert stream.depth == layout.slot_count
        # Read-ahead rule (Stream.wanted_tokens): a free slot's window plus a task per pool
        # place, here 64 + 4 * 256 tokens; a whole unit is served at a time, so one more.
        reader = stream.readers[0]
        wanted = SPEC.window_tokens + NoFreeWorkers.capacity * 1024 * reader.tokens_per_text_byte
        assert stream.staged() <= (wanted + unit_tokens) * layout.itemsize
        assert stream.units_cached <= 6
    finally:
        cache.close()
        ring.close()
        ring.segment.unlink()
