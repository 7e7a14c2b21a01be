"""Control-plane messages between the daemon and its clients (consumers, the CLI).

Transport: ZeroMQ, the daemon's ROUTER socket at `ipc://<run_dir>/control`, clients
connect DEALER sockets. Every message is one frame holding a msgpack map with the
protocol version `v` and an `op`; token data never travels here (it lives in
shared memory) and nothing is pickled.

Ops, client -> daemon:
    ping {}                                   -> pong {daemon_id, pid, version, tokenizer}
    attach {spec, start, consumer}            -> attached {stream, ring, slots, ...} | error
    release {stream, seq}                     (no reply; frees the slot for reuse)
    heartbeat {}                              (no reply beyond the daemon's own beats)
    detach {stream}                           (no reply)
    status {}                                 -> status {streams, workers, ...}
    scale {workers}                           -> ok {workers}
    stop {}                                   -> ok {}
Ops, daemon -> consumer:
    ready {stream, slot, seq, cursor}         slot `slot` holds batch `seq`
    heartbeat {}                              sent every HEARTBEAT_INTERVAL_S
    shutdown {reason}                         the daemon is going away
    error {message, kind}                     a request failed; `kind` maps to an exception

Failure behaviour: `decode` raises `ProtocolError` on anything that is not a
msgpack map with an integer `v` and a string `op`, or that is larger than
MAX_FRAME_BYTES; the daemon answers such frames with `error` and carries on.
"""

from __future__ import annotations

from typing import Any

import msgpack

from tokenfeed.common.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20  # a feed state is < 64 KB; anything near 1 MiB is garbage

HEARTBEAT_INTERVAL_S = 0.5
# A consumer that hears nothing from the daemon for this long raises DaemonGoneError.
DAEMON_SILENCE_S = 5.0
# The daemon drops a consumer it has not heard from for this long and reclaims its slots.
CONSUMER_SILENCE_S = 15.0

Message = dict[str, Any]


def encode(op: str, **fields: Any) -> bytes:
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = op
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def decode(frame: bytes) -> Message:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"frame is not valid msgpack: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, expected a map")
    version, op = msg.get("v"), msg.get("op")
    if not isinstance(version, int) or isinstance(version, bool) or not isinstance(op, str):
        raise ProtocolError("message lacks an integer 'v' and a string 'op'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol v{version} spoken to a v{PROTOCOL_VERSION} peer; "
            "upgrade the daemon and the client together"
        )
    return msg


def field(msg: Message, name: str, kind: type | tuple[type, ...]) -> Any:
    """A required field of the right type, else ProtocolError naming it."""
    value = msg.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"op {msg.get('op')!r}: field {name!r} is missing or not {kind}")
    return value
