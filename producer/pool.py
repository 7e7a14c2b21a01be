"""The pool of tokenizer worker processes: spawn, assign, collect, respawn, resize.

Workers are OS processes (`multiprocess`, forked from a fork server that has their
imports and tokenizer loaded, worker_preload.py: no inherited ZeroMQ state) that
connect a DEALER to the daemon's ROUTER at `ipc://<run_dir>/workers` and speak
the worker channel of common/protocol.py.
Each owns nothing: its two staging buffers are segments created and unlinked
here, so a crashed worker leaves no memory behind. A worker holds up to
QUEUE_DEPTH tasks, one per staging buffer; a buffer is given a new task only
after the result in it was copied out, so a worker never overwrites a result the
daemon has not taken.

Every frame on the worker socket is untrusted (any process of the user can
connect): a message that is malformed, from an unknown identity, or about a task
the worker does not hold is logged and dropped; a `done` whose sizes do not fit
its staging buffer fails that task (it is re-run). Nothing a peer sends can stop
the daemon's loop.

Failure behaviour: a worker that dies (its process sentinel becomes readable) is
reported with the tasks it held so the caller can re-run them, and is replaced
while the pool's target size says so. Growing spawns at most SPAWNS_PER_TICK
workers per loop pass, so a large `scale` never stalls heartbeats. Shrinking
retires idle workers first; a busy one retires after its tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import multiprocess as mp
import numpy as np
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.errors import ProtocolError, TokenfeedError
from tokenfeed.common.protocol import TaskKey
from tokenfeed.common.ring import token_dtype_of_size
from tokenfeed.common.shm import Segment, segment_name
from tokenfeed.producer.worker import (
    NO_TOKENIZER_EXIT,
    PRELOAD_ENV,
    worker_main,
    worker_niceness,
)

log = logging.getLogger(__name__)

MAX_START_FAILURES = 5  # workers dying before their hello, in a row: stop respawning
QUEUE_DEPTH = 2  # tasks a worker holds: it starts the next while the daemon takes the last
STAGING_BYTES = 4 << 20  # per buffer, reserved in /dev/shm: a 1 MiB-text task needs ~1 MiB; grows
SPAWNS_PER_TICK = 2  # a spawn costs a few ms of the loop; heartbeats go every 500 ms
JOIN_TIMEOUT_S = 5.0


@dataclass
class Task:
    """Rows `rows[0]:rows[1]` of one row group: part `part` of unit `unit` of source
    `source` (its index in the stream) of stream `stream`."""

    stream: int
    source: int
    unit: int
    part: int
    path: str
    row_group: int
    column: str
    rows: tuple[int, int]
    doc_seed: list[int] | None = None
    text_bytes: int = 0  # of the rows, estimated from the footer: sizes the staging estimate
    stamp: str = ""  # the shard's "<size>:<mtime>" when listed: a worker refuses a changed one
    filter: str = ""  # the source's filter, normalized (filters.py); "": every document


@dataclass
class Result:
    task: Task
    tokens: np.ndarray
    doc_starts: np.ndarray
    skipped: int
    row_tokens: np.ndarray  # tokens of each row in the task's order; 0: skipped

    @classmethod
    def of_rows(cls, task: Task, tokens: np.ndarray, row_tokens: np.ndarray) -> Result:
        starts = np.cumsum(row_tokens) - row_tokens
        kept = row_tokens > 0
        return cls(task, tokens, starts[kept], int(len(row_tokens) - kept.sum()), row_tokens)


@dataclass
class Failure:
    task: Task
    error: str


@dataclass
class Worker:
    wid: int
    process: Any
    staging: list[Segment]  # one per buffer
    started: Future[None]  # the process's start: a fork from the fork server
    generation: int = 0
    ready: bool = False
    tasks: dict[int, Task] = field(default_factory=dict)  # buffer index -> task held
    keys: dict[int, TaskKey] = field(default_factory=dict)  # buffer index -> its wire key
    retiring: bool = False
    last_row_group: tuple[str, int] | None = None  # what its reader has decoded
    up: bool = False  # `started` completed without an exception (settled: never changes)

    @property
    def identity(self) -> bytes:
        return f"w{self.wid}".encode()

    def buffer_of(self, key: TaskKey) -> int | None:
        return next((b for b, k in self.keys.items() if k == key and b in self.tasks), None)


class WorkerPool:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        *,
        daemon_id: str,
        tokenizer_spec: str,
        bos: str | None,
        nice: int,
        backend: str = "",
        itemsize: int = 0,
    ) -> None:
        self.address = address
        self.daemon_id = daemon_id
        self.tokenizer_spec = tokenizer_spec
        self.bos = bos
        self.nice = nice
        self.backend, self.itemsize = "", 0
        if backend:
            self.configure(backend=backend, itemsize=itemsize)
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_FRAME_BYTES)
        self.socket.bind(address)
        self.workers: dict[int, Worker] = {}
        self.target = 0
        self.serial = 0  # tasks assigned so far: the first field of a task's wire key
        self._next_wid = 0
        # Workers fork from a server that has their imports and tokenizer loaded
        # (worker_preload.py); the daemon itself never forks.
        self._mp = mp.get_context("forkserver")
        self._mp.set_forkserver_preload(["tokenfeed.producer.worker_preload"])
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="tokenfeed-fork")
        os.environ[PRELOAD_ENV] = json.dumps(
            {"spec": tokenizer_spec, "bos": bos, "niceness": worker_niceness(nice)})
        self.start_failures = 0
        self.broken: str | None = None  # set when workers keep dying at start
        self.read_s = 0.0  # seconds workers spent reading Parquet, over all tasks
        self.storage_retries = self.storage_failed = 0  # object-storage requests (storage.py)
        self.tokenize_s = 0.0
        self.tasks_done = 0
        self.dropped_messages = 0

    def configure(self, *, backend: str, itemsize: int) -> None:
        """The backend and token size every task is run with (each task names them).

        Separate from the constructor so that workers can be spawned before the daemon
        knows them: a worker's start (interpreter, imports, tokenizer: ~2.5 s on a loaded
        2-core machine) then overlaps the daemon's own start (scan, tokenizer, backend
        check) instead of following it. No task is assigned before this is called.
        """
        self.backend, self.itemsize = backend, itemsize
        self.dtype = token_dtype_of_size(itemsize)

    # -- size ---------------------------------------------------------------

    def resize(self, n: int) -> None:
        """Set the target size: growth happens in `tick`; shrinking retires idle workers first."""
        self.target = n
        live = [w for w in self.workers.values() if not w.retiring]
        excess = len(live) - n
        for w in sorted(live, key=lambda w: len(w.tasks)):
            if excess <= 0:
                break
            w.retiring = True
            excess -= 1
            if not w.tasks:
                self._retire(w)

    def tick(self) -> None:
        """Spawn up to SPAWNS_PER_TICK of the workers the target still lacks."""
        # Each start is looked at until it settles, not every pass: a future's done() and
        # exception() take a lock each, and the loop passes hundreds of times a second.
        for w in [w for w in self.workers.values() if not w.up and w.started.done()]:
            if w.started.exception() is not None:  # the fork server died mid-start
                self._remove(w)
                self._count_start_failure(f"could not fork it: {w.started.exception()}")
            else:
                w.up = True
        for _ in range(min(SPAWNS_PER_TICK, self.target - self.size)):
            if self.broken is not None:
                return
            try:
                self._spawn()
            except TokenfeedError as e:  # e.g. no room in /dev/shm for its staging
                self.broken = f"cannot start a tokenizer worker: {e}"
                log.error(self.broken)

    def _spawn(self) -> None:
        wid = self._next_wid
        self._next_wid += 1
        staging: list[Segment] = []
        try:
            for b in range(QUEUE_DEPTH):
                staging.append(Segment.create(segment_name(self.daemon_id, f"w{wid}-{b}-0"),
                                              STAGING_BYTES))
            process = self._mp.Process(
                target=worker_main,
                args=(wid, self.address, self.tokenizer_spec, self.bos, self.nice,
                      os.getpid()),
                name=f"tokenfeed-worker-{wid}",
                daemon=True,
            )
        except BaseException:
            for seg in staging:
                seg.close()
                seg.unlink()
            raise
        # Off the loop: a fork is milliseconds, but a fork server (re)starting loads the
        # tokenizer first, and heartbeats must not wait for that.
        self.workers[wid] = Worker(wid, process, staging, self._starter.submit(self._start,
                                                                                 process))

    def _start(self, process: Any) -> None:
        process.start()
        if self.nice:
            # From its first instruction, not from worker_main: a worker's start-up at
            # full weight took the cores a daemon serving from the token cache needs
            # (second daemon: 35.93-43.47 M tokens/s while its workers start,
            # 144.51-147.42 once they are up).
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, process.pid, worker_niceness(self.nice))
        # before configure() the daemon has not checked its data yet: a refused start
        # says only why (one line), so this is debug until then
        log.log(logging.INFO if self.backend else logging.DEBUG, "%s started (pid %d)",
                process.name, process.pid)

    def _retire(self, w: Worker) -> None:
        self.socket.send_multipart([w.identity, protocol.encode("exit")])

    def _remove(self, w: Worker) -> None:
        self.workers.pop(w.wid, None)
        for seg in w.staging:
            seg.close()
            seg.unlink()

    # -- work ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return sum(1 for w in self.workers.values() if not w.retiring)

    @property
    def capacity(self) -> int:
        """Tasks the pool can hold at once when every worker is up."""
        return max(self.target, 1) * QUEUE_DEPTH

    def free(self) -> list[Worker]:
        """Workers that can take a task, least loaded first (an idle core before a queue)."""
        ready = [w for w in self.workers.values()
                 if w.ready and not w.retiring and len(w.tasks) < QUEUE_DEPTH]
        return sorted(ready, key=lambda w: len(w.tasks))

    def busy_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.tasks)

    def inflight(self) -> int:
        return sum(len(w.tasks) for w in self.workers.values())

    def assign(self, w: Worker, task: Task) -> None:
        assert self.backend, "configure() before the first task"
        b = next(i for i in range(QUEUE_DEPTH) if i not in w.tasks)
        self.serial += 1  # on the wire a task is [serial, unit, part]: unique per daemon
        key = (self.serial, task.unit, task.part)
        msg = protocol.encode(
            "task", task=list(key), buffer=b, staging=w.staging[b].name, path=task.path,
            row_group=task.row_group, column=task.column, rows=list(task.rows),
            doc_seed=task.doc_seed, stamp=task.stamp, backend=self.backend,
            itemsize=self.itemsize, **({"filter": task.filter} if task.filter else {}),
        )
        w.tasks[b] = task  # only once the message exists: a failed encode leaves the worker idle
        w.keys[b] = key
        w.last_row_group = (task.path, task.row_group)
        self.socket.send_multipart([w.identity, msg])

    def sentinels(self) -> dict[int, Worker]:
        return {w.process.sentinel: w for w in self._running()}

    def _running(self) -> list[Worker]:
        """Workers whose process has started (a fork can still be on its way)."""
        for w in self.workers.values():
            w.up = w.up or (w.started.done() and w.started.exception() is None)
        return [w for w in self.workers.values() if w.up]

    def collect(self) -> list[Result | Failure]:
        """Drain worker messages without blocking; drop (and count) whatever is malformed."""
        out: list[Result | Failure] = []
        for _ in range(10_000):  # bounded: a flood must not starve the control socket
            if not self.socket.poll(0):
                break
            frames = self.socket.recv_multipart()
            try:
                if len(frames) != 2:
                    raise ProtocolError(f"expected 1 frame, got {len(frames) - 1}")
                msg = protocol.decode_worker(frames[1])
                w = self._worker_of(frames[0])
                outcome = self._handle(w, msg)
            except ProtocolError as e:
                self.dropped_messages += 1
                log.warning("dropped a worker-channel message from %r: %s", frames[0][:32], e)
                continue
            if outcome is not None:
                out.append(outcome)
            if w.retiring and not w.tasks and msg["op"] in ("done", "failed", "grow"):
                self._retire(w)
        return out

    def _worker_of(self, identity: bytes) -> Worker:
        w = None
        if identity[:1] == b"w" and identity[1:].isdigit() and len(identity) < 12:
            w = self.workers.get(int(identity[1:]))
        if w is None:
            raise ProtocolError("not a live worker of this daemon")
        return w

    def _handle(self, w: Worker, msg: protocol.Message) -> Result | Failure | None:
        op = msg["op"]
        if op == "hello":
            w.ready = True
            self.start_failures = 0
            if w.retiring:  # shrunk before it finished starting
                self._retire(w)
            return None
        if op not in ("done", "failed", "grow"):
            raise ProtocolError(f"op {op!r} is not sent by workers")
        b = w.buffer_of(protocol.task_key(msg))
        if b is None:
            raise ProtocolError(f"task {msg['task']} is not held by worker {w.wid}")
        if op == "grow":
            return self._grow(w, b, msg["need_bytes"])
        retries = protocol.optional_count(msg, "retries")  # checked before the task is taken
        self.storage_failed += protocol.optional_count(msg, "failed_requests")
        self.storage_retries += retries
        task = w.tasks.pop(b)
        if op == "failed":
            return Failure(task, msg["error"])
        return self._take_result(w, b, task, msg)

    def _take_result(
        self, w: Worker, b: int, task: Task, msg: protocol.Message
    ) -> Result | Failure:
        n_tokens, n_rows, rows_offset = msg["n_tokens"], msg["n_rows"], msg["rows_offset"]
        seg = w.staging[b]
        if (n_tokens * self.itemsize > rows_offset or rows_offset % 8
                or rows_offset + 8 * n_rows > seg.size or n_rows != task.rows[1] - task.rows[0]):
            return Failure(task, f"worker {w.wid} reported {n_tokens} tokens and {n_rows} rows "
                                 f"at offset {rows_offset}, which do not fit its "
                                 f"{seg.size}-byte staging buffer or its task's rows")
        # Copy out of staging so the buffer is free for the worker's next task at once.
        tokens = np.ndarray(n_tokens, dtype=self.dtype, buffer=seg.mm).copy()
        row_tokens = np.ndarray(n_rows, dtype=np.int64, buffer=seg.mm, offset=rows_offset).copy()
        if int(row_tokens.sum()) != n_tokens or (row_tokens < 0).any():
            return Failure(task, f"worker {w.wid} reported row lengths that do not add up to "
                                 f"its {n_tokens} tokens")
        self.read_s += msg["read_s"]
        self.tokenize_s += msg["tokenize_s"]
        self.tasks_done += 1
        return Result.of_rows(task, tokens, row_tokens)

    def _grow(self, w: Worker, b: int, need_bytes: int) -> Failure | None:
        """A bigger staging buffer `b` for the task in it; on failure, fail that task."""
        w.generation += 1
        size = max(need_bytes, 2 * w.staging[b].size)
        try:
            new = Segment.create(
                segment_name(self.daemon_id, f"w{w.wid}-{b}-{w.generation}"), size)
        except (TokenfeedError, OSError) as e:
            self.socket.send_multipart([w.identity, protocol.encode("staging", buffer=b,
                                                                    name="")])
            task = w.tasks.pop(b)
            return Failure(task, f"no staging buffer of {size} bytes for worker {w.wid}: {e}")
        w.staging[b].close()
        w.staging[b].unlink()
        w.staging[b] = new
        log.info("worker %d staging buffer %d grown to %d MiB", w.wid, b, size >> 20)
        self.socket.send_multipart([w.identity,
                                    protocol.encode("staging", buffer=b, name=new.name)])
        return None

    def reap(self, w: Worker) -> list[Failure]:
        """A worker's sentinel fired: clean it up and return the tasks it held."""
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        self._remove(w)
        if not w.ready and not w.retiring:
            self._count_start_failure(
                "the tokenizer did not load" if code == NO_TOKENIZER_EXIT
                else f"last exit code {code}")
        if not w.retiring:
            log.warning("worker %d died (exit code %s); a new one replaces it", w.wid, code)
        return [Failure(t, f"worker {w.wid} died with exit code {code}")
                for t in w.tasks.values()]

    def _count_start_failure(self, why: str) -> None:
        self.start_failures += 1
        if self.start_failures >= MAX_START_FAILURES:
            self.broken = (
                f"tokenizer workers died before starting {self.start_failures} times in a row "
                f"({why}); see the daemon's log, fix, restart the daemon")
            log.error(self.broken)

    def stats(self) -> dict[str, Any]:
        return {
            "target": self.target, "alive": len(self.workers), "busy": self.busy_count(),
            "tasks_inflight": self.inflight(), "tasks_done": self.tasks_done,
            "read_s": round(self.read_s, 3), "tokenize_s": round(self.tokenize_s, 3),
            "dropped_messages": self.dropped_messages,
            "storage_retries": self.storage_retries, "storage_failed": self.storage_failed,
            "pids": [w.process.pid for w in self._running()],
        }

    def close(self) -> None:
        """Ask ready workers to exit, stop the ones still starting, kill what lingers."""
        self._starter.shutdown(wait=True)  # every fork answered: each has a pid, or failed
        for w in [w for w in list(self.workers.values()) if w not in self._running()]:
            self._remove(w)
        for w in list(self.workers.values()):
            if w.ready:
                with contextlib.suppress(zmq.ZMQError):
                    self._retire(w)
            else:  # not connected yet: a message would be dropped by the ROUTER
                w.process.terminate()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for w in list(self.workers.values()):
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=JOIN_TIMEOUT_S)
            self._remove(w)
        self.socket.close(linger=0)
