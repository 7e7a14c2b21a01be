"""The `no_leaks` fixture fails a test that leaves a thread, socket, process or segment behind.

An inner pytest run, with this suite's conftest, holds one test per kind of leak
and one clean test; each leak is also undone at the inner run's exit so nothing
outlives it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent

LEAKY = textwrap.dedent("""
    import atexit, subprocess, threading, uuid
    import zmq
    from tokenfeed.common.shm import Segment, segment_name

    def test_clean():
        pass

    def test_leaks_thread():
        stop = threading.Event()
        atexit.register(stop.set)
        threading.Thread(target=stop.wait, name="leaky-thread", daemon=True).start()

    def test_leaks_child_process():
        proc = subprocess.Popen(["sleep", "60"])
        atexit.register(proc.wait)
        atexit.register(proc.kill)

    def test_leaks_socket():
        sock = zmq.Context.instance().socket(zmq.DEALER)
        atexit.register(sock.close, 0)

    def test_leaks_segment():
        segment = Segment.create(segment_name(f"test-{uuid.uuid4().hex}", "leaky"), 4096)
        atexit.register(segment.unlink)
""")


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_no_leaks_fails_each_kind_of_leak_and_passes_a_clean_test(tmp_path):
    for name in ("conftest.py", "oracle.py"):
        shutil.copy(TESTS_DIR / name, tmp_path / name)
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "PASSED test_leaky.py::test_clean" in out, out
    lines = out.splitlines()
    for test, leak in [("thread", "thread leaky-thread"), ("child_process", "child process"),
                       ("socket", "1 open ZeroMQ socket(s)"), ("segment", "segment /dev/shm/")]:
        header = [i for i, line in enumerate(lines)
                  if f"ERROR at teardown of test_leaks_{test} " in line]
        assert header, out
        assert lines[header[0] + 1].startswith(f"the test left behind: {leak}"), out
    assert "5 passed, 4 errors" in out, out
