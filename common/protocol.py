"""Control-plane messages between the daemon and its clients (consumers, the CLI).

Transport: ZeroMQ, the daemon's ROUTER socket at `ipc://<run_dir>/control`, clients
connect DEALER sockets. Every message is one frame holding a msgpack map with the
protocol version `v` and an `op`; token data never travels here (it lives in
shared memory) and nothing is pickled.

Ops, client -> daemon:
    ping {}                                   -> pong {daemon_id, pid, version, tokenizer}
    attach {spec, start, expect, replicas, rejoin, reweight?} -> attached {stream, ring, ...}
        reweight: a resumed mixture changes to the spec's weights (the feed's mix changed)
    release {stream, seq}                     (no reply; frees the slot for reuse)
    heartbeat {stall_s?, step_s?}             (no reply beyond the daemon's own beats)
        optional, from consumers: cumulative seconds its caller waited inside next()
        (stall_s) and spent between calls (step_s, its training step), since this
        consumer attached; numbers in [0, MAX_COUNT), checked by `optional_seconds`
    detach {stream}                           (no reply)
    status {}                                 -> status {streams, workers, ...}
    scale {workers}                           -> ok {workers}
    mix {weights, split}                      -> mix {weights, streams}: new mixture weights
    stop {}                                   -> ok {}
Ops, daemon -> consumer:
    ready {stream, slot, seq, cursor}         slot `slot` holds batch `seq`
    heartbeat {}                              sent every HEARTBEAT_INTERVAL_S
    shutdown {reason}                         the daemon is going away
    error {message, kind}                     a request failed; `kind` maps to an exception

The worker channel, the daemon's ROUTER at `ipc://<run_dir>/workers`, one DEALER per
worker with identity `w<id>`, uses the same framing. A task is `[stream, unit, part]`:
rows `rows[0]:rows[1]` of one row group (in shuffled order when `doc_seed` is set),
written into the worker's staging buffer `buffer` (0 or 1; a worker holds up to two
tasks and works through them in order). `WORKER_OPS` lists every op's fields and
`decode_worker` checks them, so the daemon never trusts a frame on that socket either.
    worker -> daemon:
        hello  {worker, pid}
        done   {task, n_tokens, n_rows, rows_offset, read_s, tokenize_s}
        failed {task, error}
               (both may add retries, failed_requests: object-storage requests retried
               and given up on since the worker's last report)
        grow   {task, need_bytes}             the result does not fit its staging buffer
    daemon -> worker:
        task    {task, buffer, staging, path, row_group, column, rows, doc_seed, stamp}
        staging {buffer, name}                reply to grow ("" when none can be made)
        exit    {}

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


def optional_seconds(msg: Message, name: str) -> float | None:
    """An optional, finite, non-negative number of seconds, else ProtocolError naming it."""
    value = msg.get(name)
    if value is None:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not 0 <= value < MAX_COUNT):  # NaN fails both comparisons
        raise ProtocolError(f"op {msg.get('op')!r}: field {name!r} = {value!r:.40} is not a "
                            f"number of seconds in [0, {MAX_COUNT})")
    return float(value)


# -- the worker channel ------------------------------------------------------

TaskKey = tuple[int, int, int]  # (stream, unit, part)

# Field kinds: "count" is a non-negative int below MAX_COUNT, "task" a TaskKey as a
# list, "seconds" a non-negative number, "rows" [lo, hi] with lo <= hi.
WORKER_OPS: dict[str, dict[str, str]] = {
    "hello": {"worker": "count", "pid": "count"},
    "done": {"task": "task", "n_tokens": "count", "n_rows": "count", "rows_offset": "count",
             "read_s": "seconds", "tokenize_s": "seconds"},
    "failed": {"task": "task", "error": "str"},
    "grow": {"task": "task", "need_bytes": "count"},
    "task": {"task": "task", "buffer": "count", "staging": "str", "path": "str",
             "row_group": "count", "column": "str", "rows": "rows", "doc_seed": "seed",
             "stamp": "str"},
    "staging": {"buffer": "count", "name": "str"},
    "exit": {},
}
MAX_COUNT = 1 << 53  # exact in float64 JSON and in msgpack; far above any real count


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT


def _valid(kind: str, v: Any) -> bool:
    if kind == "count":
        return _is_count(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "seconds":
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < MAX_COUNT
    if kind == "task":
        return isinstance(v, list) and len(v) == 3 and all(map(_is_count, v))
    if kind == "rows":
        return isinstance(v, list) and len(v) == 2 and all(map(_is_count, v)) and v[0] <= v[1]
    if kind == "seed":
        return v is None or (isinstance(v, list) and len(v) <= 8 and all(map(_is_count, v)))
    raise AssertionError(f"unknown field kind {kind}")


def optional_count(msg: Message, name: str) -> int:
    """An optional count field of a worker message (0 when absent), else ProtocolError."""
    value = msg.get(name, 0)
    if not _is_count(value):
        raise ProtocolError(f"worker op {msg.get('op')!r}: field {name!r} = {value!r:.40} is "
                            "not a count")
    return int(value)


def decode_worker(frame: bytes) -> Message:
    """A worker-channel message whose op is known and whose fields have their kinds."""
    msg = decode(frame)
    schema = WORKER_OPS.get(msg["op"])
    if schema is None:
        raise ProtocolError(f"unknown worker op {msg['op']!r}")
    for name, kind in schema.items():
        if not _valid(kind, msg.get(name)):
            raise ProtocolError(
                f"worker op {msg['op']!r}: field {name!r} = {msg.get(name)!r:.80} is not a {kind}"
            )
    return msg


def task_key(msg: Message) -> TaskKey:
    stream, unit, part = msg["task"]
    return int(stream), int(unit), int(part)
