"""Row groups split into tasks of a few documents: batches, resume, shuffle and best-fit stay exact.

`--task-kib 1` splits every row group of the test corpus (~10 KB each) into tasks of
about one document, so parts of one row group run on different workers, finish out
of order and are joined before packing; what a consumer receives must not change.
"""

from __future__ import annotations

import json

import pytest
from conftest import assert_batch_equals, drain_all_ranks
from test_bestfit import assert_rows_equal, bestfit_oracle  # noqa: F401 (fixture)
from test_shuffle import SEED, shuffled_oracle  # noqa: F401 (fixture)

SPLIT = ("--task-kib", "1")


def test_row_groups_run_as_several_tasks(start_daemon):
    daemon = start_daemon(*SPLIT, workers=2)
    with daemon.feed(4, 256) as feed:
        for _ in range(20):
            next(feed)
        status = daemon.status()
    (stream,) = status["streams"]
    assert stream["tasks_done"] >= 2 * stream["units_done"] > 0
    assert status["workers"]["tasks_done"] >= stream["tasks_done"]
    assert status["workers"]["tokenize_s"] > 0


@pytest.mark.parametrize("workers", [2, 3])
def test_split_row_groups_match_the_oracle_on_every_rank(start_daemon, oracle, workers):
    daemon = start_daemon(*SPLIT, workers=workers)
    b, t, n, w = 2, 128, 30, 3
    got = drain_all_ranks(daemon, b, t, w, n)
    for r in range(w):
        want = oracle(rank=r, world_size=w, batch_size=b, seq_len=t, n=n)
        for k in range(n):
            assert_batch_equals(got[r][k], want[k], f"rank {r} batch {k}")


def test_resume_with_split_row_groups_continues_bit_identically(start_daemon, oracle):
    b, t, n, k = 4, 256, 45, 23  # ~17 batches an epoch: the resume crosses into epoch 1
    want = oracle(batch_size=b, seq_len=t, n=n)
    first = start_daemon(*SPLIT, workers=3)
    with first.feed(b, t) as feed:
        for i in range(k):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
        state = json.loads(json.dumps(feed.state_dict()))
    assert first.stop() == 0
    second = start_daemon(*SPLIT, workers=2)  # another pool size splits the same way
    with second.feed(b, t) as feed:
        feed.load_state_dict(state)
        for i in range(k, n):
            assert_batch_equals(next(feed), want[i], f"resumed batch {i}")


def test_resume_across_task_sizes_is_exact(start_daemon, oracle):
    """The split is not part of a position: a state resumes under any --task-kib."""
    b, t, n, k = 4, 256, 30, 9
    want = oracle(batch_size=b, seq_len=t, n=n)
    first = start_daemon(workers=2)  # whole row groups
    with first.feed(b, t) as feed:
        for _ in range(k):
            next(feed)
        state = feed.state_dict()
    assert first.stop() == 0
    second = start_daemon(*SPLIT, workers=2)
    with second.feed(b, t) as feed:
        feed.load_state_dict(state)
        for i in range(k, n):
            assert_batch_equals(next(feed), want[i], f"resumed batch {i}")


def test_shuffled_split_row_groups_resume_bit_identically(start_daemon, shuffled_oracle):  # noqa: F811
    b, t, first, n = 4, 256, 10, 30
    want = shuffled_oracle(batch_size=b, seq_len=t, n=n)
    daemon = start_daemon(*SPLIT, workers=3)
    with daemon.feed(b, t, shuffle_seed=SEED, prefetch=4) as feed:
        for k in range(first):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        state = json.loads(json.dumps(feed.state_dict()))
    daemon.stop()
    again = start_daemon(*SPLIT, workers=2)
    with again.feed(b, t, shuffle_seed=SEED) as resumed:
        resumed.load_state_dict(state)
        for k in range(first, n):
            assert_batch_equals(next(resumed), want[k], f"resumed batch {k}")
        assert resumed.epoch >= 1


@pytest.mark.parametrize("shuffle_seed", [None, pytest.param(7, marks=pytest.mark.slow)])
def test_bestfit_with_split_row_groups_resumes_bit_identically(
    start_daemon, bestfit_oracle, shuffle_seed  # noqa: F811
):
    b, t, first, n = 4, 128, 6, 40
    want = bestfit_oracle(batch_size=b, seq_len=t, n=n, shuffle_seed=shuffle_seed)
    daemon = start_daemon(*SPLIT, workers=3)
    with daemon.feed(b, t, packing="bestfit", shuffle_seed=shuffle_seed, prefetch=4) as feed:
        for k in range(first):
            assert_rows_equal(next(feed), want[k], f"batch {k}")
        state = json.loads(json.dumps(feed.state_dict()))
    daemon.stop()
    again = start_daemon(*SPLIT, workers=2)
    with again.feed(b, t, packing="bestfit", shuffle_seed=shuffle_seed) as resumed:
        resumed.load_state_dict(state)
        for k in range(first, n):
            assert_rows_equal(next(resumed), want[k], f"resumed batch {k}")
