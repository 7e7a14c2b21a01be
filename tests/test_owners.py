"""Segments of dead daemons are removed by the next daemon on any run dir; a live one's never.

Unit tests hold `producer/owners.py` to its rule (pid gone, zombie or reused by
another process = dead; anything unknown = alive) on segment files in a private
folder; the end-to-end tests kill real daemons and look at /dev/shm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_batch_equals, pid_alive, worker_pids

from tokenfeed.common.shm import SHM_DIR, Segment
from tokenfeed.producer.owners import (
    Owner,
    is_dead,
    new_daemon_id,
    owner_of,
    remove_stale_segments,
    stale_segments,
    this_process,
)


def me() -> Owner:
    owner = this_process()
    assert owner is not None, "the suite runs where /proc describes this process"
    return owner


def segment_of(owner: Owner, what: str = "s0") -> str:
    return f"tokenfeed-{owner.pid}-{owner.start_ticks}-{owner.pid_ns}-abc123-{what}"


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- the rule ------------------------------------------------------------------


def test_new_daemon_id_names_this_process_and_parses_back():
    daemon_id = new_daemon_id()
    assert owner_of(f"tokenfeed-{daemon_id}-w3-1") == me()
    assert new_daemon_id() != daemon_id


@pytest.mark.parametrize("name", [
    "tokenfeed-4242-a1b2c3-s0",  # the format before owners were named: never touched
    "tokenfeed-test-0123456789abcdef-s0",
    "tokenfeed-1-2-3-s0",
    "other-1-2-3-abcdef-s0",
])
def test_names_of_another_format_have_no_owner(name):
    assert owner_of(name) is None


def test_owner_whose_pid_is_gone_is_dead():
    assert is_dead(Owner(dead_pid(), me().start_ticks, me().pid_ns), me())


def test_owner_alive_with_its_start_time_is_not_dead(sleeper):
    assert not is_dead(Owner(sleeper.pid, start_ticks(sleeper.pid), me().pid_ns), me())
    assert not is_dead(me(), me())


def test_owner_whose_pid_was_reused_by_another_process_is_dead(sleeper):
    assert is_dead(Owner(sleeper.pid, start_ticks(sleeper.pid) - 1, me().pid_ns), me())


def test_zombie_owner_is_dead():
    proc = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        owner = Owner(proc.pid, start_ticks(proc.pid), me().pid_ns)
        assert is_dead(owner, me())
    finally:
        proc.wait()


def test_owner_in_another_pid_namespace_or_of_unknown_start_is_never_dead():
    gone = dead_pid()
    assert not is_dead(Owner(gone, me().start_ticks, me().pid_ns + 1), me())
    assert not is_dead(Owner(gone, 0, me().pid_ns), me())


def test_stale_segments_are_only_this_users_with_provably_dead_owners(tmp_path, sleeper):
    ns = me().pid_ns
    dead = segment_of(Owner(dead_pid(), 1234, ns))
    reused = segment_of(Owner(sleeper.pid, start_ticks(sleeper.pid) + 1, ns), "w0-0")
    alive = segment_of(Owner(sleeper.pid, start_ticks(sleeper.pid), ns))
    mine = segment_of(me())
    elsewhere = segment_of(Owner(dead_pid(), 1234, ns + 1))
    legacy = f"tokenfeed-{dead_pid()}-a1b2c3-s0"
    for name in (dead, reused, alive, mine, elsewhere, legacy):
        (tmp_path / name).write_bytes(b"")
    if os.geteuid() == 0:
        foreign = segment_of(Owner(dead_pid(), 99, ns), "s9")
        (tmp_path / foreign).write_bytes(b"")
        os.chown(tmp_path / foreign, 65534, 65534)  # another user's: not ours to judge
    assert stale_segments(tmp_path) == sorted([dead, reused])
    assert remove_stale_segments(tmp_path) == sorted([dead, reused])
    left = {p.name for p in tmp_path.iterdir()}
    assert {alive, mine, elsewhere, legacy} <= left and not {dead, reused} & left


# -- real daemons --------------------------------------------------------------


def kill_and_wait(daemon) -> None:
    pids = worker_pids(daemon)
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids):  # orphaned workers exit within a second
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_daemons_segments_are_removed_by_a_daemon_on_another_run_dir(start_daemon):
    a = start_daemon(workers=1)
    with a.feed(2, 64) as feed:
        next(feed)
        left = a.segments()
        assert any(name.endswith("-s0") for name in left), left
        kill_and_wait(a)
    # Nothing removed them yet (unless another daemon of this user started meanwhile).
    assert set(a.segments()) <= set(left)
    b = start_daemon(workers=1)
    assert b.run_dir != a.run_dir
    assert a.segments() == []


def test_a_starting_daemon_never_touches_a_live_daemons_segments(start_daemon, oracle):
    live = start_daemon(workers=1)
    b, t, n = 2, 64, 20
    want = oracle(batch_size=b, seq_len=t, n=n)
    with live.feed(b, t, prefetch=1) as feed:
        for k in range(5):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        held = live.segments()
        start_daemon(workers=1)
        assert live.segments() == held
        for k in range(5, n):
            assert_batch_equals(next(feed), want[k], f"batch {k} after the second start")


def tokenfeed_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfeed.producer", *args],
                          capture_output=True, text=True, timeout=60)


def test_clean_command_removes_only_dead_daemons_segments(start_daemon, sleeper):
    killed, live = start_daemon(workers=1), start_daemon(workers=1)
    with killed.feed(2, 64) as feed:
        next(feed)
        kill_and_wait(killed)
    left = killed.segments()
    held = live.segments()
    ns = me().pid_ns
    reused = Segment.create(
        segment_of(Owner(sleeper.pid, start_ticks(sleeper.pid) + 7, ns), "s0"), 4096)
    reused.close()
    dead = set(left) | {reused.name}
    # A daemon another test starts meanwhile removes dead daemons' segments too (owners.py):
    # a dead one may be gone before `clean` looks, a live one never.
    try:
        dry = tokenfeed_cli("clean", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        listed = set(dry.stdout.split())
        assert all(name in listed or not (SHM_DIR / name).exists() for name in dead), listed
        assert not set(held) & listed
        result = tokenfeed_cli("clean")
        assert result.returncode == 0, result.stderr
        assert "removed" in result.stdout.splitlines()[-1]
        assert killed.segments() == [] and not reused.path.exists()
        assert live.segments() == held
        assert not set(held) & set(result.stdout.split())
    finally:
        reused.unlink()


def test_daemon_json_is_replaced_whole_never_rewritten_in_place(start_daemon):
    first = start_daemon(workers=1)
    info = first.run_dir / "daemon.json"
    inode = info.stat().st_ino
    kill_and_wait(first)
    successor = start_daemon(workers=1, run_dir=first.run_dir)
    # A new inode: readers of the old file never saw it truncated and half written.
    assert info.stat().st_ino != inode
    assert json.loads(info.read_text())["daemon_id"] == successor.daemon_id
    assert [p.name for p in first.run_dir.iterdir() if p.name.endswith(".tmp")] == []
