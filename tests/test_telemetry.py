"""Consumers report their stall and step seconds; the daemon checks, keeps and sums them."""

from __future__ import annotations

import time
from typing import Any

import pytest
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec
from tokenfeed.common.control import connect
from tokenfeed.common.errors import ProtocolError


def _attached_socket(daemon: Any) -> zmq.Socket[Any]:
    """A raw consumer socket attached to a train stream (B=2, T=64)."""
    sock = connect(zmq.Context.instance(), daemon.run_dir)
    spec = StreamSpec(split="train", rank=0, world_size=1, batch_size=2, seq_len=64)
    sock.send(protocol.encode("attach", spec=spec.to_dict(), start=None, expect={}))
    assert sock.poll(30_000), "no reply to attach"
    assert protocol.decode(sock.recv())["op"] == "attached"
    return sock


def _reply(sock: zmq.Socket[Any], op: str, timeout_s: float = 60.0) -> protocol.Message:
    """The next message of `op` (skipping ready and heartbeat traffic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = protocol.decode(sock.recv())
            if msg["op"] == op:
                return msg
    raise AssertionError(f"no {op!r} within {timeout_s} s")


def _consumer(daemon: Any) -> dict[str, Any]:
    (stream,) = daemon.status()["streams"]
    (consumer,) = stream["consumer_list"]
    return consumer


@pytest.mark.parametrize("value", ["1.0", -1.0, float("nan"), float("inf"), True, 2.0**60])
@pytest.mark.slow
def test_heartbeat_with_a_bad_stall_field_gets_an_error_reply_and_changes_nothing(
        start_daemon, value):
    daemon = start_daemon(workers=1)
    sock = _attached_socket(daemon)
    try:
        sock.send(protocol.encode("heartbeat", stall_s=value, step_s=1.0))
        error = _reply(sock, "error")
        assert error["kind"] == "protocol" and "stall_s" in error["message"]
        assert _consumer(daemon)["stall_s"] == 0.0
        sock.send(protocol.encode("heartbeat", stall_s=0.5, step_s=2.0))  # still attached
        deadline = time.monotonic() + 60
        while _consumer(daemon)["stall_s"] != 0.5:
            assert time.monotonic() < deadline, "a valid heartbeat after a bad one was lost"
            time.sleep(0.05)
    finally:
        sock.close(linger=0)


def test_stream_stall_seconds_only_grow_across_a_consumer_that_restarts_its_count(
        start_daemon):
    daemon = start_daemon(workers=1)
    sock = _attached_socket(daemon)
    try:
        for stall_s, step_s in [(1.0, 3.0), (2.0, 6.0), (0.5, 0.5)]:  # the last: a reset
            sock.send(protocol.encode("heartbeat", stall_s=stall_s, step_s=step_s))
        deadline = time.monotonic() + 60
        while (s := daemon.status()["streams"][0])["consumer_list"][0]["stall_s"] != 0.5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s["stall_s"] == 2.0 and s["step_s"] == 6.0  # the reset subtracted nothing
        assert s["stall_share"] == pytest.approx(0.25)
    finally:
        sock.close(linger=0)


def test_optional_seconds_names_the_field_and_the_range():
    msg = {"op": "heartbeat", "stall_s": -3}
    with pytest.raises(ProtocolError, match=r"'stall_s' = -3 .*\[0, "):
        protocol.optional_seconds(msg, "stall_s")
    assert protocol.optional_seconds({"op": "heartbeat"}, "stall_s") is None
    assert protocol.optional_seconds({"op": "heartbeat", "step_s": 2}, "step_s") == 2.0


def test_a_feed_reports_its_stall_and_step_and_status_shows_its_share(start_daemon):
    daemon = start_daemon(workers=1, slots=4)
    with daemon.feed(2, 64, prefetch=1) as feed:
        next(feed)
        for _ in range(10):  # a slow trainer: 50 ms steps, the ring keeps up
            time.sleep(0.05)
            next(feed)
        deadline = time.monotonic() + 60
        while (consumer := _consumer(daemon))["step_s"] < 0.45:
            assert time.monotonic() < deadline, consumer
            time.sleep(0.1)
        (stream,) = daemon.status()["streams"]
    assert stream["stall_s"] >= consumer["stall_s"] > 0
    assert 0 < consumer["stall_share"] < 1
    assert stream["tokens_consumed"] >= 10 * 2 * 64
    assert stream["tokens_produced"] >= stream["tokens_consumed"]
    assert stream["capacity"] == 4 and stream["epoch"] == 0
    assert 0 <= stream["epoch_progress"] < 1
    assert stream["waste_share"] == 0.0  # concat crops nothing


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_a_trainer_blocked_in_next_or_in_a_long_step_is_seen_while_it_lasts(start_daemon):
    import os
    import signal
    import threading

    from conftest import worker_pids

    daemon = start_daemon(workers=1, slots=2)
    with daemon.feed(8, 1024, prefetch=1) as feed:  # 8k tokens: several row groups a batch
        next(feed)
        (worker,) = worker_pids(daemon)
        os.kill(worker, signal.SIGSTOP)  # nothing more gets tokenized
        try:
            for _ in range(10):  # whatever the ring and read-ahead already hold
                got = threading.Thread(target=next, args=(feed,), daemon=True)
                got.start()
                got.join(timeout=2.0)
                if got.is_alive():
                    break
            assert got.is_alive(), "the feed kept returning batches with its worker stopped"
            deadline = time.monotonic() + 15
            while _consumer(daemon)["stall_s"] < 1.0:  # reported while next() still waits
                assert time.monotonic() < deadline, _consumer(daemon)
                time.sleep(0.1)
        finally:
            os.kill(worker, signal.SIGCONT)
        got.join(timeout=30)
        assert not got.is_alive()
        step_before = _consumer(daemon)["step_s"]
        deadline = time.monotonic() + 15
        while _consumer(daemon)["step_s"] < step_before + 1.0:  # a long step, no next()
            assert time.monotonic() < deadline, _consumer(daemon)
            time.sleep(0.1)
