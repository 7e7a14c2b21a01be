"""Crashes and shutdowns: no hang, no corrupt batch, no shared memory left after the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from conftest import (
    Daemon,
    assert_batch_equals,
    parent_of,
    pid_alive,
    wait_until,
    worker_pids,
)

from tokenfeed.common import protocol
from tokenfeed.common.config import control_address
from tokenfeed.common.errors import DaemonGoneError, StateMismatchError


@pytest.fixture(scope="module")
def shared_daemon(corpus):
    """One daemon for tests that only poke its control socket."""
    daemon = Daemon(corpus, workers=1, slots=2)
    yield daemon
    assert daemon.stop() == 0
    assert daemon.segments() == []
    daemon.cleanup()


def drain_until_error(feed, limit_s: float) -> tuple[type[BaseException], float]:
    start = time.monotonic()
    with pytest.raises(DaemonGoneError) as info:
        while time.monotonic() - start < limit_s:
            next(feed)
    return info.type, time.monotonic() - start


def test_sigterm_makes_every_attached_consumer_raise_within_10_s(start_daemon):
    daemon = start_daemon(workers=2)
    feeds = [daemon.feed(2, 64, rank=r, world_size=2) for r in range(2)]
    for f in feeds:
        next(f)
    pids = worker_pids(daemon)
    daemon.signal(signal.SIGTERM)
    for f in feeds:
        _, elapsed = drain_until_error(f, limit_s=10.0)
        assert elapsed < 10.0
        f.close()
    assert daemon.proc.wait(timeout=30) == 0
    assert daemon.segments() == []
    assert not (daemon.run_dir / "control").exists()
    assert not any(pid_alive(p) for p in pids)


def test_shutdown_error_tells_how_to_resume(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        daemon.signal(signal.SIGTERM)
        with pytest.raises(DaemonGoneError, match="state_dict"):
            for _ in range(10_000):
                next(feed)


@pytest.mark.slow
def test_killed_daemon_is_noticed_by_consumer_and_cleaned_by_next_start(start_daemon, corpus):
    daemon = start_daemon(workers=2)
    feed = daemon.feed(2, 64)
    next(feed)
    pids = worker_pids(daemon)
    left = daemon.segments()
    assert left, "a running stream owns a ring segment"
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    _, elapsed = drain_until_error(feed, limit_s=10.0)
    assert elapsed < 10.0
    feed.close()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # orphaned workers notice their parent is gone within a second
    assert not any(pid_alive(p) for p in pids)
    # The segments outlive the crash until the next daemon starts (on this run dir, or any
    # daemon of this user on the node: it removes segments of provably dead daemons).
    assert set(daemon.segments()) <= set(left)
    successor = start_daemon(workers=1, run_dir=daemon.run_dir)
    assert daemon.segments() == []
    assert successor.status()["streams"] == []


def test_worker_killed_mid_stream_is_respawned_and_batches_stay_exact(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t, n = 2, 128, 60
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, prefetch=1) as feed:
        for k in range(n):
            if k in (5, 25):
                os.kill(worker_pids(daemon)[0], signal.SIGKILL)
            if k == 40:  # the fork server: every worker follows it, a new one forks more
                os.kill(parent_of(worker_pids(daemon)[0]), signal.SIGKILL)
            assert_batch_equals(next(feed), want[k], f"batch {k}")
    wait_until(lambda: daemon.status()["workers"]["alive"] == 2, what="2 workers again")


def test_second_daemon_on_the_same_run_dir_is_refused(start_daemon, corpus):
    daemon = start_daemon(workers=1)
    result = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(corpus),
         "--run-dir", str(daemon.run_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "already serves" in result.stderr and "Traceback" not in result.stderr
    assert daemon.status()["daemon_id"] == daemon.daemon_id


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1}),
        msgpack.packb({"v": 99, "op": "ping"}),
        msgpack.packb({"v": 1, "op": "no-such-op"}),
        msgpack.packb({"v": 1, "op": "attach", "spec": "not a map"}),
        msgpack.packb({"v": 1, "op": "attach", "spec": {"batch_size": 0, "seq_len": 8}}),
        msgpack.packb({"v": 1, "op": "release", "stream": "x", "seq": 1}),
        msgpack.packb({"v": 1, "op": "scale", "workers": 0}),
        msgpack.packb({"v": 1, "op": "attach", "spec": {"batch_size": 2, "seq_len": 8},
                       "start": {"unit": 2**62, "offset": 0}}),
        msgpack.packb({"v": 1, "op": "attach", "spec": {"batch_size": 2, "seq_len": 8,
                                                          "world_size": 2**40}}),
        msgpack.packb({"v": 1, "op": "heartbeat"}),  # from a consumer the daemon never knew
        b"x" * (protocol.MAX_FRAME_BYTES + 1),
        protocol.encode_releases(0, [0, 1]),  # well formed, from a consumer never attached
        protocol.RELEASES_MAGIC + b"\0" * 7,  # a header cut short
        protocol.encode_releases(0, [0, 1])[:-3],  # fewer seqs than its count
    ],
)
def test_malformed_control_message_gets_error_reply_and_daemon_survives(shared_daemon, frame):
    daemon = shared_daemon
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_address(daemon.run_dir))
        sock.send(frame)
        assert sock.poll(5000), "no reply to a malformed message"
        reply = protocol.decode(sock.recv())
        assert reply["op"] == "error" and reply["message"]
    finally:
        sock.close(linger=0)
        ctx.term()
    assert daemon.status()["daemon_id"] == daemon.daemon_id


def test_state_from_another_dataset_is_refused(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        state = feed.state_dict()
    state["fingerprint"] = "0000000000000000"
    with daemon.feed(2, 64) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match="fingerprint"):
            next(feed)


def test_state_for_another_batch_shape_is_refused(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        state = feed.state_dict()
    with daemon.feed(4, 64) as feed, pytest.raises(StateMismatchError, match="batch_size"):
        feed.load_state_dict(state)


@pytest.mark.slow
def test_killed_consumer_is_dropped_and_its_slots_reclaimed_for_the_others(
    start_daemon, oracle, tmp_path
):
    daemon = start_daemon("--consumer-timeout-s", "2", workers=2, slots=4)
    b, t, n = 2, 64, 40
    want = oracle(batch_size=b, seq_len=t, n=n)
    survivor = daemon.feed(b, t)
    try:
        assert_batch_equals(next(survivor), want[0], "batch 0")
        # A second consumer joins the same stream at the survivor's position, in its own
        # process, takes one batch, then holds its read-ahead slots until it is killed.
        state = tmp_path / "state.json"
        state.write_text(json.dumps(survivor.state_dict()))
        victim = subprocess.Popen(
            [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(daemon.run_dir),
             "--batch-size", str(b), "--seq-len", str(t), "--batches", "1000",
             "--step-s", "60", "--state", str(state)],
        )
        deadline = time.monotonic() + 30
        while daemon.status()["streams"][0]["consumers"] < 2:
            assert time.monotonic() < deadline, "the second consumer never joined the stream"
            time.sleep(0.05)
        assert len(daemon.status()["streams"]) == 1
        victim.kill()
        victim.wait()
        for k in range(1, n):
            assert_batch_equals(next(survivor), want[k], f"batch {k}")
        deadline = time.monotonic() + 10
        while (s := daemon.status()["streams"][0])["consumers"] != 1 or s["depth"] < 4:
            assert time.monotonic() < deadline, f"victim not dropped or slots not reclaimed: {s}"
            time.sleep(0.05)
    finally:
        survivor.close()


def test_consumer_with_reconnect_continues_exactly_across_a_daemon_restart(start_daemon, oracle):
    b, t, n = 2, 128, 40
    want = oracle(batch_size=b, seq_len=t, n=n)
    first = start_daemon(workers=2)
    with first.feed(b, t, reconnect_s=60) as feed:
        for k in range(12):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        assert first.stop() == 0  # e.g. systemd restarting the node daemon
        start_daemon(workers=1, run_dir=first.run_dir)
        for k in range(12, n):
            assert_batch_equals(next(feed), want[k], f"batch {k} after the restart")


def test_feed_with_reconnect_waits_for_a_daemon_that_starts_later(corpus, oracle):
    import tempfile
    import threading
    from pathlib import Path

    from tokenfeed.consumer import TokenFeed

    run_dir = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    started: list[Daemon] = []
    later = threading.Timer(1.5, lambda: started.append(Daemon(corpus, run_dir=run_dir)))
    later.start()
    try:
        with TokenFeed(2, 64, run_dir=run_dir, device="cpu", reconnect_s=60) as feed:
            assert_batch_equals(next(feed), oracle(batch_size=2, seq_len=64, n=1)[0], "batch 0")
    finally:
        later.join()
        for d in started:
            assert d.stop() == 0
            d.cleanup()


def test_feed_without_daemon_fails_fast_with_how_to_start_one(tmp_path):
    from tokenfeed.common.errors import DaemonUnavailableError
    from tokenfeed.consumer import TokenFeed

    start = time.monotonic()
    with pytest.raises(DaemonUnavailableError, match="tokenfeed serve"):
        TokenFeed(2, 64, run_dir=tmp_path, device="cpu")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_consumer_dropped_for_silence_is_told_so_not_that_the_daemon_died(start_daemon):
    daemon = start_daemon("--consumer-timeout-s", "2", workers=1)
    consumer = subprocess.Popen(
        [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(daemon.run_dir),
         "--batch-size", "2", "--seq-len", "64", "--batches", "100000", "--step-s", "0.01"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not daemon.status()["streams"] or not daemon.status()["streams"][0]["batches"]:
            assert time.monotonic() < deadline, "the consumer never attached"
            time.sleep(0.05)
        consumer.send_signal(signal.SIGSTOP)  # a stopped (or swapped-out) trainer
        wait_until(lambda: not any(s["consumers"] for s in daemon.status()["streams"]),
                   what="the daemon dropping the silent consumer")
        consumer.send_signal(signal.SIGCONT)
        _, err = consumer.communicate(timeout=30)
    finally:
        consumer.kill()
        consumer.wait()
    assert consumer.returncode == 1
    assert "dropped this consumer" in err and "Traceback" not in err
    assert daemon.status()["daemon_id"] == daemon.daemon_id


def test_workers_that_keep_dying_at_start_fail_streams_instead_of_respawning_forever(
    start_daemon, tmp_path, encoding
):
    import shutil

    from tokenfeed.common.errors import StreamFailedError
    from tokenfeed.producer.tokenizer import save_tokenizer_dir

    save_tokenizer_dir(encoding, tmp_path / "tok", bos="<|endoftext|>")
    daemon = start_daemon("--tokenizer", str(tmp_path / "tok"), workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)  # a batch: the worker (and the fork server) loaded the tokenizer
    shutil.rmtree(tmp_path / "tok")  # every new worker now fails to load the tokenizer
    # ...once the fork server that preloaded it is gone too (it is restarted, and finds
    # no tokenizer to preload): kill both.
    worker = worker_pids(daemon)[0]
    os.kill(parent_of(worker), signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 60
    with daemon.feed(2, 64) as feed, pytest.raises(StreamFailedError, match="died before"):
        while time.monotonic() < deadline:
            next(feed)
    assert daemon.status()["workers"]["alive"] == 0
