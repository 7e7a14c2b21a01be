"""The pool of tokenizer worker processes: spawn, assign, collect, respawn, resize.

Workers are OS processes (`multiprocess`, spawn start method: no inherited
ZeroMQ state) that connect a DEALER to the daemon's ROUTER at
`ipc://<run_dir>/workers`. Each owns nothing: its staging segment is created and
unlinked here, so a crashed worker leaves no memory behind.

Failure behaviour: a worker that dies (its process sentinel becomes readable) is
reported with the unit it held so the caller can re-run it, and is replaced while
the pool's target size says so. Shrinking retires idle workers first; a busy one
retires after its unit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import multiprocess as mp
import numpy as np
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.shm import Segment, segment_name
from tokenfeed.producer.worker import worker_main

log = logging.getLogger(__name__)

MAX_START_FAILURES = 5  # workers dying before their hello, in a row: stop respawning
STAGING_BYTES = 32 << 20  # pages are only committed when touched; grows on demand
JOIN_TIMEOUT_S = 5.0


@dataclass
class Task:
    """One row group of one stream, as sent to a worker."""

    stream: int
    unit: int
    path: str
    row_group: int
    column: str
    doc_seed: list[int] | None = None

    @property
    def key(self) -> list[int]:
        return [self.stream, self.unit]


@dataclass
class Result:
    task: Task
    tokens: np.ndarray
    doc_starts: np.ndarray
    skipped: int


@dataclass
class Failure:
    task: Task
    error: str
    worker_died: bool


@dataclass
class Worker:
    wid: int
    process: Any
    staging: Segment
    generation: int = 0
    ready: bool = False
    task: Task | None = None
    retiring: bool = False


class WorkerPool:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        *,
        daemon_id: str,
        tokenizer_spec: str,
        bos: str | None,
        itemsize: int,
        nice: int,
    ) -> None:
        self.address = address
        self.daemon_id = daemon_id
        self.tokenizer_spec = tokenizer_spec
        self.bos = bos
        self.itemsize = itemsize
        self.nice = nice
        self.dtype = np.dtype({2: np.uint16, 4: np.uint32}[itemsize])
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.workers: dict[int, Worker] = {}
        self.target = 0
        self._next_wid = 0
        self._mp = mp.get_context("spawn")
        self.start_failures = 0
        self.broken: str | None = None  # set when workers keep dying at start

    # -- size ---------------------------------------------------------------

    def resize(self, n: int) -> None:
        """Grow at once; shrink by retiring idle workers first, busy ones after their unit."""
        self.target = n
        live = [w for w in self.workers.values() if not w.retiring]
        for _ in range(n - len(live)):
            self._spawn()
        excess = len(live) - n
        for w in sorted(live, key=lambda w: w.task is not None):
            if excess <= 0:
                break
            w.retiring = True
            excess -= 1
            if w.task is None:
                self._retire(w)

    def _spawn(self) -> None:
        wid = self._next_wid
        self._next_wid += 1
        staging = Segment.create(segment_name(self.daemon_id, f"w{wid}-0"), STAGING_BYTES)
        process = self._mp.Process(
            target=worker_main,
            args=(wid, self.address, self.tokenizer_spec, self.bos, self.itemsize,
                  staging.name, self.nice, os.getpid()),
            name=f"tokenfeed-worker-{wid}",
            daemon=True,
        )
        process.start()
        self.workers[wid] = Worker(wid, process, staging)
        log.info("worker %d started (pid %d)", wid, process.pid)

    def _retire(self, w: Worker) -> None:
        self.socket.send_multipart([f"w{w.wid}".encode(), protocol.encode("exit")])

    def _remove(self, w: Worker) -> None:
        self.workers.pop(w.wid, None)
        w.staging.close()
        w.staging.unlink()

    # -- work ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return sum(1 for w in self.workers.values() if not w.retiring)

    def idle(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.ready and w.task is None and not w.retiring]

    def busy_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.task is not None)

    def assign(self, w: Worker, task: Task) -> None:
        msg = protocol.encode(
            "unit", unit=task.key, path=task.path, row_group=task.row_group,
            column=task.column, doc_seed=task.doc_seed,
        )
        w.task = task  # only once the message exists: a failed encode leaves the worker idle
        self.socket.send_multipart([f"w{w.wid}".encode(), msg])

    def sentinels(self) -> dict[int, Worker]:
        return {w.process.sentinel: w for w in self.workers.values()}

    def collect(self) -> list[Result | Failure]:
        """Drain worker messages without blocking."""
        out: list[Result | Failure] = []
        while self.socket.poll(0):
            identity, frame = self.socket.recv_multipart()
            try:
                msg = protocol.decode(frame)
                w = self.workers[int(identity[1:])]
            except Exception as e:
                log.warning("dropping a worker message (%s)", e)
                continue
            op = msg["op"]
            if op == "hello":
                w.ready = True
                self.start_failures = 0
                if w.retiring:  # shrunk before it finished starting
                    self._retire(w)
            elif op == "done" and w.task is not None:
                out.append(self._take_result(w, msg))
            elif op == "failed" and w.task is not None:
                out.append(Failure(w.task, str(msg.get("error")), worker_died=False))
                w.task = None
            elif op == "grow":
                self._grow(w, int(msg["need_bytes"]))
            if w.retiring and w.task is None and op in ("done", "failed"):
                self._retire(w)
        return out

    def _take_result(self, w: Worker, msg: protocol.Message) -> Result:
        assert w.task is not None
        n_tokens, n_docs = int(msg["n_tokens"]), int(msg["n_docs"])
        # Copy out of staging so the worker is free for its next unit at once.
        tokens = np.ndarray(n_tokens, dtype=self.dtype, buffer=w.staging.mm).copy()
        starts = np.ndarray(
            n_docs, dtype=np.int64, buffer=w.staging.mm, offset=int(msg["starts_offset"])
        ).copy()
        result = Result(w.task, tokens, starts, int(msg["skipped"]))
        w.task = None
        return result

    def _grow(self, w: Worker, need_bytes: int) -> None:
        w.generation += 1
        size = max(need_bytes, 2 * w.staging.size)
        new = Segment.create(segment_name(self.daemon_id, f"w{w.wid}-{w.generation}"), size)
        w.staging.close()
        w.staging.unlink()
        w.staging = new
        log.info("worker %d staging grown to %d MiB", w.wid, size >> 20)
        reply = protocol.encode("staging", name=new.name)
        self.socket.send_multipart([f"w{w.wid}".encode(), reply])

    def reap(self, w: Worker) -> Failure | None:
        """A worker's sentinel fired: clean it up, respawn if needed, return its lost task."""
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        lost = w.task
        self._remove(w)
        if not w.ready and not w.retiring:
            self.start_failures += 1
            if self.start_failures >= MAX_START_FAILURES:
                self.broken = (
                    f"tokenizer workers died before starting {self.start_failures} times in a "
                    f"row (last exit code {code}); see the daemon's log, fix, restart the daemon"
                )
                log.error(self.broken)
        if not w.retiring:
            log.warning("worker %d died (exit code %s); respawning", w.wid, code)
        while self.size < self.target and self.broken is None:
            self._spawn()
        if lost is None:
            return None
        return Failure(lost, f"worker {w.wid} died with exit code {code}", worker_died=True)

    def close(self) -> None:
        """Ask ready workers to exit, stop the ones still starting, kill what lingers."""
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
