"""Exact resume: state_dict() after k batches continues bit-identically, warm or cold."""

from __future__ import annotations

import json

import pytest
from conftest import assert_batch_equals, wait_until


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_resume_on_a_fresh_daemon_continues_bit_identically_across_epochs(
    start_daemon, oracle, workers
):
    b, t, n, k = 4, 256, 50, 23  # the train split is ~17k tokens (~17 batches): 23+ is epoch 1
    want = oracle(batch_size=b, seq_len=t, n=n)
    first = start_daemon(workers=workers)
    with first.feed(b, t) as feed:
        for i in range(k):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
        state = json.loads(json.dumps(feed.state_dict()))  # what a checkpoint stores
    assert first.stop() == 0
    second = start_daemon(workers=workers)
    with second.feed(b, t) as feed:
        feed.load_state_dict(state)
        epochs = set()
        for i in range(k, n):
            assert_batch_equals(next(feed), want[i], f"resumed batch {i}")
            epochs.add(feed.epoch)
    assert len(epochs) > 1 or min(epochs) >= 1


def test_resume_of_each_rank_of_three(start_daemon, oracle):
    b, t, n, k = 2, 128, 30, 11
    daemon = start_daemon(workers=2)
    states = []
    for rank in range(3):
        with daemon.feed(b, t, rank=rank, world_size=3) as feed:
            for _ in range(k):
                next(feed)
            states.append(feed.state_dict())
    for rank in range(3):
        want = oracle(rank=rank, world_size=3, batch_size=b, seq_len=t, n=n)
        with daemon.feed(b, t, rank=rank, world_size=3) as feed:
            feed.load_state_dict(states[rank])
            for i in range(k, n):
                assert_batch_equals(next(feed), want[i], f"rank {rank} batch {i}")


def test_state_dict_is_small_and_json_serialisable(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        encoded = json.dumps(feed.state_dict())
    assert len(encoded) < 64 * 1024


def test_warm_reattach_takes_first_batch_from_the_filled_ring(start_daemon, oracle):
    b, t, n, k = 4, 256, 20, 5
    want = oracle(batch_size=b, seq_len=t, n=n)
    daemon = start_daemon(workers=2, slots=8)
    with daemon.feed(b, t) as feed:
        for _ in range(k):
            next(feed)
        state = feed.state_dict()
    # The lingering stream fills its ring: batch k is there before the feed re-attaches.
    (before,) = wait_until(lambda: [s for s in daemon.status()["streams"] if s["depth"] == 8],
                           what="the lingering stream's ring filling")
    with daemon.feed(b, t) as feed:
        feed.load_state_dict(state)
        assert_batch_equals(next(feed), want[k], "first batch after re-attach")
        for i in range(k + 1, n):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
        (after,) = daemon.status()["streams"]
    assert after["stream"] == before["stream"], "re-attach must reuse the warm stream"
    # How fast that first batch comes is a figure, not a test: benchmarks/reattach.py.


def test_new_val_feed_starts_from_the_beginning_each_time(start_daemon, oracle):
    want = oracle(split="val", batch_size=2, seq_len=64, n=6)
    daemon = start_daemon(workers=2)
    for _ in range(2):
        with daemon.feed(2, 64, split="val") as feed:
            got = list(feed.take(6))
        assert len(got) == 6
        for i, batch in enumerate(got):
            assert_batch_equals(batch, want[i], f"val batch {i}")
