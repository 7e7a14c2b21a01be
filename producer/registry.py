"""The daemon's streams and the consumers attached to them.

Owns every stream (and so every ring segment) from creation to unlink, which
consumer is attached to which stream, and when each consumer was last heard.
Rings together stay under `max_ring_bytes`: a new ring first evicts warm streams
nobody uses, oldest first. A stream whose last consumer left stays warm for
`linger_s` (a restarted trainer re-attaches to a filled ring) and is then dropped.

Failure behaviour: a consumer silent past `consumer_timeout_s` is detached and its
slots reclaimed; a stream that failed tells each consumer once (`error`) and is
dropped once they are gone. Sends go through the daemon's `send`, which never raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import ConfigError
from tokenfeed.common.ring import Ring, RingLayout
from tokenfeed.common.shm import segment_name
from tokenfeed.producer.config import DEFAULT_TASK_BYTES
from tokenfeed.producer.position import Position
from tokenfeed.producer.reader import Source
from tokenfeed.producer.stream import Stream
from tokenfeed.producer.telemetry import RateWindow, Retired, stream_counters, stream_extras

log = logging.getLogger(__name__)

Send = Callable[..., None]  # send(identity, op, **fields)
# Replicas of a group are awaited this many consumer timeouts (60 s by default): long
# enough for ranks that start seconds apart, short enough that a wrong count is noticed.
REPLICA_WAIT_FACTOR = 4


class StreamRegistry:
    def __init__(
        self, *, daemon_id: str, itemsize: int, slots: int, max_ring_bytes: int,
        linger_s: float, consumer_timeout_s: float, send: Send,
        task_bytes: int = DEFAULT_TASK_BYTES, on_error: str = "fail",
    ) -> None:
        self.daemon_id = daemon_id
        self.itemsize = itemsize
        self.slots = slots
        self.max_ring_bytes = max_ring_bytes
        self.linger_s = linger_s
        self.consumer_timeout_s = consumer_timeout_s
        self.replica_wait_s = REPLICA_WAIT_FACTOR * consumer_timeout_s
        self.task_bytes = task_bytes
        self.on_error = on_error
        self.send = send
        self.streams: dict[int, Stream] = {}
        self.peers: dict[bytes, float] = {}  # consumer identity -> last heard (monotonic)
        self.peer_stream: dict[bytes, int] = {}
        self.batched: set[bytes] = set()  # consumers sent one `readies` a pass (protocol.py)
        self._next_sid = 0
        self.tokens_delivered = 0
        self.rates: dict[int, RateWindow] = {}  # sid -> its counters over the last seconds
        self.retired = Retired({})  # counters of dropped streams

    def __iter__(self) -> Iterator[Stream]:
        return iter(self.streams.values())

    def get(self, sid: int) -> Stream | None:
        return self.streams.get(sid)

    def describe(self) -> list[dict[str, Any]]:
        """Every stream's describe() with its rates, stall share and consumers."""
        return [{**s.describe(), **stream_extras(s, self.rates.get(s.sid))}
                for s in self.streams.values()]

    # -- streams ------------------------------------------------------------

    def find(self, spec: StreamSpec, start: Position, skip: int = 0
             ) -> tuple[Stream, int] | None:
        """A live stream of `spec` that holds (or fills next) the batch at `start`."""
        for stream in self.streams.values():
            if stream.spec == spec and stream.error is None:
                seq = stream.seq_at(start, skip)
                if seq is not None:
                    return stream, seq
        return None

    def create(self, spec: StreamSpec, sources: list[Source], start: Position,
               skip: int = 0) -> Stream:
        layout = RingLayout(slot_count=self.slots, slot_tokens=spec.window_tokens,
                            itemsize=self.itemsize)
        used = sum(s.ring.layout.size_bytes for s in self.streams.values())
        for sid in sorted(self.streams, key=lambda i: self.streams[i].idle_since or float("inf")):
            if used + layout.size_bytes <= self.max_ring_bytes:
                break
            if not self.streams[sid].consumers:  # evict warm streams nobody uses, oldest first
                used -= self.streams[sid].ring.layout.size_bytes
                self.drop(sid)
        if used + layout.size_bytes > self.max_ring_bytes:
            raise ConfigError(
                f"a ring of {layout.size_bytes >> 20} MiB would take the daemon's rings to "
                f"{(used + layout.size_bytes) >> 20} MiB, over --max-ring-mib "
                f"{self.max_ring_bytes >> 20}; lower --slots or the batch size, or raise it"
            )
        sid = self._next_sid
        self._next_sid += 1
        ring = Ring.create(segment_name(self.daemon_id, f"s{sid}"), layout)
        try:
            stream = Stream(sid, spec, ring, sources, start, skip, task_bytes=self.task_bytes,
                            on_error=self.on_error)
        except BaseException:
            ring.close()
            ring.segment.unlink()
            raise
        self.streams[sid] = stream
        return stream

    def drop(self, sid: int) -> None:
        stream = self.streams.pop(sid)
        self.retired.add(stream)
        self.rates.pop(sid, None)
        for identity in list(stream.consumers):
            self.peers.pop(identity, None)
            self.peer_stream.pop(identity, None)
            self.batched.discard(identity)
        stream.ring.close()
        stream.ring.segment.unlink()
        log.info("stream %d closed", sid, extra={"stream": sid})

    def drop_all(self) -> None:
        for sid in list(self.streams):
            self.drop(sid)

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, stream: Stream, seq: int, replicas: int = 1,
               batch: bool = False) -> None:
        stream.attach(identity, seq, replicas, self.replica_wait_s)
        self.peers[identity] = time.monotonic()
        self.peer_stream[identity] = stream.sid
        if batch:
            self.batched.add(identity)

    def heard(self, identity: bytes) -> bool:
        """Note that `identity` spoke; False if it is not an attached consumer."""
        if identity not in self.peers:
            return False
        self.peers[identity] = time.monotonic()
        return True

    def report(self, identity: bytes, msg: protocol.Message) -> None:
        """A consumer's heartbeat: keep its stall and step seconds, when it sent them.
        Both are untrusted: a wrong type or range is a ProtocolError (an error reply)."""
        stall_s = protocol.optional_seconds(msg, "stall_s")
        step_s = protocol.optional_seconds(msg, "step_s")
        sid = self.peer_stream.get(identity)
        stream = self.streams.get(sid) if sid is not None else None
        if stream is not None and stall_s is not None and step_s is not None:
            stream.table.report(identity, stall_s, step_s)

    def forget(self, identity: bytes) -> None:
        self.peers.pop(identity, None)
        self.batched.discard(identity)
        sid = self.peer_stream.pop(identity, None)
        stream = self.streams.get(sid) if sid is not None else None
        if stream is not None:
            stream.detach(identity)

    # -- each loop pass -----------------------------------------------------

    def changed(self) -> bool:
        """Whether a stream changed since the last pass looked at it (stream.py)."""
        return any(s.changed for s in self.streams.values())

    def advance(self, broken: str | None, full: bool = True) -> None:
        """Pack finished work into free slots and announce it; report failed streams.
        Only streams that changed since the last pass, unless `full` (stream.py)."""
        for stream in self.streams.values():
            if not (full or broken or stream.changed):
                continue
            stream.changed = False  # set again below by anything that happens
            if broken and stream.error is None:
                stream.error = broken
            if stream.error is not None:
                for identity in stream.consumers:
                    if identity not in stream.told:
                        self.send(identity, "error", kind="stream", message=stream.error)
                        stream.told.add(identity)
                continue
            stream.reclaim()
            stream.pack()
            batches: dict[bytes, list[list[Any]]] = {}  # a batched consumer's, in seq order
            for identity, ready in stream.announcements():
                self.tokens_delivered += stream.spec.window_tokens
                if identity in self.batched:
                    batches.setdefault(identity, []).append(
                        [ready["slot"], ready["seq"], ready["cursor"]])
                else:
                    self.send(identity, "ready", **ready)
            for identity, entries in batches.items():
                self.send(identity, "readies", stream=stream.sid, batches=entries)

    def beat(self, now: float) -> None:
        """Heartbeat live consumers, detach silent ones, drop streams past their linger;
        sample every stream's counters for its rates."""
        for sid, stream in self.streams.items():
            self.rates.setdefault(sid, RateWindow()).sample(now, stream_counters(stream))
        for identity, heard in list(self.peers.items()):
            if now - heard > self.consumer_timeout_s:
                log.warning("consumer %s silent for %.0f s; detaching it", identity, now - heard)
                self.forget(identity)
            else:
                self.send(identity, "heartbeat")
        for stream in self.streams.values():
            for r in stream.table.expire(now):
                log.warning(
                    "stream %d: %d of a group of %d replicas never attached at batch %d within "
                    "%.0f s; no longer holding its batches for them (check replicas=)",
                    stream.sid, r.missing, r.expected, r.seq, self.replica_wait_s)
        for sid, stream in list(self.streams.items()):
            if stream.consumers or stream.idle_since is None:
                continue
            # A val feed starts over at batch 0 each time, so nobody returns to an idle val
            # stream's position: it goes at the next beat instead of lingering.
            val = stream.spec.split == "val"
            if stream.error or val or now - stream.idle_since > self.linger_s:
                self.drop(sid)

    def staged(self) -> int:
        return sum(s.staged() for s in self.streams.values())
