"""Fuzz both daemon sockets with malformed frames while a consumer reads: nothing breaks.

Any process of the user can connect to `<run_dir>/control` and `<run_dir>/workers`.
Thousands of frames of every shape (random bytes, msgpack of the wrong type, maps with
known ops and wrong, missing or huge fields, RELEASES struct frames well-formed or not,
multipart garbage) go to both sockets of a
live daemon; meanwhile and afterwards a consumer still gets the oracle's batches and
the daemon still answers. Only the ops a user may legitimately send to change the
daemon (`stop`, `scale`, `attach`, `detach`) are left out of the generated ops.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import msgpack
import pytest
import zmq
from conftest import assert_batch_equals
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfeed.common import protocol
from tokenfeed.common.config import WORKER_SOCKET_NAME, control_address, ipc_address

FRAMES = int(os.environ.get("TOKENFEED_FUZZ_FRAMES", "10000"))
SAFE_CONTROL_OPS = ["ping", "status", "heartbeat", "release", "ready", "readies", "error",
                    "bogus", ""]
WORKER_OPS = [*protocol.WORKER_OPS, "bogus", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


def message(ops: list[str], field_names: list[str]) -> st.SearchStrategy[bytes]:
    """msgpack maps that look like protocol messages: right or wrong version, ops, fields."""
    fields = st.dictionaries(st.sampled_from(field_names), values, max_size=6)
    return st.builds(
        lambda op, version, extra: msgpack.packb({"op": op, "v": version, **extra},
                                                 use_bin_type=True),
        st.one_of(st.sampled_from(ops), values), st.one_of(st.just(1), values), fields,
    )


def frames(ops: list[str], field_names: list[str],
           *more: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    one = st.one_of(message(ops, field_names), st.binary(max_size=64),
                    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), values), *more)
    return st.lists(one, min_size=1, max_size=3)


# RELEASES frames (common/protocol.py): well-formed ones of any stream and seqs, and the
# magic followed by anything (a wrong count, a cut or padded body).
releases_frames = st.one_of(
    st.builds(protocol.encode_releases, st.integers(0, 2**32 - 1),
              st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8)),
    st.binary(max_size=80).map(lambda b: protocol.RELEASES_MAGIC + b),
)


CONTROL_FIELDS = ["stream", "seq", "slot", "spec", "start", "expect", "workers", "cursor",
                  "batches"]
WORKER_FIELDS = sorted({f for schema in protocol.WORKER_OPS.values() for f in schema})


def drain(sock: zmq.Socket[Any]) -> None:
    while sock.poll(0):
        sock.recv_multipart()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("frames_sent", [
    pytest.param(400, id="400"), pytest.param(FRAMES, id=f"{FRAMES}", marks=pytest.mark.slow)])
def test_thousands_of_malformed_frames_on_both_sockets_break_nothing(start_daemon, oracle,
                                                                     frames_sent):
    daemon = start_daemon(workers=2)
    b, t, n = 2, 64, 60
    want = oracle(batch_size=b, seq_len=t, n=n)
    ctx = zmq.Context()
    control = ctx.socket(zmq.DEALER)
    workers = ctx.socket(zmq.DEALER)
    stranger = ctx.socket(zmq.DEALER)  # claims to be a worker that does not exist
    for sock in (control, workers, stranger):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
    control.setsockopt(zmq.IDENTITY, f"fuzz-{uuid.uuid4().hex[:8]}".encode())
    stranger.setsockopt(zmq.IDENTITY, b"w999")
    control.connect(control_address(daemon.run_dir))
    workers.connect(ipc_address(daemon.run_dir, WORKER_SOCKET_NAME))
    stranger.connect(ipc_address(daemon.run_dir, WORKER_SOCKET_NAME))
    sent = {"control": 0, "workers": 0}
    read_every = min(200, frames_sent // 10)  # sends between two batches read meanwhile
    try:
        with daemon.feed(b, t) as feed:
            got = [next(feed) for _ in range(n // 3)]

            @settings(max_examples=frames_sent // 2, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(frames(SAFE_CONTROL_OPS, CONTROL_FIELDS, releases_frames),
                   frames(WORKER_OPS, WORKER_FIELDS),
                   st.booleans())
            def send(to_control: list[bytes], to_workers: list[bytes], as_stranger: bool) -> None:
                control.send_multipart(to_control)
                (stranger if as_stranger else workers).send_multipart(to_workers)
                sent["control"] += 1
                sent["workers"] += 1
                if sent["control"] % read_every == 0:
                    drain(control)
                    got.append(next(feed))  # the consumer keeps reading meanwhile

            send()
            drain(control)
            while len(got) < n:
                got.append(next(feed))
        for k in range(n):
            assert_batch_equals(got[k], want[k], f"batch {k}")
        status = daemon.status()
        assert status["workers"]["alive"] == 2
        assert status["workers"]["dropped_messages"] > 0
    finally:
        for sock in (control, workers, stranger):
            sock.close(linger=0)
        ctx.term()
    assert sent["control"] + sent["workers"] >= frames_sent
