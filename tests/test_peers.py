"""Local peers cannot crash or stall the daemon: worker-socket frames, scale, attach cursors.

Any process of the user can reach `<run_dir>/control` and `<run_dir>/workers`. Each
test sends one kind of bad input that used to escape the daemon's loop (or block it),
then checks that the daemon still answers and that a consumer still reads the oracle's
batches.
"""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import zmq
from conftest import ENCODING, assert_batch_equals, wait_until

from tokenfeed.common import protocol
from tokenfeed.common.config import WORKER_SOCKET_NAME, ipc_address
from tokenfeed.common.control import request
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.config import max_workers


def raw(op: str, **fields) -> bytes:
    return msgpack.packb({"v": protocol.PROTOCOL_VERSION, "op": op, **fields})


BAD_WORKER_FRAMES = [
    [b"x", b"y", b"z"],  # three frames
    [raw("done", task=[0, 0, 0])],  # no n_tokens
    [raw("done", task=[0, 0, 0], n_tokens=1 << 40, n_docs=1, starts_offset=1 << 43, skipped=0,
         read_s=0.0, tokenize_s=0.0)],  # more bytes than any staging buffer
    [raw("grow", task=[0, 0, 0], need_bytes="a lot")],  # not an integer
    [raw("grow", task=[0, 0, 0], need_bytes=1 << 60)],  # a task it does not hold
    [raw("hello", worker=0, pid=-1)],
    [raw("failed", task=[0, 0], error="x")],
    [b"\x92\x01"],  # msgpack, not a map
]


def test_every_bad_worker_channel_frame_in_a_row_is_dropped_and_the_feed_goes_on(
    start_daemon, oracle
):
    """All of them on one daemon (the fast tier); one daemon each below (slow)."""
    send_bad_frames_while_reading(start_daemon(workers=1), oracle, BAD_WORKER_FRAMES)


@pytest.mark.slow
@pytest.mark.parametrize("frames", BAD_WORKER_FRAMES, ids=range(len(BAD_WORKER_FRAMES)))
def test_bad_worker_channel_frames_are_dropped_and_the_feed_goes_on(start_daemon, oracle, frames):
    send_bad_frames_while_reading(start_daemon(workers=1), oracle, [frames])


def send_bad_frames_while_reading(daemon, oracle, messages: list[list[bytes]]) -> None:
    want = oracle(batch_size=2, seq_len=64, n=20)
    ctx = zmq.Context()
    # As worker 0 would (the identity is taken) and as a worker that does not exist.
    socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
    socks[0].setsockopt(zmq.IDENTITY, b"w0")
    socks[1].setsockopt(zmq.IDENTITY, b"w7")
    try:
        with daemon.feed(2, 64) as feed:
            got = [next(feed) for _ in range(5)]
            dropped = daemon.status()["workers"]["dropped_messages"]
            for sock in socks:
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(ipc_address(daemon.run_dir, WORKER_SOCKET_NAME))
                for frames in messages:
                    sock.send_multipart(frames)
            # w7 is no worker of this daemon: each of its messages is dropped (and counted)
            # whatever it holds; the ROUTER turns away the second "w0", which goes on unharmed.
            wait_until(lambda: daemon.status()["workers"]["dropped_messages"]
                       >= dropped + len(messages),
                       what="the daemon dropping the stray worker's messages")
            got += [next(feed) for _ in range(15)]
        for k in range(20):
            assert_batch_equals(got[k], want[k], f"batch {k}")
        assert daemon.status()["workers"]["alive"] == 1
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def test_scale_above_the_limit_is_a_clear_error(start_daemon):
    daemon = start_daemon(workers=1)
    with pytest.raises(ConfigError, match=rf"--workers 100000 must be in \[1, {max_workers()}\]"):
        request(daemon.run_dir, "scale", workers=100000)
    assert daemon.status()["workers"]["target"] == 1


def test_scaling_to_the_limit_never_stalls_the_loop(start_daemon, oracle):
    """Status answers and batches keep coming while the pool grows to its limit and back
    (that a start never holds the loop is the next test's, without a clock)."""
    daemon = start_daemon(workers=1)
    want = oracle(batch_size=2, seq_len=64, n=30)
    with daemon.feed(2, 64) as feed:
        got = [next(feed) for _ in range(5)]
        request(daemon.run_dir, "scale", workers=max_workers())
        while len(daemon.status()["workers"]["pids"]) < max_workers():
            got.append(next(feed))
        request(daemon.run_dir, "scale", workers=1)
        while len(got) < 30:
            got.append(next(feed))
    for k, batch in enumerate(got[:30]):
        assert_batch_equals(batch, want[k], f"batch {k}")


HELD_START = """
import sys, threading, zmq
from pathlib import Path
from tokenfeed.common.config import WORKER_SOCKET_NAME, ipc_address
from tokenfeed.producer.pool import WorkerPool

ctx = zmq.Context()
pool = WorkerPool(ctx, ipc_address(Path(sys.argv[1]), WORKER_SOCKET_NAME), daemon_id="peers0",
                  tokenizer_spec=sys.argv[2], bos=None, nice=0)
gate, start = threading.Event(), pool._start
pool._start = lambda process: (gate.wait(), start(process))
try:
    pool.resize(2)
    pool.tick()  # must return with both starts still held
    stats = pool.stats()
    print(stats["alive"], len(stats["pids"]), flush=True)
finally:
    gate.set()
    pool.close()
    ctx.term()
print(len(pool.workers))
"""


def test_a_worker_start_never_holds_the_pool(tmp_path):
    """Growing the pool returns while the workers' starts are still held back: a fork (or
    a fork server that restarts, loading the tokenizer) never runs on the daemon's loop.
    In a process of its own, which takes the pool's fork server with it when it exits."""
    done = subprocess.run([sys.executable, "-c", HELD_START, str(tmp_path), ENCODING],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["2 0", "0", ""], done.stdout  # 2 held, none left


def test_attach_at_a_cursor_past_exact_integers_creates_nothing(start_daemon):
    daemon = start_daemon(workers=1)
    spec = {"batch_size": 2, "seq_len": 64, "rank": 0, "world_size": 1 << 20}
    with pytest.raises(StateMismatchError, match="largest exact position"):
        request(daemon.run_dir, "attach", expect="attached", spec=spec,
                start={"unit": (1 << 53) - 1, "offset": 0})
    status = daemon.status()  # answers: no orphan stream whose status cannot be encoded
    assert status["streams"] == []
