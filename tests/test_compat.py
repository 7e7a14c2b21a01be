"""Versions: `tokenfeed --version`, and the previous release's consumer against this daemon.

The previous release, tokenfeed 0.1.0 (protocol v1), is commit PREVIOUS_RELEASE: its
`common/` and `consumer/` modules, taken from git as they were, form a `tokenfeed`
package in a temporary folder that a subprocess imports instead of this tree. Against a
daemon of this tree, that consumer must get exactly the reference loader's batches and
resume from its own state, while a consumer of this release reads another rank of the
same daemon: a DaemonSet's rolling update, where the daemon is new and the job is not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import Daemon, assert_batch_equals, window_digest

from tokenfeed.common import protocol

PREVIOUS_RELEASE = "1c0a70e452c163405283b6a8e540b8abae6ef5b3"  # tokenfeed 0.1.0
REPO = Path(__file__).resolve().parent.parent
B, T = 2, 64

# Run with the frozen package first on sys.path: prints its protocol version, then one
# digest per batch: 3 batches, the state after them, 3 more; then a fresh feed resumed
# from that state prints its first 3.
OLD_CONSUMER = """
import hashlib, json, sys
from tokenfeed.common import protocol
from tokenfeed.consumer import TokenFeed
import tokenfeed.consumer.feed as feed_module
print(json.dumps({"protocol": protocol.PROTOCOL_VERSION, "file": feed_module.__file__}))
def digest(batch):
    x, y = batch
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
B, T = int(sys.argv[2]), int(sys.argv[3])
kw = dict(run_dir=sys.argv[1], rank=0, world_size=2, device="cpu")
with TokenFeed(B, T, **kw) as feed:
    first = [digest(next(feed)) for _ in range(3)]
    state = feed.state_dict()
    rest = [digest(next(feed)) for _ in range(3)]
with TokenFeed(B, T, **kw) as feed:
    feed.load_state_dict(state)
    resumed = [digest(next(feed)) for _ in range(3)]
print(json.dumps({"batches": first + rest, "resumed": resumed}))
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the previous release's `tokenfeed.common` and `tokenfeed.consumer`."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True,
                              capture_output=True, text=True).stdout
    try:
        git("cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history with commit {PREVIOUS_RELEASE[:7]} (tokenfeed "
                    "0.1.0): run the tests from a git clone, not an unpacked archive")
    root = tmp_path_factory.mktemp("tokenfeed-0.1.0")
    (root / "tokenfeed").mkdir()
    (root / "tokenfeed" / "__init__.py").write_text("")
    for package in ("common", "consumer"):
        (root / "tokenfeed" / package).mkdir()
        for path in git("ls-tree", "--name-only", f"{PREVIOUS_RELEASE}:{package}").split():
            if path.endswith(".py"):
                source = git("show", f"{PREVIOUS_RELEASE}:{package}/{path}")
                (root / "tokenfeed" / package / path).write_text(source)
    return root


def test_version_flag_prints_the_installed_package_version() -> None:
    out = subprocess.run([sys.executable, "-m", "tokenfeed.producer", "--version"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith(f"tokenfeed {version('tokenfeed')} (protocol v"
                          f"{protocol.PROTOCOL_VERSION}, serves clients from v"
                          f"{protocol.OLDEST_PROTOCOL_VERSION})")


def test_previous_release_consumer_gets_the_oracle_batches_from_this_daemon(
    start_daemon: Callable[..., Daemon], oracle: Callable[..., list], previous_release: Path,
) -> None:
    daemon = start_daemon()
    old = subprocess.Popen(
        [sys.executable, "-c", OLD_CONSUMER, str(daemon.run_dir), str(B), str(T)],
        cwd=previous_release, env={"PYTHONPATH": str(previous_release), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # This release's consumer reads rank 1 of the same daemon meanwhile.
        with daemon.feed(B, T, rank=1, world_size=2) as feed:
            for i, window in enumerate(oracle(rank=1, world_size=2, batch_size=B, seq_len=T,
                                              n=6)):
                assert_batch_equals(next(feed), window, f"this release, batch {i}")
        out, err = old.communicate(timeout=90)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    assert old.returncode == 0, f"the 0.1.0 consumer failed:\n{err}"
    header, result = (json.loads(line) for line in out.splitlines())
    assert header["protocol"] == protocol.OLDEST_PROTOCOL_VERSION == 1
    assert header["file"].startswith(str(previous_release))  # the frozen copy, not this tree
    expected = [window_digest(w, B, T)
                for w in oracle(rank=0, world_size=2, batch_size=B, seq_len=T, n=6)]
    assert result["batches"] == expected
    assert result["resumed"] == expected[3:]
    assert "(tokenfeed 0.1.x, protocol v1) attached" in daemon.log()
