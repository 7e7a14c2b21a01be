"""load_state_dict(state, skip_batches=N): the first batch is batch N of the continuation,
on every rank, for both packings; the skipped batches never reach a ring slot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_batch_equals

from tokenfeed.common.errors import ConfigError, StateMismatchError

B, T = 2, 64


def continuation(daemon, state, n, **kwargs):
    """The first n batches of a feed resumed at `state`, as arrays."""
    with daemon.feed(B, T, **kwargs) as feed:
        feed.load_state_dict(state)
        return [tuple(t.numpy().copy() for t in next(feed)) for _ in range(n)]


def saved_state(daemon, k, **kwargs):
    with daemon.feed(B, T, **kwargs) as feed:
        for _ in range(k):
            next(feed)
        return json.loads(json.dumps(feed.state_dict()))


@pytest.mark.parametrize("packing,ranks", [
    ("concat", (0, 1, 2)), ("bestfit", (1,)),
    pytest.param("bestfit", (0, 1, 2), marks=pytest.mark.slow)])
def test_first_batch_after_a_skip_is_batch_n_of_the_continuation_on_every_rank(
        start_daemon, packing, ranks):
    daemon = start_daemon(workers=2)
    skips = [1, 7, 100]
    for rank in ranks:
        where = {"rank": rank, "world_size": 3, "packing": packing}
        state = saved_state(daemon, 5, **where)
        want = continuation(daemon, state, max(skips) + 3, **where)
        for n in skips:
            with daemon.feed(B, T, **where) as feed:
                feed.load_state_dict(state, skip_batches=n)
                for i in range(2):
                    x, y = next(feed)
                    np.testing.assert_array_equal(x.numpy(), want[n + i][0],
                                                  err_msg=f"rank {rank}, skip {n}, batch {i}")
                    np.testing.assert_array_equal(y.numpy(), want[n + i][1])
                after = json.loads(json.dumps(feed.state_dict()))
            assert "skip_batches" not in after
            # the state after the skip resumes like any other: batch n + 2 next
            np.testing.assert_array_equal(continuation(daemon, after, 1, **where)[0][0],
                                          want[n + 2][0], err_msg=f"rank {rank}, skip {n}")


def test_a_skip_of_a_thousand_batches_crosses_epochs_exactly(start_daemon, oracle):
    n = 1000  # ~130k tokens: several epochs of the test corpus's train split
    want = oracle(batch_size=B, seq_len=T, n=n + 1)
    daemon = start_daemon(workers=2)
    with daemon.feed(B, T) as feed:
        start = json.loads(json.dumps(feed.state_dict()))
    with daemon.feed(B, T) as feed:
        feed.load_state_dict(start, skip_batches=n)
        assert_batch_equals(next(feed), want[n], f"batch {n}, after skipping {n}")
        assert feed.epoch >= 2


def test_a_state_saved_before_the_skip_was_served_keeps_it(start_daemon):
    daemon = start_daemon(workers=1)
    state = saved_state(daemon, 3)
    want = continuation(daemon, state, 12)
    with daemon.feed(B, T) as feed:
        feed.load_state_dict(state, skip_batches=9)
        pending = json.loads(json.dumps(feed.state_dict()))
    assert pending["skip_batches"] == 9 and pending["cursor"] == state["cursor"]
    with daemon.feed(B, T) as feed:
        feed.load_state_dict(pending, skip_batches=1)  # skips add up: 10
        np.testing.assert_array_equal(next(feed)[0].numpy(), want[10][0])


def test_bad_skips_are_clear_errors(start_daemon):
    daemon = start_daemon(workers=1)
    state = saved_state(daemon, 1)
    with daemon.feed(B, T) as feed:
        for bad in (-1, 1.5, True, 1 << 40):
            with pytest.raises(ConfigError, match="skip_batches"):
                feed.load_state_dict(state, skip_batches=bad)
        with pytest.raises(StateMismatchError, match="skip_batches"):
            feed.load_state_dict({**state, "skip_batches": "3"})
    with daemon.feed(B, T, rank=0, world_size=2) as feed:
        job = [saved_state(daemon, 1, rank=r, world_size=3) for r in range(3)]
        with pytest.raises(ConfigError, match="another number of ranks"):
            feed.load_state_dict(job, skip_batches=2)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_a_skip_of_a_thousand_batches_is_exact_on_each_of_three_ranks(start_daemon, packing):
    daemon = start_daemon(workers=2)
    n = 1000
    for rank in range(3):
        where = {"rank": rank, "world_size": 3, "packing": packing}
        state = saved_state(daemon, 3, **where)
        want = continuation(daemon, state, n + 1, **where)[n]
        with daemon.feed(B, T, **where) as feed:
            feed.load_state_dict(state, skip_batches=n)
            x, y = next(feed)
        np.testing.assert_array_equal(x.numpy(), want[0], err_msg=f"rank {rank}")
        np.testing.assert_array_equal(y.numpy(), want[1], err_msg=f"rank {rank}")
