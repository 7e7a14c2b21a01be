"""The node daemon: its lifecycle, its poll loop and the control requests.

One process per node owns everything shared: it binds the control ROUTER at
`ipc://<run_dir>/control` and the worker ROUTER at `ipc://<run_dir>/workers`,
creates and unlinks every shared-memory segment (names `tokenfeed-<id>-...`),
and runs a single-threaded poll loop: control messages, finished tasks, dead
workers, scheduling (scheduler.py), packing and announcing (registry.py),
heartbeats. The worker pool lives in pool.py, the streams and their consumers in
registry.py; this module wires them together and answers the control ops.

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

import fcntl
import json
import logging
import os
import signal
import time
from typing import Any

import numpy as np
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import (
    CONTROL_SOCKET_NAME,
    MAX_REPLICAS,
    WORKER_SOCKET_NAME,
    StreamSpec,
    control_address,
    ensure_private_dir,
    ipc_address,
    normalize_mix,
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
from tokenfeed.common.ring import token_dtype
from tokenfeed.common.shm import ring_budget_warning, unlink_daemon_segments
from tokenfeed.producer import elastic
from tokenfeed.producer.backends import verified_backend
from tokenfeed.producer.cache import TokenCache
from tokenfeed.producer.config import (
    PARITY_SAMPLE_BYTES,
    DaemonConfig,
    check_workers,
    max_workers,
)
from tokenfeed.producer.dataset import (
    changed_shards,
    combined_fingerprint,
    scan_dataset,
    split_fingerprint,
)
from tokenfeed.producer.elastic import Layout
from tokenfeed.producer.logs import set_daemon_id
from tokenfeed.producer.metrics import MetricsServer, check_available
from tokenfeed.producer.mixer import initial_state, parse_state, with_weights
from tokenfeed.producer.owners import new_daemon_id, remove_stale_segments
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Failure, Result, WorkerPool
from tokenfeed.producer.reader import Source
from tokenfeed.producer.registry import StreamRegistry
from tokenfeed.producer.scheduler import schedule
from tokenfeed.producer.storage import storage_summary
from tokenfeed.producer.stream import cursor_at, mixture_cursor
from tokenfeed.producer.telemetry import advice, totals, worker_summary
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
        self._lock_fd: int | None = None
        self.started = time.time()
        self.worker_restarts = 0  # workers that died (not retired) and were replaced
        self.tokens_tokenized = 0  # tokens workers returned (status: per worker-second)
        self.metrics: MetricsServer | None = None

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
        if cfg.metrics_port is not None:
            check_available()
        self.datasets = {src.name: scan_dataset(src.data, text_column=src.text_column or "",
                                                val_files=cfg.val_files, manifest=cfg.manifest,
                                                cache_dir=cfg.cache_dir)
                         for src in cfg.source_list()}
        self.dataset = next(iter(self.datasets.values()))
        self.weights = cfg.default_weights()  # a mixture's, when a consumer names none
        self.fingerprint = combined_fingerprint(self.datasets)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.bos)
        self.itemsize = token_dtype(self.tokenizer.n_vocab).itemsize
        share = PARITY_SAMPLE_BYTES // len(self.datasets)
        self.backend = verified_backend(
            self.tokenizer, cfg.tokenizer_backend,
            [t for d in self.datasets.values() for t in d.sample_texts(share)]
            if cfg.tokenizer_backend != "tiktoken" else [],  # tiktoken needs no parity check
            cfg.on_backend_mismatch,
        )

    def _setup(self) -> None:
        cfg = self.config
        self._take_lock()
        self._clean_predecessor()
        remove_stale_segments()  # of killed daemons on any run dir (Slurm: one per job)
        self.daemon_id = new_daemon_id()
        set_daemon_id(self.daemon_id)
        info = {"daemon_id": self.daemon_id, "pid": os.getpid(), "started": self.started,
                "data_dir": self._data_description(), "tokenizer": cfg.tokenizer}
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
            backend=self.backend, itemsize=self.itemsize, nice=cfg.worker_nice,
        )
        self.pool.resize(cfg.workers)
        if (budget_warning := ring_budget_warning(cfg.max_ring_bytes)) is not None:
            log.warning(budget_warning)  # warn, not refuse: rings are made per attach, each checked
        self.caches: dict[str, TokenCache] = {}  # text column -> its cache (keys hold it)
        if cfg.cache_dir is not None:
            for column in sorted({d.text_column for d in self.datasets.values()}):
                self.caches[column] = TokenCache(cfg.cache_dir, cfg.cache_bytes,
                                                 self.tokenizer.identity, self.itemsize, column)
        self.registry = StreamRegistry(
            daemon_id=self.daemon_id, itemsize=self.itemsize, slots=cfg.slots,
            max_ring_bytes=cfg.max_ring_bytes, linger_s=cfg.linger_s,
            consumer_timeout_s=cfg.consumer_timeout_s, task_bytes=cfg.task_bytes,
            on_error=cfg.on_error, send=self._send,
        )
        if cfg.metrics_port is not None:
            self.metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port)
            self.metrics.publish(self.status())
            log.info("metrics at %s", self.metrics.url)
        self.control.bind(control_address(self.run_dir))
        for name, d in self.datasets.items():
            log.info("source %s: %s (train %d row groups, val %d)", name, d.root,
                     len(d.splits["train"]), len(d.splits["val"]))
        log.info("serving with %s (%s), %d workers, at %s", self.tokenizer.name, self.backend,
                 cfg.workers, control_address(self.run_dir))

    def _data_description(self) -> str:
        if self.config.data_dir is not None:
            return str(self.config.data_dir)
        return " ".join(f"{n}={d.root}" for n, d in self.datasets.items())

    @property
    def cache(self) -> TokenCache | None:
        return next(iter(self.caches.values()), None)

    def _sources(self, names: list[str], split: str) -> list[Source]:
        return [Source(n, self.datasets[n].split(split), self.datasets[n].text_column,
                       self.caches.get(self.datasets[n].text_column)) for n in names]

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
            self.pool.tick()
            poller = zmq.Poller()
            poller.register(self.control, zmq.POLLIN)
            poller.register(self.pool.socket, zmq.POLLIN)
            sentinels = self.pool.sentinels()
            for fd in sentinels:
                poller.register(fd, zmq.POLLIN)
            events = dict(poller.poll(int(LOOP_TICK_S * 1000)))
            for fd, worker in sentinels.items():
                if fd in events:
                    self.worker_restarts += not worker.retiring
                    for lost in self.pool.reap(worker):
                        self._on_outcome(lost)
            self._drain_control()
            for outcome in self.pool.collect():
                self._on_outcome(outcome)
            schedule(self.registry, self.pool, self.config.max_staging_bytes)
            self.registry.advance(self.pool.broken)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + protocol.HEARTBEAT_INTERVAL_S
                self.registry.beat(now)
                if self.metrics is not None:  # scrapes read this copy from their own thread
                    self.metrics.publish(self.status())

    def _on_outcome(self, outcome: Result | Failure) -> None:
        if isinstance(outcome, Result):  # worker output only: cache hits cost no worker time
            self.tokens_tokenized += len(outcome.tokens)
        stream = self.registry.lane(outcome.task.stream)
        if stream is None:
            return  # the stream was dropped while its task was out
        if isinstance(outcome, Failure):
            stream.on_failure(outcome.task, outcome.error)
        else:
            stream.on_result(outcome)

    def _send(self, identity: bytes, op: str, **fields: Any) -> None:
        try:
            self.control.send_multipart([identity, protocol.encode(op, **fields)])
        except (zmq.ZMQError, TypeError, ValueError, OverflowError) as e:
            log.warning("could not send %r to %r: %s", op, identity[:32], e)

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
        if not self.registry.heard(identity) and op in ("heartbeat", "release"):
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
            self.registry.report(identity, msg)
            return
        if op == "release":
            stream = self.registry.get(protocol.field(msg, "stream", int))
            if stream is not None:
                stream.release(identity, protocol.field(msg, "seq", int))
        elif op == "attach":
            self._attach(identity, msg)
        elif op == "detach":
            if identity in self.registry.peer_stream:
                log.info("consumer %s detached from stream %d",
                         identity.decode(errors="replace"), self.registry.peer_stream[identity])
            self.registry.forget(identity)
        elif op == "ping":
            tok = self.tokenizer  # consumers learn vocab_size and BOS before attaching
            self._send(identity, "pong", daemon_id=self.daemon_id, pid=os.getpid(),
                       version=protocol.PROTOCOL_VERSION,
                       tokenizer={"name": tok.name, "identity": tok.identity,
                                  "bos_id": tok.bos_id, "n_vocab": tok.n_vocab})
        elif op == "status":
            self._send(identity, "status", **self.status())
        elif op == "scale":
            workers = protocol.field(msg, "workers", int)
            check_workers(workers)
            self.pool.resize(workers)
            log.info("pool resized to %d workers", workers)
            self._send(identity, "scale", workers=workers)
        elif op == "mix":
            self._mix(identity, msg)
        elif op == "stop":
            self.stopping = "stop request"
            self._send(identity, "stop")
        else:
            raise ProtocolError(f"unknown op {op!r}")

    def _mix(self, identity: bytes, msg: protocol.Message) -> None:
        """New weights for the split's mixture streams, at their next batch not yet filled,
        and for streams created from now on without weights of their own."""
        weights = dict(normalize_mix(protocol.field(msg, "weights", dict)))
        split = protocol.field(msg, "split", str)
        unknown = set(weights) - set(self.datasets)
        if unknown:
            raise ConfigError(f"this daemon serves sources {', '.join(self.datasets)}, not "
                              f"{', '.join(sorted(unknown))}")
        streams = [s for s in self.registry if s.mixture and s.spec.split == split]
        for stream in streams:  # checked first: all of them change, or none
            assert stream.mixer is not None
            missing = set(weights) - set(stream.mixer.names)
            if missing:
                raise ConfigError(f"stream {stream.sid} mixes {', '.join(stream.mixer.names)}, "
                                  f"not {', '.join(sorted(missing))}; restart it to add sources")
        for stream in streams:
            stream.reweight(weights)
        if len(self.datasets) > 1:
            self.weights = {n: weights.get(n, 0.0) for n in self.datasets}
        log.info("mixture weights %s for %d %s streams", weights, len(streams), split)
        self._send(identity, "mix", weights=weights, streams=[s.sid for s in streams])

    def _start_of(self, spec: StreamSpec, msg: protocol.Message) -> dict[str, Any]:
        """The canonical, validated start position of an attach (a mixture's: with its
        `mix` state)."""
        start = msg.get("start")
        if start is not None and not isinstance(start, dict):
            raise ProtocolError(f"attach: start {start!r} is not a map")
        if start is not None and "elastic_from" in start:
            start = self._elastic_start(spec, start["elastic_from"])
        position = make_packer(spec, start).position  # validated, canonical
        if start is not None and "elastic" in start:
            Layout.from_json(start["elastic"], spec.rank, spec.world_size)  # validated
            position = {**position, "elastic": start["elastic"]}
        saved = start.get("mix") if start is not None else None
        if saved is None and spec.mix is None and len(self.datasets) == 1:
            return position  # one source: no mixture
        served = tuple(self.datasets)
        if saved is None:
            if start is not None:
                raise StateMismatchError(
                    "the saved state is of a one-source stream, and this daemon serves a "
                    f"mixture of {', '.join(served)}; resume on a daemon serving --data, or "
                    "start without load_state_dict()")
            weights = dict(spec.mix) if spec.mix is not None else self.weights
            unknown = set(weights) - set(served)
            if unknown:
                raise ConfigError(f"mix names {', '.join(sorted(unknown))}; this daemon serves "
                                  f"{', '.join(served)}")
            mix = initial_state(weights)
        else:
            mix = parse_state(saved, served)
            if msg.get("reweight") is True and spec.mix is not None:
                mix = with_weights(mix, dict(spec.mix))
            if make_packer(spec, position).next_unit != mix["at"]:
                raise StateMismatchError(
                    f"the mixture state is at virtual unit {mix['at']}, its position reads "
                    f"from unit {make_packer(spec, position).next_unit}; pass the feed state "
                    "unchanged")
        return {**position, "mix": mix}

    def _elastic_start(self, spec: StreamSpec, cursors: Any) -> dict[str, Any]:
        """The start of rank spec.rank of spec.world_size continuing a job that every
        cursor in `cursors` (rank order) is one rank of (elastic.py)."""
        if not isinstance(cursors, list) or not cursors or not all(
                isinstance(c, dict) for c in cursors):
            raise ProtocolError("attach: start.elastic_from must be a list of cursors")
        mixture = any("mix" in c for c in cursors)
        served = tuple(self.datasets)
        for rank, cursor in enumerate(cursors):
            try:
                make_packer(spec, cursor)
                if "elastic" in cursor:
                    Layout.from_json(cursor["elastic"], rank, len(cursors))
                if mixture:
                    parse_state(cursor.get("mix"), served)
                    elastic.check_exact(cursor["mix"], spec.packing)
            except StateMismatchError as e:
                raise StateMismatchError(f"rank {rank} of the saved job: {e}") from None

        def refs(name: str) -> tuple[int, Any]:
            split = self.datasets[name].split(spec.split)
            n = len(split)

            def ref_of(g: int) -> Any:
                epoch, ordinal = divmod(g, n)
                if spec.shuffle_seed is None:
                    return split.row_groups[ordinal]
                order = np.random.default_rng([spec.shuffle_seed, epoch]).permutation(n)
                return split.row_groups[order[ordinal]]

            return n, ref_of

        if mixture:
            mix = elastic.plan_mixture(cursors, spec.packing,
                                       {n: refs(n) for n in cursors[0]["mix"]["sources"]},
                                       spec.rank, spec.world_size)
            log.info("elastic resume of a mixture: rank %d of %d continues %d ranks",
                     spec.rank, spec.world_size, len(cursors))
            return {"unit": 0, "offset": 0, "doc": 0, "mix": mix}
        if len(self.datasets) > 1:
            raise StateMismatchError("the saved job is of one source and this daemon serves a "
                                     f"mixture of {', '.join(served)}")
        n, ref_of = refs(served[0])
        layout = elastic.plan(cursors, spec.packing, n, ref_of, spec.rank, spec.world_size)
        log.info("elastic resume: rank %d of %d continues %d ranks with %d items, then its "
                 "stride from unit %d", spec.rank, spec.world_size, len(cursors), layout.items,
                 layout.stride_from)
        return {"unit": 0, "offset": 0, "doc": 0, "elastic": layout.to_json()}

    def _attach(self, identity: bytes, msg: protocol.Message) -> None:
        spec_fields = protocol.field(msg, "spec", dict)
        spec = StreamSpec.from_dict(spec_fields)
        self._check_expectations(msg.get("expect") or {})
        if self.pool.broken:
            raise StreamFailedError(self.pool.broken)
        start = self._start_of(spec, msg)
        names = list(start["mix"]["sources"]) if "mix" in start else list(self.datasets)
        sources = self._sources(names, spec.split)
        for name, src in zip(names, sources, strict=True):
            if not src.plan.row_groups:
                self.datasets[name].split(spec.split)  # raises: the split is empty
        plans = {src.name: src.plan for src in sources}
        # validated before anything is created
        layout = (Layout.from_json(start["elastic"], spec.rank, spec.world_size)
                  if "elastic" in start else None)
        start_cursor = (mixture_cursor(plans, spec, start) if "mix" in start
                        else cursor_at(sources[0].plan, spec, start, layout))
        replicas = msg.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not (
                1 <= replicas <= MAX_REPLICAS):
            raise ConfigError(f"replicas={replicas!r} must be an integer in [1, {MAX_REPLICAS}]")
        self.registry.forget(identity)
        found = self.registry.find(spec, start_cursor)
        stream, seq = found if found is not None else (None, 0)
        if stream is None and msg.get("rejoin") is True:
            raise StreamFailedError(
                f"this replica's position (epoch {start_cursor['epoch']}, unit "
                f"{start_cursor['unit']}) is no longer in its group's ring: the other replicas "
                "moved on while it was away, so it cannot see their batches again; restart "
                "the group from a checkpoint"
            )
        if stream is None:
            stream = self.registry.create(spec, sources, start)
        layout = stream.ring.layout
        try:  # encoded first: a reply that cannot be sent attaches nothing
            reply = protocol.encode(
                "attached", stream=stream.sid, ring=stream.ring.segment.name,
                slots=layout.slot_count, slot_tokens=layout.slot_tokens, itemsize=layout.itemsize,
                start_seq=seq, start=start_cursor, fingerprint=self.fingerprint,
                tokenizer={"name": self.tokenizer.name, "identity": self.tokenizer.identity,
                           "bos_id": self.tokenizer.bos_id, "n_vocab": self.tokenizer.n_vocab},
            )
        except Exception:
            if found is None:  # a failed attach leaves nothing behind
                self.registry.drop(stream.sid)
            raise
        self.registry.attach(identity, stream, seq, replicas)
        self.control.send_multipart([identity, reply])
        log.info("consumer %s attached to stream %d (%s rank %d/%d) at batch %d",
                 identity.decode(errors="replace"), stream.sid, spec.split, spec.rank,
                 spec.world_size, seq)

    def _check_expectations(self, expect: dict[str, Any]) -> None:
        """A saved feed state must resume on the same data and tokenizer."""
        if not isinstance(expect, dict):
            raise ProtocolError("attach: 'expect' must be a map")
        saved = expect.get("fingerprint")
        if saved is not None and not isinstance(saved, str):
            raise ProtocolError("attach: expect.fingerprint must be a string")
        for name, fingerprint in split_fingerprint(saved or "").items():
            self._check_fingerprint(name, fingerprint)
        saved, now = expect.get("tokenizer"), self.tokenizer.identity
        if saved and saved != now:
            raise StateMismatchError(
                f"the saved state's tokenizer identity {saved} differs from this daemon's {now} "
                f"({self.tokenizer.name}); serve with the tokenizer the state was saved with"
            )

    def _check_fingerprint(self, name: str, saved: str) -> None:
        dataset = self.datasets.get(name)
        if dataset is None:
            return  # a source this daemon lacks: the mixture state names it (parse_state)
        now = dataset.fingerprint
        if saved.split(".")[0] != now.split(".")[0]:
            among = changed_shards(saved, dataset)
            which = (f"changed, added or removed among {', '.join(among[:20])}"
                     if among else "a shard was removed" if among == [] else
                     "file names, sizes or row groups changed")
            raise StateMismatchError(
                f"the saved state's data differs from this daemon's source {name} "
                f"({dataset.root}): "
                f"{which} (fingerprint {saved.split('.')[0]} saved, {now.split('.')[0]} now; "
                "objects also by modification time); resume on the same data, or start "
                "without load_state_dict()"
            )

    def status(self) -> dict[str, Any]:
        streams = self.registry.describe()
        retired = self.registry.retired.as_list()
        total = totals(streams, retired)
        status = {
            "daemon_id": self.daemon_id,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started,
            "started": self.started,
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "data_dir": self._data_description(),
            "sources": {n: {"path": str(d.root), "text_column": d.text_column,
                            "weight": self.weights.get(n)} for n, d in self.datasets.items()},
            "tokenizer": self.tokenizer.name,
            "tokenizer_backend": self.backend,
            "workers": worker_summary(self.pool.stats(), self.worker_restarts,
                                      self.tokens_tokenized, self.pool.size),
            "staging": {"bytes": self.registry.staged(),
                        "budget_bytes": self.config.max_staging_bytes},
            "cache": self.cache.stats() if self.cache is not None else None,
            "storage": storage_summary(self.pool.stats()),
            "tokens_delivered": self.registry.tokens_delivered,
            "streams": streams,
            "totals": total,
            "retired_streams": retired,
        }
        status["advice"] = advice(status, max_workers())
        return status

    # -- shutdown -----------------------------------------------------------

    def _teardown(self) -> None:
        if self._lock_fd is None:  # another daemon holds the run dir: nothing here is ours
            return
        reason = self.stopping or "daemon exiting"
        log.info("shutting down (%s)", reason)
        if hasattr(self, "registry"):
            for identity in list(self.registry.peers):
                self._send(identity, "shutdown", reason=reason)
        if self.metrics is not None:
            self.metrics.close()
        if hasattr(self, "pool"):
            self.pool.close()
        if hasattr(self, "registry"):
            self.registry.drop_all()
        for cache in getattr(self, "caches", {}).values():
            cache.close()
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

