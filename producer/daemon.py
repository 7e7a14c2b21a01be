"""The node daemon: its lifecycle, its poll loop and the control requests.

One process per node owns everything shared: it binds the control ROUTER at
`ipc://<run_dir>/control` and the worker ROUTER at `ipc://<run_dir>/workers`,
creates and unlinks every shared-memory segment (names `tokenfeed-<id>-...`),
and runs a single-threaded poll loop: control messages, finished tasks, dead
workers, scheduling (scheduler.py), packing and announcing (registry.py),
heartbeats. The worker pool lives in pool.py, the streams and their consumers in
registry.py, the control ops in ops.py, what an attach may start from in
admission.py, the data served in served.py; this module owns their lifecycle and
runs the loop.

Start-up takes the run dir (rundir.py: one daemon a run dir, and a dead
predecessor's segments and sockets removed first, so no manual clean-up after a
crash or `kill -9`); this user's segments of any daemon that is provably dead,
whatever its run dir, go too (producer/owners.py). It serves as soon as the scan
hands out a plan: the whole one, or an early one of the first files (served.py),
which the loop replaces with the whole one when the rest of the footers are in,
answering the attaches that waited for it (ops.py).

Failure behaviour: malformed or unknown control messages get an `error` reply and
never stop the loop; SIGTERM/SIGINT/`stop` tell every consumer `shutdown`, join
the workers, unlink every segment and remove the sockets.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import WORKER_SOCKET_NAME, control_address, ipc_address
from tokenfeed.common.control import error_kind
from tokenfeed.common.errors import TokenfeedError
from tokenfeed.common.ring import token_dtype
from tokenfeed.common.shm import ring_budget_warning
from tokenfeed.producer import ops
from tokenfeed.producer.admission import Admission
from tokenfeed.producer.backends import verified_backend
from tokenfeed.producer.cache import TokenCache
from tokenfeed.producer.config import PARITY_SAMPLE_BYTES, DaemonConfig, max_workers
from tokenfeed.producer.logs import set_daemon_id
from tokenfeed.producer.metrics import MetricsServer, check_available
from tokenfeed.producer.owners import new_daemon_id, remove_stale_segments
from tokenfeed.producer.pool import Failure, Result, WorkerPool
from tokenfeed.producer.registry import StreamRegistry
from tokenfeed.producer.rundir import RunDir
from tokenfeed.producer.scheduler import schedule
from tokenfeed.producer.served import BackgroundScan, ServedData, check_extends, data_description
from tokenfeed.producer.storage import storage_summary
from tokenfeed.producer.telemetry import advice, totals, val_store_stats, worker_summary
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.producer.valstore import ValStore

log = logging.getLogger(__name__)

LOOP_TICK_S = 0.05
EARLY_WORKERS = 64  # spawned before the data is read; more follow from the loop


class _StopDuringStart(BaseException):
    """SIGTERM/SIGINT before the daemon serves: stop the start where it is (a
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way
    turns it into a data error)."""


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.stopping: str | None = None
        self.rundir = RunDir(config.run_dir)
        self.started = time.time()
        self.worker_restarts = 0  # workers that died (not retired) and were replaced
        self.tokens_tokenized = 0  # tokens workers returned (status: per worker-second)
        self.metrics: MetricsServer | None = None
        self._starting = True  # until the loop runs: SIGTERM/SIGINT end the start at once
        self._whole_plan: Future[ServedData] | None = None  # while serving an early plan
        self._held: dict[bytes, protocol.Message] = {}  # attaches that wait for the whole plan

    # -- start-up -----------------------------------------------------------

    def _check_flags(self) -> None:
        """What can be checked without the data, before anything else happens."""
        control_address(self.rundir.path)
        if self.config.metrics_port is not None:
            check_available()

    def _start_workers(self) -> None:
        """Take the run dir and spawn the workers, before the data is read.

        A worker's start (interpreter, imports, tokenizer: 2.6-3.4 s measured on a loaded
        2-core machine) is most of a daemon's time to its first batch, and needs nothing
        the scan learns: started first, it overlaps the scan (footers, a manifest) and the
        daemon's own tokenizer load. The backend and token size follow in every task
        (`WorkerPool.configure`). If the data then turns out bad, the workers are stopped
        and the error is the same one line as before (nothing was served).
        """
        cfg = self.config
        self.rundir.take()
        remove_stale_segments()  # of killed daemons on any run dir (Slurm: one per job)
        self.daemon_id = new_daemon_id()
        set_daemon_id(self.daemon_id)
        self.rundir.write_info(daemon_id=self.daemon_id, started=self.started,
                               data_dir=data_description(cfg, None), tokenizer=cfg.tokenizer)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pool = WorkerPool(
            self.ctx, ipc_address(self.rundir.path, WORKER_SOCKET_NAME),
            daemon_id=self.daemon_id, tokenizer_spec=cfg.tokenizer, bos=cfg.bos,
            nice=cfg.worker_nice,
        )
        self.pool.resize(cfg.workers)
        while self.pool.size < min(cfg.workers, EARLY_WORKERS) and self.pool.broken is None:
            self.pool.tick()  # the rest are spawned by the loop, SPAWNS_PER_TICK a pass

    def _validate(self) -> None:
        """Check every input before serving anything: bad input exits cleanly."""
        cfg = self.config
        # the tokenizer loads while the scan waits on storage (a manifest or footers over
        # S3 are round trips; cl100k's ranks are ~0.5 s of CPU)
        loading = ThreadPoolExecutor(1, thread_name_prefix="tokenfeed-tokenizer")
        try:
            tokenizer = loading.submit(load_tokenizer, cfg.tokenizer, cfg.bos)
            scanning = BackgroundScan(cfg)
            # a one-source daemon reading every footer serves once its first files' are in
            # (served.scan); the rest of the plan arrives in the loop (_on_whole_plan)
            self.served = scanning.first.result()
            self.tokenizer = tokenizer.result()
            self._whole_plan = None if self.served.complete else scanning.whole
        finally:
            loading.shutdown(wait=True, cancel_futures=True)
        self.weights = dict(self.served.weights)  # live: `tokenfeed mix` replaces it (ops.py)
        self.itemsize = token_dtype(self.tokenizer.n_vocab).itemsize
        self.backend = verified_backend(
            self.tokenizer, cfg.tokenizer_backend,
            self.served.sample_texts(PARITY_SAMPLE_BYTES)
            if cfg.tokenizer_backend != "tiktoken" else [],  # tiktoken needs no parity check
            cfg.on_backend_mismatch,
        )

    def _setup(self) -> None:
        cfg = self.config
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        # zmq drops peers that send frames this large, before they reach Python.
        self.control.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_FRAME_BYTES)
        self.peers = protocol.Peers()  # each client is answered in its protocol version
        self.pool.configure(backend=self.backend, itemsize=self.itemsize)
        if (budget_warning := ring_budget_warning(cfg.max_ring_bytes)) is not None:
            log.warning(budget_warning)  # warn, not refuse: rings are made per attach, each checked
        # cache_key(text column, filter) -> its cache (keys hold it: admission.cache_key)
        self.caches: dict[str, TokenCache] = {}
        if cfg.cache_dir is not None:
            for key in self.served.cache_keys():
                self.caches[key] = TokenCache(cfg.cache_dir, cfg.cache_bytes,
                                              self.tokenizer.identity, self.itemsize, key)
        # Without a token cache, the val split's row groups are kept in memory instead, so
        # a fixed validation set is tokenized once (valstore.py).
        self.val_stores = {} if self.caches else {
            column: ValStore(cfg.val_memory_bytes) for column in self.served.text_columns()}
        self.admission = Admission(self.served.datasets, self.tokenizer, self.caches,
                                   self.val_stores, curve=cfg.schedule, limits=dict(cfg.limits),
                                   filters=self.served.filters,
                                   allow_filter_changes=cfg.allow_filter_changes)
        self.registry = StreamRegistry(
            daemon_id=self.daemon_id, itemsize=self.itemsize, slots=cfg.slots,
            max_ring_bytes=cfg.max_ring_bytes, linger_s=cfg.linger_s,
            consumer_timeout_s=cfg.consumer_timeout_s, task_bytes=cfg.task_bytes,
            on_error=cfg.on_error, send=self.send,
        )
        if cfg.metrics_port is not None:
            self.metrics = MetricsServer(cfg.metrics_host, cfg.metrics_port)
            self.metrics.publish(self.status())
            log.info("metrics at %s", self.metrics.url)
        self.control.bind(control_address(self.rundir.path))
        for name, d in self.served.datasets.items():
            log.info("source %s: %s (train %d row groups, val %d%s)", name, d.root,
                     len(d.splits["train"]), len(d.splits["val"]),
                     "" if d.complete else "; the first files' only, reading the rest")
        log.info("serving with %s (%s), %d workers, at %s", self.tokenizer.name, self.backend,
                 cfg.workers, control_address(self.rundir.path))

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT or a `stop` request; always clean up."""
        self._check_flags()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self._start_workers()
                self._validate()
                self._setup()
            except _StopDuringStart:
                return  # the finally below cleans up, as after a stop while serving
            finally:
                self._starting = False  # from here a signal only sets `stopping`
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
            if self._starting:  # a scan may take a while: stop it where it is
                raise _StopDuringStart(self.stopping)

    def _loop(self) -> None:
        next_beat = 0.0
        # One poller for the life of the loop; worker sentinels come and go with the pool.
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.pool.socket, zmq.POLLIN)
        polled: dict[int, Any] = {}
        # A pass looks only at the streams that changed (stream.py), except a full one: after
        # a heartbeat (which may detach consumers or drop reservations), and when the pool's
        # capacity changed.
        full, capacity = True, self.pool.capacity
        while self.stopping is None:
            self.pool.tick()
            sentinels = self.pool.sentinels()
            for fd in polled.keys() - sentinels.keys():
                poller.unregister(fd)
            for fd in sentinels.keys() - polled.keys():
                poller.register(fd, zmq.POLLIN)
            polled = sentinels
            events = dict(poller.poll(int(LOOP_TICK_S * 1000)))
            if self._whole_plan is not None and self._whole_plan.done():
                self._on_whole_plan(self._whole_plan)
                full = True
            if not (events or full or time.monotonic() >= next_beat or self.pool.broken
                    or self.registry.changed()):
                # Woken by the tick alone: no message, no dead worker, no stream that changed,
                # so nothing to schedule or pack (the beat does the timed work). Serving eight
                # ranks from a warm cache, most wake-ups between messages are such passes.
                continue
            for fd, worker in sentinels.items():
                if fd in events:
                    self.worker_restarts += not worker.retiring
                    for lost in self.pool.reap(worker):
                        self._on_outcome(lost)
            self._drain_control()
            for outcome in self.pool.collect():
                self._on_outcome(outcome)
            full = full or capacity != self.pool.capacity
            capacity = self.pool.capacity
            schedule(self.registry, self.pool, self.config.max_staging_bytes, full)
            self.registry.advance(self.pool.broken, full)
            full = False
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + protocol.HEARTBEAT_INTERVAL_S
                self.registry.beat(now)
                for identity in self._held:
                    self.send(identity, "scanning", message="still reading footers")
                full = True
                if self.metrics is not None:  # scrapes read this copy from their own thread
                    self.metrics.publish(self.status())

    def _on_whole_plan(self, whole: Future[ServedData]) -> None:
        """Every footer is read: streams started on the early plan read on through the
        whole one, and their consumers learn the data's fingerprint (their states carry
        it). A shard found bad now stops the daemon, naming it, as it would have at start."""
        self._whole_plan = None
        held, self._held = self._held, {}
        try:
            served = whole.result()
            check_extends(self.served, served)
        except TokenfeedError as e:
            self.stopping = f"bad data: {e}"
            for identity in held:
                self.send(identity, "error", kind=error_kind(e), message=str(e))
            raise
        self.served = served
        self.admission.datasets = served.datasets
        for stream in self.registry:
            if stream.on_whole_plan(served.datasets):
                for identity in stream.consumers:
                    self.send(identity, "plan", stream=stream.sid, fingerprint=served.fingerprint)
        for name, d in served.datasets.items():
            log.info("source %s: the whole plan is known: train %d row groups, val %d", name,
                     len(d.splits["train"]), len(d.splits["val"]))
        for identity, msg in held.items():
            self._answer(identity, ops.handle, msg)

    def _on_outcome(self, outcome: Result | Failure) -> None:
        if isinstance(outcome, Result):  # worker output only: cache hits cost no worker time
            self.tokens_tokenized += len(outcome.tokens)
        stream = self.registry.get(outcome.task.stream)
        if stream is None:
            return  # the stream was dropped while its task was out
        if isinstance(outcome, Failure):
            stream.on_failure(outcome.task, outcome.error)
        else:
            stream.on_result(outcome)

    def send(self, identity: bytes, op: str, **fields: Any) -> None:
        try:
            self.control.send_multipart([identity, self.peers.encode(identity, op, **fields)])
        except (zmq.ZMQError, TypeError, ValueError, OverflowError) as e:
            log.warning("could not send %r to %r: %s", op, identity[:32], e)

    # -- control requests ---------------------------------------------------

    def _drain_control(self) -> None:
        # EVENTS is the socket's own flag (no system call, unlike a poll(0)), and testing it
        # spares the zmq.Again a non-blocking receive raises on an empty socket (~20 us).
        for _ in range(10_000):
            if not self.control.get(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            if len(frames) != 2:
                self.send(identity, "error", kind="protocol",
                          message=f"expected 1 frame, got {len(frames) - 1}")
            elif protocol.is_releases(frames[1]):  # the hot frame: a struct, not a map
                self._answer(identity, ops.releases, frames[1])
            else:
                self._answer(identity, _request, frames[1])

    def _answer(self, identity: bytes, handler: Callable[..., None], *args: Any) -> None:
        """`handler(self, identity, *args)`; what it raises is the requester's error reply."""
        try:
            handler(self, identity, *args)
        except TokenfeedError as e:
            self.send(identity, "error", kind=error_kind(e), message=str(e))
        except Exception as e:  # a bug must not take the node's data feed down
            log.exception("control request failed")
            self.send(identity, "error", kind="internal", message=f"{type(e).__name__}: {e}")

    def hold_attach(self, identity: bytes, msg: protocol.Message, why: str) -> None:
        """Answer `msg` once the whole plan is known; meanwhile its consumer is told, every
        heartbeat, that the daemon is still reading footers (so it keeps waiting)."""
        self._held[identity] = msg
        log.info("consumer %s: %s waits for the rest of the footers",
                 identity.decode(errors="replace"), why)
        self.send(identity, "scanning", message=f"{why} starts once the daemon has read "
                  "every shard's footer")

    def tokenizer_facts(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"name": tok.name, "identity": tok.identity, "bos_id": tok.bos_id,
                "n_vocab": tok.n_vocab}

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
            "data_dir": data_description(self.config, self.served),
            "plan_complete": self.served.complete,
            "sources": self.served.describe(self.weights),
            "tokenizer": self.tokenizer.name,
            "tokenizer_backend": self.backend,
            "workers": worker_summary(self.pool.stats(), self.worker_restarts,
                                      self.tokens_tokenized, self.pool.size),
            "staging": {"bytes": self.registry.staged(),
                        "budget_bytes": self.config.max_staging_bytes},
            "cache": next((c.stats() for c in self.caches.values()), None),  # the first one
            "val_store": val_store_stats(getattr(self, "val_stores", {})),
            "exclude": self.served.describe_exclusion(),
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
        if not self.rundir.owned:  # another daemon holds the run dir: nothing here is ours
            return
        reason = self.stopping or "daemon exiting"
        if hasattr(self, "registry"):  # a start refused before serving says only why (cli)
            log.info("shutting down (%s)", reason)
            for identity in list(self.registry.peers):
                self.send(identity, "shutdown", reason=reason)
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
        if hasattr(self, "ctx"):
            self.ctx.term()
        self.rundir.release(getattr(self, "daemon_id", None))  # sockets, segments, lock


def _request(d: Daemon, identity: bytes, frame: bytes) -> None:
    """One control request (a msgpack map) from `identity`, handled by its op (ops.py)."""
    msg = protocol.decode(frame)
    d.peers.heard(identity, msg)
    ops.handle(d, identity, msg)


def serve(config: DaemonConfig) -> None:
    """Serve until stopped (a start stopped mid-scan may leave the scan's thread waiting
    on storage: the caller ends the process without waiting for it, cli.py)."""
    Daemon(config).run()

