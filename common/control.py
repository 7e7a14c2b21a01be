"""A request/reply helper over the daemon's control socket, for the CLI and consumers.

Lazy Pirate style: one DEALER socket, every receive bounded by a deadline, the
socket closed with linger=0 so a dead daemon never blocks interpreter exit.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import control_address
from tokenfeed.common.errors import (
    ConfigError,
    DaemonUnavailableError,
    DataError,
    DetachedError,
    NotSharedError,
    ProtocolError,
    ShmFullError,
    StateMismatchError,
    StreamFailedError,
    TokenfeedError,
)

ERROR_KINDS: dict[str, type[TokenfeedError]] = {
    "config": ConfigError,
    "data": DataError,
    "state": StateMismatchError,
    "protocol": ProtocolError,
    "stream": StreamFailedError,
    "detached": DetachedError,
    "shm_full": ShmFullError,
}


def error_kind(error: TokenfeedError) -> str:
    """The `kind` an error reply carries, so the client re-raises the same class."""
    for kind, cls in ERROR_KINDS.items():
        if type(error) is cls:
            return kind
    return "internal"


def error_from_reply(msg: protocol.Message) -> TokenfeedError:
    kind = ERROR_KINDS.get(str(msg.get("kind")), TokenfeedError)
    return kind(str(msg.get("message", "daemon reported an error")))


def connect(ctx: zmq.Context[Any], run_dir: Path) -> zmq.Socket[Any]:
    """A DEALER connected to the daemon, or DaemonUnavailableError if no socket file exists."""
    address = control_address(run_dir)
    try:
        present = (run_dir / "control").exists()
    except PermissionError:  # the run dir is 0700: another user's daemon
        try:
            owner: int | str = run_dir.stat().st_uid
        except OSError:
            owner = "?"
        raise NotSharedError(
            f"cannot open the daemon's run dir {run_dir} (owner uid {owner}, mode 0700) as uid "
            f"{os.geteuid()}: the trainer does not share the daemon's uid. Run the daemon as "
            "the training job's user, or point --run-dir / TOKENFEED_RUN_DIR at your own "
            "daemon: see deploy/"
        ) from None
    if not present:
        raise DaemonUnavailableError(
            f"no tokenfeed daemon at {address} (no socket file); start one with "
            f"`tokenfeed serve --data DIR --tokenizer SPEC --run-dir {run_dir}` "
            "or point --run-dir / TOKENFEED_RUN_DIR at the running one"
        )
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"c-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
    sock.connect(address)
    return sock


def receive(sock: zmq.Socket[Any], timeout_s: float, expect: set[str],
            waiting: str | None = None) -> protocol.Message:
    """Next message whose op is in `expect` (or an error), skipping beats; bounded in time.
    A message of op `waiting` (the daemon says the answer is coming) starts the bound again."""
    deadline = time.monotonic() + timeout_s
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not sock.poll(left_ms):
            raise DaemonUnavailableError(
                f"the tokenfeed daemon did not answer within {timeout_s:.0f} s; "
                "check `tokenfeed status` and the daemon's log"
            )
        msg = protocol.decode(sock.recv())
        if msg["op"] == "error":
            raise error_from_reply(msg)
        if msg["op"] in expect:
            return msg
        if msg["op"] == waiting:
            deadline = time.monotonic() + timeout_s


def request(
    run_dir: Path, op: str, *, timeout_s: float = 5.0, expect: str | None = None, **fields: Any
) -> protocol.Message:
    """Send one request on a fresh socket and return its reply."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s} must be > 0")
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = connect(ctx, run_dir)
    try:
        sock.send(protocol.encode(op, **fields))
        return receive(sock, timeout_s, {expect or op})
    finally:
        sock.close(linger=0)
