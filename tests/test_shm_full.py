"""A full /dev/shm is a clear error on the attach that needs the room, never a SIGBUS.

The end-to-end test runs a daemon and its consumers in a private mount namespace
with a 40 MiB tmpfs on /dev/shm (`unshare -m`, root only): one worker's staging
and a small ring fit, and a ring sized past the space left cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from tokenfeed.common.errors import ShmFullError
from tokenfeed.common.shm import SHM_DIR, Segment, ring_budget_warning, segment_name, shm_space

TESTS_DIR = Path(__file__).parent


def test_segment_larger_than_dev_shm_raises_shm_full_naming_bytes_and_fix():
    _, total = shm_space()
    if total == 0:
        pytest.skip("/dev/shm has no size limit here")
    size = total + 4096  # tmpfs refuses at once: nothing is allocated, even for a moment
    name = segment_name(f"test-{uuid.uuid4().hex}", "big")
    with pytest.raises(ShmFullError) as info:
        Segment.create(name, size)
    message = str(info.value)
    assert f"{size:,} bytes" in message and "free" in message
    assert "--shm-size" in message and "--max-ring-mib" in message
    assert not (SHM_DIR / name).exists()


def test_segment_pages_are_reserved_at_creation():
    name = segment_name(f"test-{uuid.uuid4().hex}", "reserved")
    segment = Segment.create(name, 1 << 20)
    try:
        st = os.stat(SHM_DIR / name)
        assert st.st_blocks * 512 >= 1 << 20  # committed now, not on first write
    finally:
        segment.unlink()
        segment.close()


def test_ring_budget_warning_only_when_the_budget_exceeds_free_shm():
    free, _ = shm_space()
    assert ring_budget_warning(min(free, 1 << 20)) is None
    warning = ring_budget_warning(free + (1 << 30))
    assert warning is not None
    assert f"--max-ring-mib {(free + (1 << 30)) >> 20}" in warning and "--shm-size" in warning


PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from conftest import Daemon
    from tokenfeed.common.errors import ShmFullError
    from tokenfeed.common.shm import SHM_DIR, shm_space

    out = {}
    daemon = Daemon(Path(sys.argv[2]), workers=1, slots=4)
    try:
        small = daemon.feed(2, 64)
        first = [next(small)[0] for _ in range(2)]
        free, _ = shm_space()  # what the worker's staging and the small ring left
        big = daemon.feed(64, free // (4 * 64 * 4) + 1024)  # 4 slots x 64 rows x uint32: > free
        try:
            next(big)
            out["big"] = "attached"
        except ShmFullError as e:
            out["big"] = str(e)
        finally:
            big.close()
        first += [next(small)[0] for _ in range(2)]
        other = daemon.feed(2, 64, rank=1, world_size=2)
        out["other_rank"] = next(other)[0].tolist()
        other.close()
        small.close()
        out["small"] = [x.tolist() for x in first]
        out["alive_after"] = daemon.proc.poll() is None
        out["warned"] = "--max-ring-mib 8192" in daemon.log()
        out["exit_code"] = daemon.stop()
        out["left"] = sorted(p.name for p in SHM_DIR.glob("tokenfeed-*"))
    finally:
        out["log"] = daemon.log()
        daemon.cleanup()
    print(json.dumps(out))
""")


def _can_mount_private_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(),
                    reason="needs root and unshare -m to mount a private tmpfs on /dev/shm")
def test_attach_that_does_not_fit_dev_shm_gets_clear_error_and_daemon_keeps_serving(
    corpus, oracle
):
    script = "mount -t tmpfs -o size=40m tokenfeed-test /dev/shm && exec \"$0\" \"$@\""
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script, sys.executable, "-c", PROBE,
         str(TESTS_DIR), str(corpus)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the probe in the private /dev/shm did not finish in 180 s") from None
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["big"] != "attached", "a ring larger than the free /dev/shm was created"
    assert "bytes" in out["big"] and "free" in out["big"], out["big"]
    assert "--shm-size" in out["big"] and "--max-ring-mib" in out["big"], out["big"]
    assert out["alive_after"], out["log"]
    assert out["exit_code"] == 0, out["log"]  # a SIGBUS would be -7
    assert out["warned"], out["log"]
    assert out["left"] == []
    want = oracle(batch_size=2, seq_len=64, n=4)
    for k, x in enumerate(out["small"]):
        np.testing.assert_array_equal(np.array(x), want[k][:-1].reshape(2, 64))
    want_other = oracle(rank=1, world_size=2, batch_size=2, seq_len=64, n=1)
    np.testing.assert_array_equal(np.array(out["other_rank"]), want_other[0][:-1].reshape(2, 64))
