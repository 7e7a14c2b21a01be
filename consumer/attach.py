"""The attach handshake: one request to the daemon, a mapped ring and a transfer back.

`attach()` sends the stream's spec and start (a saved cursor, batches to skip, an
exclusion list, ...), waits for `attached`, maps the ring the reply names and builds
the transfer into pinned (or device) tensors. It hands the caller an `Attachment`:
the socket, the ring, the transfer and the reply's fields, which the feed turns into
a running `Link` (consumer/link.py). Checks that need the feed's own settings (the
model's vocabulary against the tokenizer) are the caller's; `Attachment.abort()`
gives the slots back if one fails.

Failure behaviour: no reply within ATTACH_TIMEOUT_S, a reply of the wrong shape, or a
ring that cannot be mapped raise, and whatever was opened is closed first (the daemon
is told to detach, so its slots return at once). A daemon that ignored `skip` or
`exclude` (one older than those fields) is refused: the stream would not be the one
the caller asked for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec
from tokenfeed.common.control import connect, receive
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.common.ring import Ring
from tokenfeed.consumer.transfer import CpuTransfer, CudaTransfer, make_transfer

ATTACH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Attachment:
    sock: zmq.Socket[Any]
    ring: Ring
    transfer: CpuTransfer | CudaTransfer
    reply: dict[str, Any]  # the daemon's `attached` message (stream, start, tokenizer, ...)

    def abort(self) -> None:
        """Detach (the daemon frees the slots at once) and close the socket and ring."""
        _give_back(self.sock, self.ring)


def attach(
    run_dir: Path, spec: StreamSpec, device: torch.device, *, start: dict[str, Any] | None,
    expect: dict[str, Any], replicas: int, rejoin: bool, reweight: bool, skip: int,
    allow_source_changes: bool, fields: dict[str, Any],
) -> Attachment:
    """`fields`: the attach's optional parts (an exclusion list, provenance), as sent."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = connect(ctx, run_dir)
    try:
        sock.send(protocol.encode(
            "attach", spec=spec.to_dict(), start=start, expect=expect, replicas=replicas,
            rejoin=rejoin, reweight=reweight, batch=True, **({"skip": skip} if skip else {}),
            **({"allow_source_changes": True} if allow_source_changes else {}),
            **fields,
        ))
        # `scanning`: the daemon holds this attach until it has read every footer
        reply = receive(sock, ATTACH_TIMEOUT_S, {"attached"}, waiting="scanning")
    except BaseException:
        sock.close(linger=0)
        raise
    ring = None
    try:
        ring = Ring.attach(protocol.field(reply, "ring", str))
        transfer = make_transfer(ring, spec.batch_size, spec.seq_len, spec.packing, device)
    except BaseException:  # e.g. pinning refused: give the slots back before raising
        _give_back(sock, ring)
        raise
    done = Attachment(sock, ring, transfer, reply)
    try:
        protocol.field(reply, "tokenizer", dict)
        if skip and reply.get("skipped") != skip:
            raise StateMismatchError(
                f"the daemon did not skip {skip} batches (it predates skip_batches); "
                "upgrade the node's tokenfeed daemon, or load the state without skip_batches")
        start = protocol.field(reply, "start", dict)
        if "exclude" in fields and not isinstance(start.get("exclude"), dict):
            raise StateMismatchError(
                "the daemon did not apply exclude= (it predates exclusion lists); upgrade the "
                "node's tokenfeed daemon")
    except BaseException:
        done.abort()
        raise
    return done


def _give_back(sock: zmq.Socket[Any], ring: Ring | None) -> None:
    with contextlib.suppress(zmq.ZMQError):
        sock.send(protocol.encode("detach"), zmq.NOBLOCK)
    sock.close(linger=100)
    if ring is not None:
        ring.close()
