"""Control-plane messages between the daemon and its clients (consumers, the CLI).

Transport: ZeroMQ, the daemon's ROUTER socket at `ipc://<run_dir>/control`, clients
connect DEALER sockets. Every message is one frame holding a msgpack map with the
protocol version `v` and an `op`; token data never travels here (it lives in
shared memory) and nothing is pickled.

Versions and compatibility. A peer accepts frames of its own protocol version and of
the one before (OLDEST_PROTOCOL_VERSION), and the daemon answers every client in the
version that client spoke last (`Peers`), leaving out the fields that version lacks.
So a daemon upgraded under running trainers (a DaemonSet's rolling update) keeps
serving the consumers of the previous release; the order of an upgrade is daemons
first, then trainers. A frame of any other version is refused with a message that
names both versions and which side to upgrade.
    v1 (tokenfeed 0.1.0): the ops below.
    v2 (tokenfeed 0.2.0): hello frames (HELLO_OPS: ping, pong, attach, attached) also
        carry `package`, the sender's tokenfeed version, for logs and support.

Ops, client -> daemon:
    ping {}                                   -> pong {daemon_id, pid, version, tokenizer}
        version: the daemon's protocol version (an int, in v1 too)
    attach {spec, start, expect, replicas, rejoin, reweight?, skip?, allow_source_changes?}
        -> attached {stream, ring,
        ..., skipped?}: skip > 0 drops that many batches from start (a daemon that
        answers without `skipped` cannot, and the consumer refuses it)
        reweight: a resumed mixture changes to the spec's weights (the feed's mix changed)
        allow_source_changes: a resumed mixture may gain or lose sources (changes.py)
        exclude?, exclude_name?: documents never delivered, as content (common/exclude.py);
        the reply's start cursor then names the list (`exclude`), or the daemon predates it
        provenance?: record each batch's documents (the reply says `provenance: true`, or
        the daemon predates it; producer/slot_provenance.py)
        batch?: the consumer takes `readies` and sends RELEASES frames; the reply says
        `batch: true` when the daemon will
    release {stream, seq}                     (no reply; frees the slot for reuse)
    releases: a RELEASES frame, not msgpack (below); only from a consumer whose attach
        was answered `batch: true`
    heartbeat {stall_s?, step_s?}             (no reply beyond the daemon's own beats)
        optional, from consumers: cumulative seconds its caller waited inside next()
        (stall_s) and spent between calls (step_s, its training step), since this
        consumer attached; numbers in [0, MAX_COUNT), checked by `optional_seconds`
    detach {stream}                           (no reply)
    status {}                                 -> status {streams, workers, ...}
    scale {workers}                           -> ok {workers}
    mix {weights, split}                      -> mix {weights, streams}: new mixture weights
    stop {}                                   -> ok {}
    provenance {stream, seq, ring}            -> provenance {record}: the documents of
        batch `seq` of a stream attached with provenance, among the last it published;
        `ring` (the stream's segment name) ties the request to the daemon and stream
        that delivered the batch (producer/slot_provenance.py; checked by
        consumer/provenance.py)
    The attached reply's `fingerprint` is "" for a stream attached while the daemon still
    reads footers (an early plan, producer/served.py): a `plan` message follows.
Ops, daemon -> consumer:
    scanning {message}                        to an attach held until every footer is read:
        the reply is coming (consumers restart their wait for it)
    plan {stream, fingerprint}                every footer is read: the data's fingerprint,
        to the consumers of streams attached before (their states carry it)
    ready {stream, slot, seq, cursor}         slot `slot` holds batch `seq`
    readies {stream, batches: [[slot, seq, cursor], ...]}   several `ready`s in one frame,
        in seq order, to a consumer whose attach was answered `batch: true`
    heartbeat {}                              sent every HEARTBEAT_INTERVAL_S
    shutdown {reason}                         the daemon is going away
    error {message, kind}                     a request failed; `kind` maps to an exception

The worker channel, the daemon's ROUTER at `ipc://<run_dir>/workers`, one DEALER per
worker with identity `w<id>`, uses the same framing. A task is `[serial, unit, part]`
(serial: unique per daemon):
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
        task    {task, buffer, staging, path, row_group, column, rows, doc_seed, stamp,
                 filter?}                  filter: the source's, normalized (filters.py)
        staging {buffer, name}                reply to grow ("" when none can be made)
        exit    {}

Batched control traffic (tokenfeed 0.3, a capability, not a protocol version). With
eight ranks on one daemon, one `ready` and one `release` per batch per consumer were half
of the daemon's CPU serving from a warm cache. A consumer that attaches with
`batch: true` is answered `batch: true` by a daemon that can batch; from then on the
daemon sends it one `readies` frame a loop pass (every slot that became ready for it),
and it acknowledges several slots in one RELEASES frame: a fixed layout, checked with
one `struct` unpack instead of a msgpack map (`encode_releases` / `decode_releases`).
Either side without the capability keeps the one-per-batch ops, so old consumers and
old daemons keep working.

Failure behaviour: `decode` raises `ProtocolError` on anything that is not a
msgpack map with an integer `v` in [OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION] and a
string `op`, or that is larger than MAX_FRAME_BYTES; the daemon answers such frames
with `error` and carries on.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgpack

from tokenfeed.common.errors import ProtocolError
from tokenfeed.common.version import package_version

PROTOCOL_VERSION = 2
# The compatibility policy in one number: a daemon serves clients one protocol version
# behind it, so an upgrade never has to stop the jobs running on the node.
OLDEST_PROTOCOL_VERSION = PROTOCOL_VERSION - 1
# Frames that introduce a peer: from v2 they carry `package`, the sender's version.
HELLO_OPS = frozenset({"ping", "pong", "attach", "attached"})
# Fields each older version lacks, left out of the frames sent to its peers.
_NEW_FIELDS: dict[int, frozenset[str]] = {1: frozenset({"package"})}
MAX_FRAME_BYTES = 1 << 20  # a feed state is < 64 KB; anything near 1 MiB is garbage

HEARTBEAT_INTERVAL_S = 0.5
# A consumer that hears nothing from the daemon for this long raises DaemonGoneError.
DAEMON_SILENCE_S = 5.0
# The daemon drops a consumer it has not heard from for this long and reclaims its slots.
CONSUMER_SILENCE_S = 15.0

Message = dict[str, Any]


def encode(op: str, /, **fields: Any) -> bytes:
    """A frame of this protocol version; hello frames carry this package's version."""
    return encode_as(PROTOCOL_VERSION, op, **fields)


def encode_as(version: int, op: str, /, **fields: Any) -> bytes:
    """A frame of protocol `version` (this one or the previous): the fields that version
    does not have are left out, so a peer of that version reads exactly its own format."""
    if not OLDEST_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ValueError(f"cannot encode protocol v{version}: this side speaks "
                         f"v{OLDEST_PROTOCOL_VERSION} to v{PROTOCOL_VERSION}")
    if op in HELLO_OPS and version >= 2:
        fields.setdefault("package", package_version())
    for lacking in range(version, PROTOCOL_VERSION):
        for name in _NEW_FIELDS.get(lacking, ()):
            fields.pop(name, None)
    fields["v"] = version
    fields["op"] = op
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


# A RELEASES frame, consumer -> daemon: the seqs of one stream the consumer is done with.
#   magic(4s) "TFr1" | stream(I) | count(H) | pad(H) | count x seq(Q), little-endian
# The magic cannot begin a msgpack map (0x54 is a msgpack integer), so the daemon tells
# the two kinds apart by their first four bytes.
RELEASES_MAGIC = b"TFr1"
RELEASES_HEADER = struct.Struct("<4sIHH")
MAX_RELEASES = 1024  # seqs in one frame; a ring has far fewer slots


def encode_releases(stream: int, seqs: Sequence[int]) -> bytes:
    if not 0 < len(seqs) <= MAX_RELEASES:
        raise ValueError(f"a releases frame holds 1 to {MAX_RELEASES} seqs, not {len(seqs)}")
    return (RELEASES_HEADER.pack(RELEASES_MAGIC, stream, len(seqs), 0)
            + struct.pack(f"<{len(seqs)}Q", *seqs))


def is_releases(frame: bytes) -> bool:
    return frame[:4] == RELEASES_MAGIC


def decode_releases(frame: bytes) -> tuple[int, tuple[int, ...]]:
    """(stream, seqs) of a RELEASES frame, else ProtocolError naming what is wrong."""
    if len(frame) < RELEASES_HEADER.size:
        raise ProtocolError(f"releases frame of {len(frame)} bytes is shorter than its "
                            f"{RELEASES_HEADER.size}-byte header")
    magic, stream, count, _ = RELEASES_HEADER.unpack_from(frame)
    if magic != RELEASES_MAGIC:
        raise ProtocolError(f"releases frame begins with {magic!r}, not {RELEASES_MAGIC!r}")
    if not 0 < count <= MAX_RELEASES or len(frame) != RELEASES_HEADER.size + 8 * count:
        raise ProtocolError(f"releases frame of {len(frame)} bytes does not hold the {count} "
                            f"seqs its header names (1 to {MAX_RELEASES}, 8 bytes each)")
    return stream, struct.unpack_from(f"<{count}Q", frame, RELEASES_HEADER.size)


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
    if not OLDEST_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ProtocolError(_version_mismatch(version, msg.get("package")))
    return msg


def _version_mismatch(version: int, package: Any) -> str:
    peer = f"tokenfeed {package}" if isinstance(package, str) else "another tokenfeed release"
    here = (f"tokenfeed {package_version()} speaks protocol v{OLDEST_PROTOCOL_VERSION} "
            f"to v{PROTOCOL_VERSION}")
    if version > PROTOCOL_VERSION:
        return (f"protocol v{version} (from {peer}) is newer than this side understands "
                f"({here}); upgrade this side: daemons are upgraded before the trainers "
                "that use them")
    return (f"protocol v{version} (from {peer}) is older than this side still serves "
            f"({here}); upgrade that side to a release at most one protocol version behind")


class Peers:
    """The protocol version each control-socket peer spoke last, by ZeroMQ identity.

    The daemon notes every decoded frame (`heard`) and encodes what it sends to a peer,
    answers and unsolicited frames (ready, heartbeat, shutdown) alike, in that peer's
    version (`encode`). A peer never heard from gets this version. Bounded: the least
    recently heard of more than `capacity` identities is forgotten (CLI requests use a
    fresh identity each; consumers are heard from at every heartbeat)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._versions: OrderedDict[bytes, tuple[int, str | None]] = OrderedDict()

    def heard(self, identity: bytes, msg: Message) -> None:
        package = msg.get("package")
        if msg["op"] not in HELLO_OPS or not isinstance(package, str):  # keep the last one
            package = self._versions.get(identity, (0, None))[1]
        self._versions[identity] = (msg["v"], package)
        self._versions.move_to_end(identity)
        while len(self._versions) > self.capacity:
            self._versions.popitem(last=False)

    def version(self, identity: bytes) -> int:
        return self._versions.get(identity, (PROTOCOL_VERSION, None))[0]

    def describe(self, identity: bytes) -> str:
        """E.g. "tokenfeed 0.2.0, protocol v2", for logs."""
        version, package = self._versions.get(identity, (PROTOCOL_VERSION, None))
        release = (f"tokenfeed {package}" if package
                   else "tokenfeed 0.1.x" if version == 1 else "tokenfeed, version not said")
        return f"{release}, protocol v{version}"

    def encode(self, identity: bytes, op: str, /, **fields: Any) -> bytes:
        return encode_as(self.version(identity), op, **fields)


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

TaskKey = tuple[int, int, int]  # (serial, unit, part)

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
    serial, unit, part = msg["task"]
    return int(serial), int(unit), int(part)
