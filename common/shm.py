"""POSIX shared-memory segments that only their creator unlinks.

Segments live as files in `/dev/shm`, named `tokenfeed-<daemon_id>-<what>` so two
daemons on one node never collide and a daemon can find what a crashed
predecessor left behind (the daemon id names the owning process, its start time
and pid namespace, so a dead owner can be proven dead from the name alone). They
are created with `os.open(O_CREAT | O_EXCL, 0o600)` and mapped with `mmap`,
never through `multiprocessing.shared_memory`: in Python 3.11 that registers
every attach with the resource tracker, which unlinks the segment when the
*attaching* process exits (CPython bpo-39959).

Every page of a new segment is reserved at creation (`posix_fallocate`): tmpfs
otherwise commits pages on first write, and a write that finds `/dev/shm` full
kills the writer with SIGBUS and no message (Docker's default `/dev/shm` is
64 MB). A segment that does not fit is a `ShmFullError` naming the bytes needed,
the bytes free and the fix; nothing is left behind.

Failure behaviour: a segment that already exists is a `FileExistsError` (names
are unique per daemon, so it means a bug); attaching to a missing one raises
`FileNotFoundError`. Unlinking while others still map a segment is safe on
Linux: the pages live until the last mapping goes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import sys
from pathlib import Path

from tokenfeed.common.errors import ShmFullError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "tokenfeed-"


def _check_platform() -> None:
    if not SHM_DIR.is_dir():
        raise OSError(
            f"{SHM_DIR} does not exist on this {sys.platform} machine; tokenfeed needs Linux "
            "POSIX shared memory (inside a container, mount /dev/shm)"
        )


class Segment:
    """One mapped shared-memory segment. The creator owns it and must call `unlink()`."""

    def __init__(self, name: str, mm: mmap.mmap, size: int, owner: bool) -> None:
        self.name = name
        self.mm = mm
        self.size = size
        self.owner = owner

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        _check_platform()
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            _reserve(fd, name, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)
        return cls(name, mm, size, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        _check_platform()
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, mm, size, owner=False)

    def close(self) -> None:
        """Unmap; views into the buffer must be gone, else the mapping stays until GC."""
        try:
            self.mm.close()
        except BufferError:
            log.debug("segment %s still has views; leaving the mapping to the GC", self.name)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)


def _reserve(fd: int, name: str, size: int) -> None:
    """Commit every page now, so a full /dev/shm is an error here and never a SIGBUS later."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        free, total = shm_space()
        raise ShmFullError(
            f"cannot reserve {size:,} bytes ({size / 2**20:.1f} MiB) of {SHM_DIR} for segment "
            f"{name}: {free:,} bytes ({free / 2**20:.1f} MiB) free of {total / 2**20:.0f} MiB. "
            "Give the daemon more shared memory (docker run --shm-size=2g, or a larger "
            "/dev/shm on the host: see deploy/), or ask for less: lower --max-ring-mib, "
            "--slots, the batch size or --workers"
        ) from None


def shm_space() -> tuple[int, int]:
    """(bytes free, bytes in all) of the shared-memory file system, as statvfs reports them."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def ring_budget_warning(max_ring_bytes: int) -> str | None:
    """Why `max_ring_bytes` of rings cannot all fit in /dev/shm right now, or None if they can."""
    free, total = shm_space()
    if max_ring_bytes <= free:
        return None
    return (
        f"--max-ring-mib {max_ring_bytes >> 20} is more than the {free >> 20} MiB free in "
        f"{SHM_DIR} ({total >> 20} MiB in all): a stream whose ring does not fit fails to attach "
        "with a ShmFullError. Lower --max-ring-mib, or give the daemon more shared memory "
        "(docker run --shm-size, see deploy/)"
    )


def segment_name(daemon_id: str, what: str) -> str:
    return f"{NAME_PREFIX}{daemon_id}-{what}"


def unlink_daemon_segments(daemon_id: str) -> list[str]:
    """Unlink every segment of one daemon id (a crashed predecessor's); returns their names."""
    if not SHM_DIR.is_dir():
        return []
    prefix = segment_name(daemon_id, "")
    removed = []
    for path in SHM_DIR.glob(prefix + "*"):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed
