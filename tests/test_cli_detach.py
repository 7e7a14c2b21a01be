"""`tokenfeed serve --detach`: start in the background, return once the daemon answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENCODING, pid_alive

from tokenfeed.common.shm import SHM_DIR, segment_name
from tokenfeed.consumer import TokenFeed


def tokenfeed(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfeed.producer", *args],
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short run dir; whatever daemon is left on it is stopped at teardown."""
    path = Path(tempfile.mkdtemp(prefix="tfd-", dir="/tmp"))
    yield path
    info = path / "daemon.json"
    if info.exists():
        pid = int(json.loads(info.read_text())["pid"])
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(path)], check=False)


def serve_detached(corpus: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return tokenfeed("serve", "--detach", "--data", str(corpus), "--run-dir", str(run_dir),
                     "--tokenizer", ENCODING, "--workers", "1", *extra)


def test_serve_detach_returns_once_the_daemon_answers_and_stop_ends_it(corpus, run_dir):
    started = serve_detached(corpus, run_dir, "--de")  # an abbreviation detaches once only
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == str(run_dir)  # `RUN_DIR=$(tokenfeed serve --detach ...)`
    # The command returned only after the control socket answered: a feed attaches at once.
    with TokenFeed(2, 64, run_dir=run_dir, device="cpu") as feed:
        next(feed)
    status = tokenfeed("status", "--json", "--run-dir", str(run_dir))
    info = json.loads(status.stdout)
    pid, daemon_id = int(info["pid"]), info["daemon_id"]
    log = (run_dir / "daemon.log").read_text()
    assert "serving" in log and "attached to stream 0" in log
    stopped = tokenfeed("stop", "--run-dir", str(run_dir))
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the detached daemon ignored `tokenfeed stop`"
        time.sleep(0.05)
    assert list(SHM_DIR.glob(segment_name(daemon_id, "") + "*")) == []


def test_serve_detach_with_bad_data_exits_2_with_the_daemons_error(tmp_path, run_dir):
    result = tokenfeed("serve", "--detach", "--data", str(tmp_path / "nope"),
                       "--run-dir", str(run_dir))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "--data" in lines[0], lines


def test_serve_detach_on_a_served_run_dir_fails_instead_of_reporting_the_other_daemon(
    corpus, run_dir
):
    first = serve_detached(corpus, run_dir)
    assert first.returncode == 0, first.stderr
    second = serve_detached(corpus, run_dir)
    assert second.returncode == 2, second.stderr
    assert "already serves" in second.stderr
    assert tokenfeed("stop", "--run-dir", str(run_dir)).returncode == 0
