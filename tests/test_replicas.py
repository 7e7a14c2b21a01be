"""Replicas of one data-parallel rank share one stream, however late they attach.

Tensor- or pipeline-parallel peers must see the same batches; tokenfeed tokenizes
them once and serves every replica from the same ring slots. A group of N declared
with `replicas=N` holds its batches until all N attached (or a wait runs out), and a
replica that dies is dropped from the group so the others go on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import assert_batch_equals, consumer_script, wait_until, window_digest

from tokenfeed.common.errors import ConfigError
from tokenfeed.consumer.topology import mesh_placement

B, T = 2, 64


def replica_script(replicas: int, **kwargs: object) -> str:
    return consumer_script(B, T, 0.01, replicas=replicas, **kwargs)


def digest(window: np.ndarray) -> str:
    return window_digest(window, B, T)


def test_a_replica_attaching_after_five_batches_joins_the_same_stream(start_daemon, oracle):
    daemon = start_daemon(workers=2, slots=8)
    n = 30
    want = oracle(batch_size=B, seq_len=T, n=n)
    with daemon.feed(B, T, replicas=2) as first:
        got_first = [next(first) for _ in range(5)]
        with daemon.feed(B, T, replicas=2) as second:
            got_second = []
            for _ in range(n - 5):
                got_second.append(next(second))
                got_first.append(next(first))
            got_second += [next(second) for _ in range(5)]
            streams = daemon.status()["streams"]
    assert len(streams) == 1, "the late replica got a stream (and a tokenization) of its own"
    (stream,) = streams
    assert stream["consumers"] == 2
    assert stream["replicas"]["expected"] == 2 and stream["replicas"]["awaited"] == 0
    for k in range(n):
        assert_batch_equals(got_first[k], want[k], f"first replica batch {k}")
        assert_batch_equals(got_second[k], want[k], f"second replica batch {k}")


def test_without_replicas_a_late_consumer_gets_a_stream_of_its_own(start_daemon):
    daemon = start_daemon(workers=2, slots=8)
    with daemon.feed(B, T) as first:
        for _ in range(5):
            next(first)
        window = B * T + 1  # the first five are released (and so reclaimed) first
        wait_until(lambda: daemon.status()["streams"][0]["tokens_consumed"] >= 5 * window,
                   what="the first five batches released")
        with daemon.feed(B, T) as second:
            next(second)
            assert len(daemon.status()["streams"]) == 2


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_the_first_replica_waits_for_the_group_within_the_rings_depth(start_daemon):
    daemon = start_daemon(workers=2, slots=4)
    feed = daemon.feed(B, T, replicas=2, prefetch=1, stall_timeout_s=8)
    try:
        taken = 0
        with pytest.raises(TimeoutError):
            for _ in range(10):
                next(feed)
                taken += 1
        assert taken == 4  # the ring's depth: the group's missing replica holds the rest
        (stream,) = daemon.status()["streams"]
        assert stream["replicas"]["awaited"] == 1
    finally:
        feed.close()


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_four_replicas_one_killed_the_other_three_go_on_exactly(start_daemon, oracle):
    n, kill_after = 80, 20
    want = [digest(w) for w in oracle(batch_size=B, seq_len=T, n=n)]
    daemon = start_daemon("--consumer-timeout-s", "2", workers=2, slots=4)
    procs = [subprocess.Popen([sys.executable, "-c", replica_script(4), str(daemon.run_dir),
                               str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    lines: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
               for p, out in zip(procs, lines, strict=True)]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 60
        while len(lines[0]) < kill_after:
            assert time.monotonic() < deadline, "the group never got going"
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGKILL)
        for p in procs[1:]:
            p.wait(timeout=60)  # within the consumer timeout and the ring's refills
        streams = daemon.status()["streams"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert len(streams) == 1
    for p, out in zip(procs[1:], lines[1:], strict=True):
        assert p.returncode == 0, p.stderr.read()
        assert [line.split()[0] for line in out] == [str(i) for i in range(n)]
        for line in out:
            i, d = line.split()
            assert d == want[int(i)], f"replica batch {i} differs"


# -- placement in a device mesh -------------------------------------------------------


def test_mesh_placement_of_dp_by_tp_on_one_node():
    ranks = np.arange(8).reshape(4, 2)  # dp=4, tp=2
    place = mesh_placement(ranks, ("dp", "tp"), "dp", me=5, local_world_size=8)
    assert (place.rank, place.world_size, place.replicas) == (2, 4, 2)


def test_mesh_placement_counts_only_the_replicas_on_this_node():
    ranks = np.arange(16).reshape(2, 4, 2)  # pp=2 across two nodes, dp=4, tp=2
    place = mesh_placement(ranks, ("pp", "dp", "tp"), "dp", me=11, local_world_size=8)
    assert (place.rank, place.world_size, place.replicas) == (1, 4, 2)


def test_mesh_placement_flattens_two_data_parallel_dimensions():
    ranks = np.arange(8).reshape(2, 2, 2)  # replicate=2, shard=2, tp=2
    place = mesh_placement(ranks, ("rep", "shard", "tp"), ("rep", "shard"), me=6,
                           local_world_size=8)
    assert (place.rank, place.world_size, place.replicas) == (3, 4, 2)


def test_mesh_placement_names_an_unknown_dimension():
    with pytest.raises(ConfigError, match="'data'"):
        mesh_placement(np.arange(4).reshape(2, 2), ("dp", "tp"), "data", me=0,
                       local_world_size=4)


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_a_replica_back_after_its_group_moved_on_gets_a_clear_error(start_daemon):
    daemon = start_daemon("--consumer-timeout-s", "2", workers=2, slots=4)
    paused = subprocess.Popen([sys.executable, "-c", replica_script(2, reconnect_s=30),
                               str(daemon.run_dir), "1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []  # one per batch the paused replica read
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: lines.extend(paused.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(paused.stderr), daemon=True)]
    for r in readers:
        r.start()
    try:
        with daemon.feed(B, T, replicas=2) as sibling:
            for _ in range(3):
                next(sibling)
            wait_until(lambda: lines, 60, "the paused replica attaching and reading a batch")
            paused.send_signal(signal.SIGSTOP)
            for _ in range(60):  # dropped after 2 s; the group's ring moves far past it
                next(sibling)
            paused.send_signal(signal.SIGCONT)
            paused.wait(timeout=60)
            for r in readers:
                r.join(timeout=10)
    finally:
        if paused.poll() is None:
            paused.send_signal(signal.SIGCONT)
            paused.kill()
            paused.wait()
    assert paused.returncode != 0
    assert "no longer in its group's ring" in "".join(errors)


def test_a_replica_rejoining_with_provenance_its_group_lacks_is_told_why(start_daemon):
    from tokenfeed.common.control import request

    daemon = start_daemon(workers=1)
    with daemon.feed(B, T, replicas=2) as first:  # the group's stream, without provenance
        next(first)  # attaches; the batch stays held for the second replica
        spec = {"batch_size": B, "seq_len": T, "rank": 0, "world_size": 1}
        with pytest.raises(ConfigError, match="same provenance= setting"):
            request(daemon.run_dir, "attach", expect="attached", spec=spec, replicas=2,
                    rejoin=True, provenance=True)
        assert len(daemon.status()["streams"]) == 1  # nothing was created for it
