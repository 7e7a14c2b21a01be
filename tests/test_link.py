"""The consumer link's seqlock with a deferred (CUDA-like) copy, on CPU: real ring, real sockets.

On CUDA a copy is queued and completes later; the batch may be handed out only once
the copy's event is done AND the slot still holds the announced batch. A fake
transfer whose copies complete when the test says so exercises that order without a GPU.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.errors import DetachedError
from tokenfeed.common.ring import Ring, RingLayout
from tokenfeed.common.shm import segment_name
from tokenfeed.consumer.link import Link


class DeferredTransfer:
    """Copies that complete only when `complete()` is called, like a CUDA event."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.completed = False
        self.polled = 0  # done() calls: the link is waiting on a copy in flight

    def copy(self, slot: int) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
        x = torch.from_numpy(self.ring.slots[slot][:-1].astype("int32").copy())
        return (x, x.long()), object()

    def done(self, token: Any) -> bool:
        self.polled += 1
        return self.completed

    def bind_thread(self) -> None:
        pass

    def close(self) -> None:
        pass


def a_ring(slots: int) -> Iterator[Ring]:
    """A ring of `slots` slots of 9 tokens, its segment unlinked afterwards."""
    layout = RingLayout(slot_count=slots, slot_tokens=9, itemsize=4)
    r = Ring.create(segment_name(f"test-{uuid.uuid4().hex[:8]}", "s0"), layout)
    try:
        yield r
    finally:
        r.close()
        r.segment.unlink()


@pytest.fixture
def ring() -> Iterator[Ring]:
    yield from a_ring(2)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    address = f"inproc://link-{uuid.uuid4().hex}"
    daemon_side, feed_side = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    daemon_side.bind(address)
    feed_side.connect(address)
    try:
        yield daemon_side, feed_side
    finally:
        daemon_side.close(linger=0)
        feed_side.close(linger=0)
        ctx.term()


def start_link(ring: Ring, sock: zmq.Socket, transfer: DeferredTransfer) -> Link:
    link = Link(sock, ring, 0, 0, transfer, prefetch=2, run_dir="/nowhere")  # type: ignore[arg-type]
    link.start()
    return link


def announce(daemon_side: zmq.Socket, ring: Ring, slot: int, seq: int) -> None:
    ring.invalidate(slot)
    ring.slots[slot][:] = seq
    ring.publish(slot, seq, ring.layout.slot_tokens)
    daemon_side.send(protocol.encode("ready", stream=0, slot=slot, seq=seq, cursor={}))


def wait_for(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def running(ring, pair) -> Iterator[tuple[zmq.Socket, DeferredTransfer, Link]]:
    """A link thread on the ring with a deferred transfer, the daemon's socket, stopped after."""
    daemon_side, feed_side = pair
    transfer = DeferredTransfer(ring)
    link = start_link(ring, feed_side, transfer)
    try:
        yield daemon_side, transfer, link
    finally:
        link.stop()
        link.join(timeout=5)


def test_a_completed_copy_of_an_intact_slot_is_handed_out(ring, running):
    daemon_side, transfer, link = running
    announce(daemon_side, ring, 0, 0)
    wait_for(lambda: transfer.polled >= 2)  # the copy started and was found not done
    assert link.batches.empty()  # the copy is still in flight
    transfer.completed = True
    batch = link.batches.get(timeout=5)
    assert batch.seq == 0 and link.error is None


def test_a_slot_rewritten_before_the_copy_completed_is_discarded_with_detached(ring, running):
    daemon_side, transfer, link = running
    announce(daemon_side, ring, 0, 0)
    wait_for(lambda: transfer.polled >= 2)  # the copy started and was found not done
    ring.invalidate(0)  # the daemon dropped this consumer and refills the slot
    transfer.completed = True
    wait_for(lambda: not link.is_alive())
    assert isinstance(link.error, DetachedError)
    assert link.batches.empty(), "a torn batch was handed out"


def test_an_announcement_of_a_slot_outside_the_ring_is_a_protocol_error(ring, pair):
    daemon_side, feed_side = pair
    link = start_link(ring, feed_side, DeferredTransfer(ring))
    try:
        daemon_side.send(protocol.encode("ready", stream=0, slot=7, seq=0, cursor={}))
        wait_for(lambda: not link.is_alive())
        assert "slot 7" in str(link.error)
    finally:
        link.stop()
        link.join(timeout=5)


# -- the CPU output pool ---------------------------------------------------------------


def test_a_batch_the_caller_holds_is_never_reused():
    from tokenfeed.consumer.transfer import BatchPool

    pool = BatchPool(2, 3)
    held = pool.take()
    held[0].fill_(7)
    for _ in range(20):
        x, y = pool.take()
        assert x is not held[0] and y is not held[1]
        x.fill_(0)
    assert bool((held[0] == 7).all())


def test_a_view_of_a_dropped_batch_keeps_it_from_reuse():
    from tokenfeed.consumer.transfer import BatchPool

    pool = BatchPool(2, 3)
    x, _ = pool.take()
    row = x[0]  # e.g. kept by autograd or a logger
    first = x.data_ptr()
    del x, _
    assert pool.take()[0].data_ptr() != first
    del row
    assert any(p[0].data_ptr() == first for p in pool.pairs)
    reused = pool.take()  # the first pair is free again
    assert reused[0].data_ptr() in {p[0].data_ptr() for p in pool.pairs}


def test_released_batches_are_reused_so_memory_stays_flat():
    from tokenfeed.consumer.transfer import POOL_PAIRS, BatchPool

    pool = BatchPool(32, 2048)
    seen = set()
    for _ in range(200):
        x, _y = pool.take()  # the previous batch is dropped on the next iteration
        seen.add(x.data_ptr())
    assert len(seen) <= 2 and len(pool.pairs) <= POOL_PAIRS


# -- batched control traffic (a daemon that answered `batch: true`) --------------------


@pytest.fixture
def ring4() -> Iterator[Ring]:
    yield from a_ring(4)


def fill(ring: Ring, slot: int, seq: int) -> list[Any]:
    ring.invalidate(slot)
    ring.slots[slot][:] = seq
    ring.publish(slot, seq, ring.layout.slot_tokens)
    return [slot, seq, {"seq": seq}]


def next_releases(daemon_side: zmq.Socket, timeout_s: float = 5.0) -> tuple[int, tuple[int, ...]]:
    """The next RELEASES frame the link sent (heartbeats skipped), within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while daemon_side.poll(max(int((deadline - time.monotonic()) * 1000), 1)):
        frame = daemon_side.recv()
        if protocol.is_releases(frame):
            return protocol.decode_releases(frame)
        assert protocol.decode(frame)["op"] == "heartbeat"
        assert time.monotonic() < deadline
    raise AssertionError("no releases frame within the deadline")


def test_a_batched_link_takes_a_readies_frame_and_releases_each_taken_batch_at_once(
        ring4, pair, monkeypatch):
    monkeypatch.setattr(protocol, "HEARTBEAT_INTERVAL_S", 60.0)  # no beat sends anything
    daemon_side, feed_side = pair
    transfer = DeferredTransfer(ring4)
    transfer.completed = True
    link = Link(feed_side, ring4, 0, 0, transfer, prefetch=2, run_dir="/nowhere",  # type: ignore[arg-type]
                batch=True)
    link.start()
    try:
        daemon_side.send(protocol.encode("readies", stream=0,
                                         batches=[fill(ring4, s, s) for s in range(4)]))
        batch = link.batches.get(timeout=5)
        assert batch.seq == 0 and batch.cursor == {"seq": 0}
        link.taken(0)  # 3 of 4 still filled ahead: the release goes all the same
        assert next_releases(daemon_side) == (0, (0,))
        daemon_side.send(protocol.encode("readies", stream=0,
                                         batches=[fill(ring4, 0, 4)]))
        released: list[int] = []
        for seq in range(1, 5):
            assert link.batches.get(timeout=5).seq == seq
            link.taken(seq)
        while len(released) < 4:
            released += next_releases(daemon_side)[1]
        assert released == [1, 2, 3, 4] and link.error is None
    finally:
        link.stop()
        link.join(timeout=5)


@pytest.mark.parametrize("batches", [[], [[0, 0]], [[0, 0, {}, 1]], "x", [7]])
def test_a_malformed_readies_frame_is_a_protocol_error(ring4, pair, batches):
    daemon_side, feed_side = pair
    link = Link(feed_side, ring4, 0, 0, DeferredTransfer(ring4), prefetch=2,  # type: ignore[arg-type]
                run_dir="/nowhere", batch=True)
    link.start()
    try:
        daemon_side.send(protocol.encode("readies", stream=0, batches=batches))
        wait_for(lambda: not link.is_alive())
        assert "readies" in str(link.error)
    finally:
        link.stop()
        link.join(timeout=5)


def test_a_link_to_a_daemon_that_does_not_batch_releases_each_batch_in_its_own_message(
        ring4, pair):
    daemon_side, feed_side = pair  # a daemon that did not answer `batch: true` (0.2.0)
    transfer = DeferredTransfer(ring4)
    transfer.completed = True
    link = Link(feed_side, ring4, 0, 0, transfer, prefetch=2, run_dir="/nowhere")  # type: ignore[arg-type]
    link.start()
    try:
        for s in range(4):
            fill(ring4, s, s)
            daemon_side.send(protocol.encode("ready", stream=0, slot=s, seq=s, cursor={}))
        released = []
        for seq in range(2):
            assert link.batches.get(timeout=5).seq == seq
            link.taken(seq)
            while True:  # heartbeats skipped
                assert daemon_side.poll(5000)
                msg = protocol.decode(daemon_side.recv())
                if msg["op"] == "release":
                    released.append(msg["seq"])
                    break
        assert released == [0, 1] and link.error is None
    finally:
        link.stop()
        link.join(timeout=5)
