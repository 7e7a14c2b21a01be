"""A stream's scheduling and packing bookkeeping, without processes: a real ring, fake units."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.ring import Ring, RingLayout
from tokenfeed.common.shm import segment_name
from tokenfeed.producer.dataset import RowGroupRef, SplitPlan
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.stream import Stream

SPEC = StreamSpec(batch_size=1, seq_len=63)


@pytest.fixture
def stream() -> Iterator[Stream]:
    layout = RingLayout(slot_count=4, slot_tokens=SPEC.window_tokens, itemsize=4)
    ring = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    plan = SplitPlan("train", ("a.parquet",), tuple(RowGroupRef("a.parquet", i) for i in range(6)))
    try:
        yield Stream(0, SPEC, plan, ring, "text", None)
    finally:
        ring.close()
        ring.segment.unlink()


def result_for(stream: Stream, unit: int, n_tokens: int) -> Result:
    """Unit `unit`'s tokens: unit*1000, unit*1000+1, ... (one document)."""
    tokens = np.arange(unit * 1000, unit * 1000 + n_tokens, dtype=np.uint32)
    task = Task(stream.sid, unit, "a.parquet", unit, "text")
    return Result(task, tokens, np.array([0], dtype=np.int64), 0)


def test_lost_head_unit_is_rescheduled_although_later_units_finished(stream):
    tasks = [stream.next_task() for _ in range(3)]
    assert [t.unit for t in tasks] == [0, 1, 2]
    for unit in (1, 2):  # plenty of tokens, but unusable until unit 0 is back
        stream.on_result(result_for(stream, unit, 10 * SPEC.window_tokens))
    stream.on_failure(0, "worker died")
    assert stream.wants_work(max_inflight=4)
    assert stream.next_task().unit == 0


def test_duplicate_result_of_a_rerun_unit_is_ignored(stream):
    stream.next_task()
    stream.on_result(result_for(stream, 0, 200))
    stream.pack()
    stream.on_result(result_for(stream, 0, 200))
    assert 0 not in stream.results


def test_unit_failing_three_times_fails_the_stream_with_its_reason(stream):
    for _ in range(3):
        unit = stream.next_task().unit
        assert unit == 0
        stream.on_failure(unit, "a.parquet row group 0: boom")
    assert stream.error is not None and "boom" in stream.error
    assert not stream.wants_work(max_inflight=4)


def test_windows_fill_free_slots_in_order_with_cursors(stream):
    for unit in range(2):
        stream.next_task()
        stream.on_result(result_for(stream, unit, 100))
    stream.pack()
    assert stream.depth == 3  # 200 tokens -> three 64-token windows
    assert [stream.slots[stream.by_seq[s]].after["unit"] for s in range(3)] == [0, 1, 1]
    np.testing.assert_array_equal(stream.ring.slots[stream.by_seq[1]][:36], np.arange(64, 100))
