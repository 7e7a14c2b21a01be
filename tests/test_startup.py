"""Start-up order: the workers start while the daemon still reads its shards' footers.

A worker's start (interpreter, imports, tokenizer) is most of the time to a first batch,
and needs nothing the scan learns, so the daemon spawns its workers before it scans; the
backend and token size then travel with every task. Over S3 behind a proxy that holds
every reply (its body trickles) until the test lets it go, the scan cannot end before
the workers are seen: they must exist while the control socket does not yet, however
loaded the machine. The batches stay the oracle's; a SIGTERM in that window stops the
start and leaves no process or segment behind. Orders and counts are asserted here,
never times (benchmarks/startup.py measures those).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENCODING, assert_batch_equals, pid_alive
from s3proxy import FaultProxy
from test_object_storage import s3, upload  # noqa: F401  (s3: the moto fixture)

from tokenfeed.common.control import request
from tokenfeed.common.errors import DaemonUnavailableError
from tokenfeed.common.shm import SHM_DIR, segment_name
from tokenfeed.producer.worker import task_encoding

B, T = 4, 256
WAIT_S = 60.0


@pytest.fixture
def slow_proxy(s3: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:  # noqa: F811
    """Every reply from moto held until `proxy.held` is set; daemons started after this go
    through it."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], held=threading.Event()) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture
def serve() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`tokenfeed serve` processes started by a test; killed at teardown if still running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_serving(procs: list[subprocess.Popen[bytes]], url: str, workers: int,
                  ) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir = Path(tempfile.mkdtemp(prefix="tfs-", dir="/tmp"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", url, "--run-dir",
         str(run_dir), "--tokenizer", ENCODING, "--tokenizer-backend", "tiktoken",
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc, run_dir


def children(pid: int) -> dict[int, bytes]:
    """pid -> command line of each of `pid`'s child processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def worker_children(pid: int) -> list[int]:
    """Pids of `pid`'s worker processes: the children of its fork server."""
    servers = [c for c, cmd in children(pid).items() if b"forkserver" in cmd]
    return [w for server in servers for w in children(server)]


def wait_for_workers_before_serving(proc: subprocess.Popen[bytes], run_dir: Path,
                                    workers: int) -> list[int]:
    """The daemon's worker pids, seen while its control socket does not exist yet."""
    deadline = time.monotonic() + WAIT_S
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        serving = (run_dir / "control").exists()
        pids = worker_children(proc.pid)
        if len(pids) == workers:
            assert not serving, "the workers started only after the daemon served"
            return pids
        assert not serving, f"serving with {len(pids)} of {workers} workers spawned"
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.02)


def test_workers_start_while_the_footers_are_read_and_batches_stay_exact(
        corpus, oracle, s3, slow_proxy, serve):  # noqa: F811
    url = upload(s3, corpus, "early")
    proc, run_dir = start_serving(serve, url, workers=2)
    wait_for_workers_before_serving(proc, run_dir, workers=2)
    slow_proxy.held.set()  # the window was seen: let the scan finish
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            request(run_dir, "status", timeout_s=1.0)
            break
        except DaemonUnavailableError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the daemon never served"
            time.sleep(0.05)
    from tokenfeed.consumer import TokenFeed

    want = oracle(batch_size=B, seq_len=T, n=6)
    with TokenFeed(B, T, run_dir=run_dir, device="cpu") as feed:
        for k, window in enumerate(want):
            assert_batch_equals(next(feed), window, f"batch {k}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == 0


def test_sigterm_while_the_footers_are_read_stops_the_start_and_leaves_nothing(
        corpus, s3, slow_proxy, serve):  # noqa: F811
    url = upload(s3, corpus, "stopped")
    proc, run_dir = start_serving(serve, url, workers=2)
    pids = wait_for_workers_before_serving(proc, run_dir, workers=2)
    daemon_id = json.loads((run_dir / "daemon.json").read_text())["daemon_id"]
    assert sorted(SHM_DIR.glob(segment_name(daemon_id, "") + "*"))  # the workers' staging
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=WAIT_S)
    err = proc.stderr.read().decode() if proc.stderr is not None else ""
    assert code == 0 and "Traceback" not in err, err
    deadline = time.monotonic() + WAIT_S
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, "a worker outlived its stopped daemon"
        time.sleep(0.05)
    assert sorted(SHM_DIR.glob(segment_name(daemon_id, "") + "*")) == []
    assert not (run_dir / "daemon.json").exists()


@pytest.mark.parametrize("fields", [{}, {"backend": "", "itemsize": 4},
                                    {"backend": "tiktoken", "itemsize": 3},
                                    {"backend": "tiktoken", "itemsize": True},
                                    {"backend": 7, "itemsize": 2}])
def test_a_task_without_a_valid_backend_or_token_size_is_refused(fields):
    from tokenfeed.common.errors import ProtocolError

    with pytest.raises(ProtocolError, match=r"backend|itemsize"):
        task_encoding({"op": "task", **fields})


def test_a_task_names_its_backend_and_token_size():
    assert task_encoding({"op": "task", "backend": "tiktoken", "itemsize": 2}) == ("tiktoken", 2)
