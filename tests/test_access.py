"""Access: the run dir is 0700 and every segment 0600, so another user cannot attach or read.

The second-uid test runs a probe as `nobody` (uid 65534) and needs the suite to
run as root; it is skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tokenfeed.common.shm import SHM_DIR

OTHER_UID = 65534  # nobody

# Imports first, as root (the interpreter lives under /root); then become the other user.
PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from tokenfeed.common.ring import Ring
    from tokenfeed.common.control import request
    ring, run_dir, uid = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    out = {"uid": os.geteuid()}
    for mode in ("rb", "r+b"):
        try:
            with open(f"/dev/shm/{ring}", mode) as f:
                f.read(1)
            out[mode] = "opened"
        except PermissionError:
            out[mode] = "denied"
    for what, call in (("attach", lambda: Ring.attach(ring)),
                       ("connect", lambda: request(run_dir, "ping", expect="pong"))):
        try:
            call()
            out[what] = "ok"
        except Exception as e:
            out[what] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
""")


@pytest.fixture
def loose_run_dir():
    """A run dir that starts out world-readable; the daemon must make it private."""
    path = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_run_dir_is_0700_and_every_segment_0600_of_the_daemons_user(start_daemon, loose_run_dir):
    daemon = start_daemon(workers=2, run_dir=loose_run_dir)
    with daemon.feed(2, 64) as feed:
        next(feed)
        assert stat.S_IMODE(daemon.run_dir.stat().st_mode) == 0o700
        names = daemon.segments()
        assert any(n.endswith("-s0") for n in names) and any("-w" in n for n in names), names
        for name in names:
            st = (SHM_DIR / name).stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid()), name


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a probe as a second uid")
def test_another_user_can_neither_read_nor_attach_a_ring(start_daemon, loose_run_dir):
    daemon = start_daemon(workers=1, run_dir=loose_run_dir)
    with daemon.feed(2, 64) as feed:
        next(feed)
        (ring,) = [n for n in daemon.segments() if n.endswith("-s0")]
        result = subprocess.run(
            [sys.executable, "-c", PROBE, ring, str(daemon.run_dir), str(OTHER_UID)],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["uid"] == OTHER_UID
    assert out["rb"] == "denied" and out["r+b"] == "denied"
    assert out["attach"].startswith("NotSharedError"), out["attach"]
    assert f"uid {os.geteuid()}" in out["attach"] and "deploy/" in out["attach"]
    assert out["connect"].startswith("NotSharedError"), out["connect"]
    assert "0700" in out["connect"] and "deploy/" in out["connect"]
