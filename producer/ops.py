"""The daemon's control ops: one handler per op, in one table (`OPS`).

`handle` answers one decoded control message (common/protocol.py lists the ops and
their fields) from consumer `identity`: it checks that heartbeats and releases come
from a consumer this daemon knows, then calls the op's handler, which reads and
changes the daemon's registry, pool and weights and sends the reply.

Failure behaviour: a handler raises a TokenfeedError for a bad request (the daemon
turns it into an `error` reply, naming the fix); an unknown op is a ProtocolError.
An attach that fails leaves nothing behind: the stream it created is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenfeed.common import protocol
from tokenfeed.common.config import MAX_REPLICAS, MAX_SKIP_BATCHES, StreamSpec, normalize_mix
from tokenfeed.common.errors import (
    ConfigError,
    DetachedError,
    ProtocolError,
    StreamFailedError,
)
from tokenfeed.producer import exclude, slot_provenance
from tokenfeed.producer.config import check_workers
from tokenfeed.producer.position import cursor_json

if TYPE_CHECKING:
    from tokenfeed.producer.daemon import Daemon

log = logging.getLogger(__name__)

Handler = Callable[["Daemon", bytes, protocol.Message], None]


def handle(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    op = msg["op"]
    if op in ("heartbeat", "release"):
        _known(d, identity)
    handler = OPS.get(op)
    if handler is None:
        raise ProtocolError(f"unknown op {op!r}")
    handler(d, identity, msg)


def _known(d: Daemon, identity: bytes) -> None:
    """Note that an attached consumer spoke; DetachedError if this daemon does not know it."""
    if not d.registry.heard(identity):
        up_s, timeout_s = time.time() - d.started, d.config.consumer_timeout_s
        # Up for less than the timeout, this daemon cannot have dropped anyone for silence.
        why = ("it restarted after this consumer attached to its predecessor"
               if up_s < timeout_s else f"it dropped this consumer after {timeout_s:.0f} s of "
               "silence (a stopped or overloaded process?) and gave its slots to others, or "
               "it restarted since this consumer attached")
        raise DetachedError(
            f"the tokenfeed daemon (up {up_s:.1f} s) does not know this consumer: {why}. "
            "Resume from feed.state_dict(), or pass reconnect_s to re-attach by itself"
        )


def _heartbeat(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    d.registry.report(identity, msg)


def _release(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    stream = d.registry.get(protocol.field(msg, "stream", int))
    if stream is not None:
        stream.release(identity, protocol.field(msg, "seq", int))


def releases(d: Daemon, identity: bytes, frame: bytes) -> None:
    """A RELEASES frame (common/protocol.py): several `release`s of one stream at once."""
    sid, seqs = protocol.decode_releases(frame)
    _known(d, identity)
    stream = d.registry.get(sid)
    if stream is not None:
        for seq in seqs:
            stream.release(identity, seq)


def _detach(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    if identity in d.registry.peer_stream:
        log.info("consumer %s detached from stream %d",
                 identity.decode(errors="replace"), d.registry.peer_stream[identity])
    d.registry.forget(identity)


def _ping(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    # consumers learn vocab_size and BOS before attaching
    d.send(identity, "pong", daemon_id=d.daemon_id, pid=os.getpid(),
           version=protocol.PROTOCOL_VERSION, tokenizer=d.tokenizer_facts())


def _status(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    d.send(identity, "status", **d.status())


def _scale(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    workers = protocol.field(msg, "workers", int)
    check_workers(workers)
    d.pool.resize(workers)
    log.info("pool resized to %d workers", workers)
    d.send(identity, "scale", workers=workers)


def _stop(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    d.stopping = "stop request"
    d.send(identity, "stop")


def _mix(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    """New weights for the split's mixture streams, at their next batch not yet filled,
    and for streams created from now on without weights of their own."""
    weights = dict(normalize_mix(protocol.field(msg, "weights", dict)))
    split = protocol.field(msg, "split", str)
    served = d.admission.served
    unknown = set(weights) - set(served)
    if unknown:
        raise ConfigError(f"this daemon serves sources {', '.join(served)}, not "
                          f"{', '.join(sorted(unknown))}")
    streams = [s for s in d.registry if s.supply.weights is not None and s.spec.split == split]
    for stream in streams:  # checked first: all of them change, or none
        names = list(stream.supply.weights or ())
        missing = set(weights) - set(names)
        if missing:
            raise ConfigError(f"stream {stream.sid} mixes {', '.join(names)}, not "
                              f"{', '.join(sorted(missing))}; restart it to add sources")
    for stream in streams:
        stream.reweight(weights)
    if len(served) > 1:
        d.weights = {n: weights.get(n, 0.0) for n in served}
    if split == "train":  # new streams start with these weights, not the mix file's schedule
        d.admission.follow_schedule = False
    log.info("mixture weights %s for %d %s streams", weights, len(streams), split)
    d.send(identity, "mix", weights=weights, streams=[s.sid for s in streams])


def _attach(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    spec = StreamSpec.from_dict(protocol.field(msg, "spec", dict))
    if not d.served.complete and (why := _needs_whole_plan(d, spec, msg)):
        d.hold_attach(identity, msg, why)  # answered once every footer is read
        return
    d.admission.check_expectations(msg.get("expect") or {})
    if d.pool.broken:
        raise StreamFailedError(d.pool.broken)
    start = d.admission.start(spec, msg, d.weights)
    # the daemon's exclusion list and the feed's
    listed = exclude.for_attach(msg, d.served.datasets, d.served.exclusion)
    start = exclude.admit(start, msg.get("start"), listed)
    sources = [dataclasses.replace(s, exclude=listed.rows(s.name))
               for s in d.admission.sources(start, spec.split)]
    start_cursor = cursor_json(start, {s.name: s.plan for s in sources}, spec)
    skip = msg.get("skip", 0)
    if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip < MAX_SKIP_BATCHES:
        raise ConfigError(
            f"skip_batches={skip!r} must be an integer in [0, {MAX_SKIP_BATCHES})")
    replicas = msg.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not (
            1 <= replicas <= MAX_REPLICAS):
        raise ConfigError(f"replicas={replicas!r} must be an integer in [1, {MAX_REPLICAS}]")
    provenance = msg.get("provenance", False)
    if not isinstance(provenance, bool):
        raise ConfigError(f"provenance={provenance!r} must be True or False")
    batch = msg.get("batch", False) is True  # readies and releases frames (protocol.py)
    d.registry.forget(identity)
    found = d.registry.find(spec, start, skip)
    if found is not None and provenance and found[0].provenance is None:
        if msg.get("rejoin") is True:
            raise ConfigError(
                "this replica asks for provenance=True but its group's stream does not "
                "record provenance (the replica that created it did not ask for it); give "
                "every replica of a group the same provenance= setting")
        found = None  # a stream records from its first unit: a new one, which does
    stream, seq = found if found is not None else (None, 0)
    if stream is None and msg.get("rejoin") is True:
        raise StreamFailedError(
            f"this replica's position (epoch {start_cursor['epoch']}, unit "
            f"{start_cursor['unit']}) is no longer in its group's ring: the other replicas "
            "moved on while it was away, so it cannot see their batches again; restart "
            "the group from a checkpoint"
        )
    if stream is None:
        stream = d.registry.create(spec, sources, start, skip)
        if provenance:
            slot_provenance.enable(stream, [s.name for s in sources])
    layout = stream.ring.layout
    try:  # encoded first: a reply that cannot be sent attaches nothing
        reply = d.peers.encode(
            identity, "attached", stream=stream.sid, ring=stream.ring.segment.name,
            slots=layout.slot_count, slot_tokens=layout.slot_tokens, itemsize=layout.itemsize,
            # "" while the plan is early: a `plan` message brings it (daemon.py)
            start_seq=seq, start=start_cursor, fingerprint=d.served.fingerprint,
            tokenizer=d.tokenizer_facts(), **({"skipped": skip} if skip else {}),
            **({"provenance": True} if provenance else {}),
            **({"batch": True} if batch else {}),
        )
    except Exception:
        if found is None:  # a failed attach leaves nothing behind
            d.registry.drop(stream.sid)
        raise
    d.registry.attach(identity, stream, seq, replicas, batch=batch)
    d.control.send_multipart([identity, reply])
    log.info("consumer %s (%s) attached to stream %d (%s rank %d/%d) at batch %d",
             identity.decode(errors="replace"), d.peers.describe(identity), stream.sid,
             spec.split, spec.rank, spec.world_size, seq)


def _needs_whole_plan(d: Daemon, spec: StreamSpec, msg: protocol.Message) -> str:
    """Why an attach waits for the whole plan while the daemon serves an early one (""
    if it need not): only a fresh stream of the train split in file order starts on the
    first files' row groups, the one plan-independent start (a shuffle, a resumed or
    elastic position, an exclusion list or provenance each need every row group)."""
    train = next(iter(d.served.datasets.values())).splits["train"]
    if msg.get("start") is not None or msg.get("skip"):
        return "a resumed stream"
    if spec.split != "train" or spec.shuffle_seed is not None or spec.mix is not None:
        return f"a {spec.split} stream" + (" that shuffles" if spec.shuffle_seed is not None
                                           else " with mixture weights" if spec.mix else "")
    if "exclude" in msg or msg.get("provenance"):
        return "a stream with an exclusion list or provenance"
    if spec.rank + spec.world_size >= len(train):
        return f"rank {spec.rank} of {spec.world_size} (past the first files' row groups)"
    return ""


def _provenance(d: Daemon, identity: bytes, msg: protocol.Message) -> None:
    """The documents of published batch `seq` of a stream that records them, cut now
    (producer/slot_provenance.py): recording keeps what to cut, not the cut record."""
    sid, seq = protocol.field(msg, "stream", int), protocol.field(msg, "seq", int)
    ring = protocol.field(msg, "ring", str)  # names the daemon and stream that sent the batch
    stream = d.registry.get(sid)
    if stream is None or stream.ring.segment.name != ring:
        raise ConfigError(
            f"stream {sid} with ring {ring[:80]!r} is not on this daemon (it restarted, or the "
            "stream ended): list the batch with `tokenfeed explain` from the state before it")
    if stream.provenance is None:
        raise ConfigError(f"stream {sid} records no provenance; attach with "
                          "TokenFeed(..., provenance=True), or use `tokenfeed explain`")
    d.send(identity, "provenance", record=stream.provenance.record(seq))


OPS: dict[str, Handler] = {
    "heartbeat": _heartbeat,
    "release": _release,
    "attach": _attach,
    "detach": _detach,
    "ping": _ping,
    "status": _status,
    "scale": _scale,
    "mix": _mix,
    "stop": _stop,
    "provenance": _provenance,
}
