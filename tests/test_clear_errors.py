"""User-facing failures are one clear error that says what is wrong and what to do.

A trainer that does not share /dev/shm with the daemon, a state dict that is not
one, and a consumer the daemon does not know (dropped, or the daemon restarted)
each get a specific error instead of a traceback or a wrong explanation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import zmq
from conftest import wait_until

from tokenfeed.common import protocol
from tokenfeed.common.config import control_address
from tokenfeed.common.errors import (
    DaemonGoneError,
    DetachedError,
    NotSharedError,
    StateMismatchError,
)
from tokenfeed.common.ring import Ring
from tokenfeed.common.shm import segment_name


def heartbeat_reply(run_dir) -> protocol.Message:
    """What the daemon answers a heartbeat from a consumer it never attached."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_address(run_dir))
        sock.send(protocol.encode("heartbeat"))
        assert sock.poll(5000), "no reply to a heartbeat"
        return protocol.decode(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def test_unknown_consumer_of_a_daemon_younger_than_the_timeout_is_told_it_restarted(
    start_daemon
):
    daemon = start_daemon(workers=1)  # --consumer-timeout-s 15: no one can have been dropped
    reply = heartbeat_reply(daemon.run_dir)
    assert reply["op"] == "error" and reply["kind"] == "detached"
    message = reply["message"]
    assert "does not know this consumer" in message and "restarted" in message
    assert "silence" not in message, message
    assert "(up " in message and "state_dict" in message


def test_unknown_consumer_of_an_older_daemon_hears_both_causes(start_daemon):
    daemon = start_daemon("--consumer-timeout-s", "2", workers=1)
    wait_until(lambda: daemon.status()["uptime_s"] > 2.1, what="the daemon up for 2 s")
    message = heartbeat_reply(daemon.run_dir)["message"]
    assert "dropped this consumer after 2 s of silence" in message
    assert "or it restarted" in message


def test_consumer_of_a_daemon_restarted_at_once_gets_detached_saying_so(start_daemon):
    first = start_daemon(workers=1)
    feed = first.feed(2, 64, prefetch=1)
    try:
        next(feed)
        first.signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        start_daemon(workers=1, run_dir=first.run_dir)
        with pytest.raises(DaemonGoneError) as info:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                next(feed)
        assert info.type is DetachedError, f"{info.type.__name__}: {info.value}"
        assert "restarted" in str(info.value) and "silence" not in str(info.value)
    finally:
        feed.close()


@pytest.mark.parametrize("state", [{}, None, {"version": 1}, "state"])
@pytest.mark.slow
def test_load_state_dict_of_something_else_is_a_state_mismatch(start_daemon, state):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed, pytest.raises(StateMismatchError, match="state_dict"):
        feed.load_state_dict(state)


def test_load_state_dict_without_a_cursor_is_a_state_mismatch_naming_it(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        state = feed.state_dict()
        del state["cursor"]
        with pytest.raises(StateMismatchError, match="cursor"):
            feed.load_state_dict(state)


def test_ring_missing_from_this_dev_shm_is_not_shared_error_pointing_at_deploy():
    name = segment_name(f"test-{uuid.uuid4().hex}", "s0")
    with pytest.raises(NotSharedError) as info:
        Ring.attach(name)
    message = str(info.value)
    assert name in message and "/dev/shm" in message and "deploy/" in message


def _can_mount_private_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


OTHER_SHM_CONSUMER = textwrap.dedent("""
    import json, sys
    from tokenfeed.consumer import TokenFeed
    feed = TokenFeed(2, 64, run_dir=sys.argv[1], device="cpu")
    try:
        next(feed)
        print(json.dumps({"error": None}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    finally:
        feed.close()
""")


@pytest.mark.skipif(not _can_mount_private_tmpfs(),
                    reason="needs root and unshare -m to mount a private tmpfs on /dev/shm")
@pytest.mark.slow
def test_trainer_with_another_dev_shm_is_told_it_does_not_share_it(start_daemon):
    daemon = start_daemon(workers=1)
    script = "mount -t tmpfs -o size=1m tokenfeed-test /dev/shm && exec \"$0\" \"$@\""
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, sys.executable, "-c", OTHER_SHM_CONSUMER,
         str(daemon.run_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["error"] == "NotSharedError", out
    assert "does not share /dev/shm" in out["message"] and "deploy/" in out["message"]
    deadline = time.monotonic() + 10
    while daemon.status()["streams"][0]["consumers"] != 0:  # the failed attach detaches
        assert time.monotonic() < deadline, daemon.status()
        time.sleep(0.05)
