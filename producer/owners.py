"""Who owns a `tokenfeed-*` segment, and whether that owner is provably dead.

A daemon id names its process so that anyone on the node can tell, from a
segment's name alone, whether the daemon that made it still runs:

    <pid>-<start_ticks>-<pid_ns>-<nonce>      e.g. 4242-918273-4026531836-a1b2c3

`start_ticks` is field 22 of `/proc/<pid>/stat` (clock ticks after boot at which
the process started): a pid that the kernel gave to another process since has
another start time. `pid_ns` is the inode of `/proc/self/ns/pid`: a pid means
something only inside its pid namespace, and containers that share `/dev/shm`
(Kubernetes `hostIPC`, Docker `--ipc`) need not share one. `nonce` keeps two
daemons of one process apart.

A segment is stale, and `remove_stale_segments` unlinks it, only when all hold:
its name parses (older names are never touched), its file belongs to this uid,
its owner lived in this pid namespace, and that pid is gone, a zombie, or a
process with another start time. Anything unknown (an unreadable /proc entry, a
/proc of another namespace) counts as alive: a live daemon's ring is never
removed. Unlinking is safe even while a process still maps the segment: the
pages live until the last mapping goes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from tokenfeed.common.shm import NAME_PREFIX, SHM_DIR

log = logging.getLogger(__name__)

PROC = Path("/proc")
_NAME = re.compile(re.escape(NAME_PREFIX) + r"(\d+)-(\d+)-(\d+)-[0-9a-f]{6}-.+")
_STAT_STATE, _STAT_START_TICKS = 0, 19  # fields 3 and 22, counted after "pid (comm)"


@dataclass(frozen=True)
class Owner:
    pid: int
    start_ticks: int
    pid_ns: int


def _stat_fields(pid: int | str) -> list[str]:
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _pid_ns() -> int | None:
    try:
        return os.stat(PROC / "self" / "ns" / "pid").st_ino
    except OSError:
        return None


def this_process() -> Owner | None:
    """This process as an owner, or None where /proc cannot say (then nothing is cleaned)."""
    ns = _pid_ns()
    try:
        if ns is None or int(os.readlink(PROC / "self")) != os.getpid():
            return None  # no /proc, or one that belongs to another pid namespace
        return Owner(os.getpid(), int(_stat_fields("self")[_STAT_START_TICKS]), ns)
    except (OSError, ValueError, IndexError):
        return None


def new_daemon_id() -> str:
    me = this_process()
    if me is None:  # still unique; its segments just cannot be proven stale later
        return f"{os.getpid()}-0-0-{secrets.token_hex(3)}"
    return f"{me.pid}-{me.start_ticks}-{me.pid_ns}-{secrets.token_hex(3)}"


def owner_of(segment: str) -> Owner | None:
    """The daemon a segment name belongs to, or None for names of another format."""
    m = _NAME.fullmatch(segment)
    if m is None:
        return None
    return Owner(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def is_dead(owner: Owner, me: Owner) -> bool:
    """True only when `owner` provably no longer runs (see the module docstring)."""
    if owner.pid_ns != me.pid_ns or owner.start_ticks == 0:
        return False
    try:
        fields = _stat_fields(owner.pid)
    except FileNotFoundError:
        return True  # no such pid in this namespace
    except (OSError, IndexError):
        return False
    if fields[_STAT_STATE] in ("Z", "X"):
        return True  # exited, waiting to be reaped: it will never run again
    return int(fields[_STAT_START_TICKS]) != owner.start_ticks  # pid reused by another process


def stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Names of this user's segments whose owning daemon is provably dead, sorted."""
    me = this_process()
    if me is None or not shm_dir.is_dir():
        return []
    uid = os.geteuid()
    stale = []
    for path in shm_dir.glob(NAME_PREFIX + "*"):
        owner = owner_of(path.name)
        if owner is None:
            continue
        try:
            if path.stat().st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        if is_dead(owner, me):
            stale.append(path.name)
    return sorted(stale)


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every segment `stale_segments` names; returns the names actually removed."""
    removed = []
    for name in stale_segments(shm_dir):
        try:
            (shm_dir / name).unlink()
        except FileNotFoundError:  # another daemon or `tokenfeed clean` got there first
            continue
        removed.append(name)
    if removed:
        log.warning("removed %d shared-memory segments of dead daemons: %s", len(removed),
                    ", ".join(removed))
    return removed
