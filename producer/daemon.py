"""The node daemon: control socket, worker pool, one stream (ring) per rank.

One process per node owns everything shared: it binds the control ROUTER at
`ipc://<run_dir>/control` and the worker ROUTER at `ipc://<run_dir>/workers`,
creates and unlinks every shared-memory segment (names `tokenfeed-<id>-...`),
and runs a single-threaded poll loop: control messages, finished units, dead
workers, scheduling (most-starved stream first), packing, heartbeats.

Start-up takes an exclusive lock on `<run_dir>/daemon.lock`, so one daemon serves
a run dir; holding it also proves any predecessor is dead, so the segments named
in its `daemon.json` are unlinked before anything else happens (no manual
clean-up after a crash or `kill -9`); so are this user's segments of any daemon
that is provably dead, whatever its run dir (producer/owners.py).

Failure behaviour: malformed or unknown control messages get an `error` reply and
never stop the loop; SIGTERM/SIGINT/`stop` tell every consumer `shutdown`, join
the workers, unlink every segment and remove the sockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import time
from typing import Any

import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import (
    CONTROL_SOCKET_NAME,
    WORKER_SOCKET_NAME,
    StreamSpec,
    control_address,
    ensure_private_dir,
    ipc_address,
)
from tokenfeed.common.control import error_kind
from tokenfeed.common.errors import (
    ConfigError,
    DetachedError,
    ProtocolError,
    StateMismatchError,
    StreamFailedError,
    TokenfeedError,
)
from tokenfeed.common.ring import Ring, RingLayout, token_dtype
from tokenfeed.common.shm import ring_budget_warning, segment_name, unlink_daemon_segments
from tokenfeed.producer.config import DaemonConfig
from tokenfeed.producer.dataset import scan_dataset
from tokenfeed.producer.owners import new_daemon_id, remove_stale_segments
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Failure, WorkerPool
from tokenfeed.producer.stream import Stream
from tokenfeed.producer.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

LOOP_TICK_S = 0.05
LOCK_NAME = "daemon.lock"
INFO_NAME = "daemon.json"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.stopping: str | None = None
        self.streams: dict[int, Stream] = {}
        self.peers: dict[bytes, float] = {}  # consumer identity -> last heard (monotonic)
        self.peer_stream: dict[bytes, int] = {}
        self._next_sid = 0
        self._lock_fd: int | None = None
        self.started = time.time()
        self.tokens_delivered = 0

    # -- start-up -----------------------------------------------------------

    def _take_lock(self) -> None:
        ensure_private_dir(self.run_dir)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self._read_info()
            raise ConfigError(
                f"a tokenfeed daemon (pid {info.get('pid', '?')}) already serves {self.run_dir}; "
                f"stop it with `tokenfeed stop --run-dir {self.run_dir}` or pass another --run-dir"
            ) from None
        self._lock_fd = fd

    def _read_info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = json.loads((self.run_dir / INFO_NAME).read_text())
            return info
        except (OSError, ValueError):
            return {}

    def _clean_predecessor(self) -> None:
        old = self._read_info().get("daemon_id")
        if old:
            removed = unlink_daemon_segments(str(old))
            if removed:
                log.warning("removed %d segments left by crashed daemon %s", len(removed), old)
        for name in (CONTROL_SOCKET_NAME, WORKER_SOCKET_NAME):
            (self.run_dir / name).unlink(missing_ok=True)

    def _validate(self) -> None:
        """Check every input before touching anything shared: bad input exits cleanly."""
        cfg = self.config
        control_address(self.run_dir)
        self.dataset = scan_dataset(cfg.data_dir, text_column=cfg.text_column,
                                    val_files=cfg.val_files)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.bos)
        self.itemsize = token_dtype(self.tokenizer.n_vocab).itemsize

    def _setup(self) -> None:
        cfg = self.config
        self._take_lock()
        self._clean_predecessor()
        remove_stale_segments()  # of killed daemons on any run dir (Slurm: one per job)
        self.daemon_id = new_daemon_id()
        info = {"daemon_id": self.daemon_id, "pid": os.getpid(), "started": self.started,
                "data_dir": str(cfg.data_dir), "tokenizer": cfg.tokenizer}
        tmp = self.run_dir / f"{INFO_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.run_dir / INFO_NAME)  # readers never see a half-written file
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        # zmq drops peers that send frames this large, before they reach Python.
        self.control.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_FRAME_BYTES)
        self.pool = WorkerPool(
            self.ctx, ipc_address(self.run_dir, WORKER_SOCKET_NAME),
            daemon_id=self.daemon_id, tokenizer_spec=cfg.tokenizer, bos=self.tokenizer.bos,
            itemsize=self.itemsize, nice=cfg.worker_nice,
        )
        self.pool.resize(cfg.workers)
        if (budget_warning := ring_budget_warning(cfg.max_ring_bytes)) is not None:
            log.warning(budget_warning)  # warn, not refuse: rings are made per attach, each checked
        self.control.bind(control_address(self.run_dir))
        log.info(
            "serving %s (train %d row groups, val %d) with %s, %d workers, at %s",
            cfg.data_dir, len(self.dataset.splits["train"]), len(self.dataset.splits["val"]),
            self.tokenizer.name, cfg.workers, control_address(self.run_dir),
        )

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or a `stop` request; always clean up."""
        self._validate()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._setup()
            self._loop()
        finally:
            # Our handler stays during teardown: a second SIGTERM must not cut the clean-up.
            try:
                self._teardown()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping is None:
            self.stopping = signal.Signals(signum).name

    def _loop(self) -> None:
        next_beat = 0.0
        while self.stopping is None:
            poller = zmq.Poller()
            poller.register(self.control, zmq.POLLIN)
            poller.register(self.pool.socket, zmq.POLLIN)
            sentinels = self.pool.sentinels()
            for fd in sentinels:
                poller.register(fd, zmq.POLLIN)
            events = dict(poller.poll(int(LOOP_TICK_S * 1000)))
            for fd, worker in sentinels.items():
                if fd in events:
                    lost = self.pool.reap(worker)
                    if lost is not None:
                        self._on_failure(lost)
            self._drain_control()
            for outcome in self.pool.collect():
                if isinstance(outcome, Failure):
                    self._on_failure(outcome)
                elif (stream := self.streams.get(outcome.task.stream)) is not None:
                    stream.on_result(outcome)
            self._schedule()
            self._advance_streams()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + protocol.HEARTBEAT_INTERVAL_S
                self._beat(now)

    def _on_failure(self, failure: Failure) -> None:
        stream = self.streams.get(failure.task.stream)
        if stream is not None:
            stream.on_failure(failure.task.unit, failure.error)

    def _report_failed(self, stream: Stream) -> None:
        """Tell a failed stream's consumers why, once each; they raise StreamFailedError."""
        for identity in stream.consumers:
            if identity not in stream.told:
                self._send(identity, "error", kind="stream", message=stream.error)
                stream.told.add(identity)

    def _schedule(self) -> None:
        idle = self.pool.idle()
        while idle:
            hungry = [s for s in self.streams.values() if s.wants_work(self.pool.size)]
            if not hungry:
                return
            stream = min(hungry, key=lambda s: (s.starvation(), len(s.inflight), s.sid))
            try:
                self.pool.assign(idle[-1], stream.next_task())
            except Exception as e:  # one stream's bad position must not stop the node's feed
                log.exception("stream %d cannot be scheduled", stream.sid)
                stream.error = f"stream {stream.sid} cannot be scheduled: {type(e).__name__}: {e}"
                continue
            idle.pop()

    def _advance_streams(self) -> None:
        for stream in self.streams.values():
            if self.pool.broken and stream.error is None:
                stream.error = self.pool.broken
            if stream.error is not None:
                self._report_failed(stream)
                continue
            stream.reclaim()
            stream.pack()
            for identity, ready in stream.announcements():
                self._send(identity, "ready", **ready)
                self.tokens_delivered += stream.spec.window_tokens

    def _beat(self, now: float) -> None:
        for identity, heard in list(self.peers.items()):
            if now - heard > self.config.consumer_timeout_s:
                log.warning("consumer %s silent for %.0f s; detaching it", identity, now - heard)
                self._forget(identity)
            else:
                self._send(identity, "heartbeat")
        for sid, stream in list(self.streams.items()):
            if stream.consumers or stream.idle_since is None:
                continue
            if stream.error or now - stream.idle_since > self.config.linger_s:
                self._drop_stream(sid)

    def _send(self, identity: bytes, op: str, **fields: Any) -> None:
        self.control.send_multipart([identity, protocol.encode(op, **fields)])

    # -- control requests ---------------------------------------------------

    def _drain_control(self) -> None:
        for _ in range(10_000):
            if not self.control.poll(0):
                return
            frames = self.control.recv_multipart()
            identity = frames[0]
            try:
                if len(frames) != 2:
                    raise ProtocolError(f"expected 1 frame, got {len(frames) - 1}")
                self._handle(identity, protocol.decode(frames[1]))
            except TokenfeedError as e:
                self._send(identity, "error", kind=error_kind(e), message=str(e))
            except Exception as e:  # a bug must not take the node's data feed down
                log.exception("control request failed")
                self._send(identity, "error", kind="internal", message=f"{type(e).__name__}: {e}")

    def _handle(self, identity: bytes, msg: protocol.Message) -> None:
        op = msg["op"]
        if identity in self.peers:
            self.peers[identity] = time.monotonic()
        elif op in ("heartbeat", "release"):
            up_s, timeout_s = time.time() - self.started, self.config.consumer_timeout_s
            # Up for less than the timeout, this daemon cannot have dropped anyone for silence.
            why = ("it restarted after this consumer attached to its predecessor"
                   if up_s < timeout_s else f"it dropped this consumer after {timeout_s:.0f} s of "
                   "silence (a stopped or overloaded process?) and gave its slots to others, or "
                   "it restarted since this consumer attached")
            raise DetachedError(
                f"the tokenfeed daemon (up {up_s:.1f} s) does not know this consumer: {why}. "
                "Resume from feed.state_dict(), or pass reconnect_s to re-attach by itself"
            )
        if op == "heartbeat":
            return
        if op == "release":
            stream = self.streams.get(protocol.field(msg, "stream", int))
            if stream is not None:
                stream.release(identity, protocol.field(msg, "seq", int))
        elif op == "attach":
            self._attach(identity, msg)
        elif op == "detach":
            self._forget(identity)
        elif op == "ping":
            self._send(identity, "pong", daemon_id=self.daemon_id, pid=os.getpid(),
                       version=protocol.PROTOCOL_VERSION)
        elif op == "status":
            self._send(identity, "status", **self.status())
        elif op == "scale":
            workers = protocol.field(msg, "workers", int)
            if workers < 1:
                raise ConfigError(f"--workers {workers} must be >= 1")
            self.pool.resize(workers)
            log.info("pool resized to %d workers", workers)
            self._send(identity, "scale", workers=workers)
        elif op == "stop":
            self.stopping = "stop request"
            self._send(identity, "stop")
        else:
            raise ProtocolError(f"unknown op {op!r}")

    def _attach(self, identity: bytes, msg: protocol.Message) -> None:
        spec_fields = protocol.field(msg, "spec", dict)
        spec = StreamSpec.from_dict(spec_fields)
        plan = self.dataset.split(spec.split)
        self._check_expectations(msg.get("expect") or {})
        if self.pool.broken:
            raise StreamFailedError(self.pool.broken)
        start = msg.get("start")
        if start is not None and not isinstance(start, dict):
            raise ProtocolError(f"attach: start {start!r} is not a map")
        start = make_packer(spec, start).position  # validated, canonical
        self._forget(identity)
        stream, seq = self._find_stream(spec, start)
        if stream is None:
            stream = self._new_stream(spec, plan, start)
            seq = 0
        assert seq is not None
        layout = stream.ring.layout
        reply = protocol.encode(  # encoded first: a reply that cannot be sent attaches nothing
            "attached", stream=stream.sid, ring=stream.ring.segment.name,
            slots=layout.slot_count, slot_tokens=layout.slot_tokens, itemsize=layout.itemsize,
            start_seq=seq, start=stream.cursor(start), fingerprint=self.dataset.fingerprint,
            tokenizer={"name": self.tokenizer.name, "identity": self.tokenizer.identity,
                       "bos_id": self.tokenizer.bos_id, "n_vocab": self.tokenizer.n_vocab},
        )
        stream.attach(identity, seq)
        self.peers[identity] = time.monotonic()
        self.peer_stream[identity] = stream.sid
        self.control.send_multipart([identity, reply])
        log.info("consumer %s attached to stream %d (%s rank %d/%d) at batch %d",
                 identity.decode(errors="replace"), stream.sid, spec.split, spec.rank,
                 spec.world_size, seq)

    def _check_expectations(self, expect: dict[str, Any]) -> None:
        """A saved feed state must resume on the same data and tokenizer."""
        if not isinstance(expect, dict):
            raise ProtocolError("attach: 'expect' must be a map")
        saved, now = expect.get("fingerprint"), self.dataset.fingerprint
        if saved and saved != now:
            raise StateMismatchError(
                f"the saved state's dataset fingerprint {saved} differs from this daemon's {now} "
                f"({self.config.data_dir}: file names, sizes or row groups changed); resume on "
                "the same data, or start without load_state_dict()"
            )
        saved, now = expect.get("tokenizer"), self.tokenizer.identity
        if saved and saved != now:
            raise StateMismatchError(
                f"the saved state's tokenizer identity {saved} differs from this daemon's {now} "
                f"({self.tokenizer.name}); serve with the tokenizer the state was saved with"
            )

    def _find_stream(
        self, spec: StreamSpec, start: dict[str, Any]
    ) -> tuple[Stream | None, int | None]:
        for stream in self.streams.values():
            if stream.spec == spec and stream.error is None:
                seq = stream.seq_at(start)
                if seq is not None:
                    return stream, seq
        return None, None

    def _new_stream(self, spec: StreamSpec, plan: Any, start: dict[str, Any]) -> Stream:
        layout = RingLayout(slot_count=self.config.slots, slot_tokens=spec.window_tokens,
                            itemsize=self.itemsize)
        used = sum(s.ring.layout.size_bytes for s in self.streams.values())
        for sid in sorted(self.streams, key=lambda i: self.streams[i].idle_since or float("inf")):
            if used + layout.size_bytes <= self.config.max_ring_bytes:
                break
            if not self.streams[sid].consumers:  # evict warm streams nobody uses, oldest first
                used -= self.streams[sid].ring.layout.size_bytes
                self._drop_stream(sid)
        if used + layout.size_bytes > self.config.max_ring_bytes:
            raise ConfigError(
                f"a ring of {layout.size_bytes >> 20} MiB would take the daemon's rings to "
                f"{(used + layout.size_bytes) >> 20} MiB, over --max-ring-mib "
                f"{self.config.max_ring_bytes >> 20}; lower --slots or the batch size, or raise it"
            )
        sid = self._next_sid
        self._next_sid += 1
        ring = Ring.create(segment_name(self.daemon_id, f"s{sid}"), layout)
        stream = Stream(sid, spec, plan, ring, self.dataset.text_column, start)
        self.streams[sid] = stream
        return stream

    def _forget(self, identity: bytes) -> None:
        self.peers.pop(identity, None)
        sid = self.peer_stream.pop(identity, None)
        stream = self.streams.get(sid) if sid is not None else None
        if stream is not None:
            stream.detach(identity)

    def _drop_stream(self, sid: int) -> None:
        stream = self.streams.pop(sid)
        stream.ring.close()
        stream.ring.segment.unlink()
        log.info("stream %d closed", sid)

    def status(self) -> dict[str, Any]:
        return {
            "daemon_id": self.daemon_id,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started,
            "data_dir": str(self.config.data_dir),
            "tokenizer": self.tokenizer.name,
            "workers": {"target": self.pool.target, "alive": len(self.pool.workers),
                        "busy": self.pool.busy_count(),
                        "pids": [w.process.pid for w in self.pool.workers.values()]},
            "tokens_delivered": self.tokens_delivered,
            "streams": [s.describe() for s in self.streams.values()],
        }

    # -- shutdown -----------------------------------------------------------

    def _teardown(self) -> None:
        if self._lock_fd is None:  # another daemon holds the run dir: nothing here is ours
            return
        reason = self.stopping or "daemon exiting"
        log.info("shutting down (%s)", reason)
        if hasattr(self, "control"):
            for identity in list(self.peers):
                with contextlib.suppress(zmq.ZMQError):
                    self._send(identity, "shutdown", reason=reason)
        if hasattr(self, "pool"):
            self.pool.close()
        for sid in list(self.streams):
            self._drop_stream(sid)
        if hasattr(self, "control"):
            self.control.close(linger=500)  # let the shutdown notices reach the consumers
            self.ctx.term()
        for name in (CONTROL_SOCKET_NAME, WORKER_SOCKET_NAME, INFO_NAME):
            (self.run_dir / name).unlink(missing_ok=True)
        if hasattr(self, "daemon_id"):
            unlink_daemon_segments(self.daemon_id)  # anything a code path above missed
        os.close(self._lock_fd)


def serve(config: DaemonConfig) -> None:
    Daemon(config).run()

