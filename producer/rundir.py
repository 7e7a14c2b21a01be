"""The run dir's ownership: one daemon a run dir, and no leftovers of the one before.

Layout of `<run_dir>` (mode 0700): `daemon.lock` (held with an exclusive `flock` for
the daemon's whole life), `daemon.json` (`{"daemon_id", "pid", "started", "data_dir",
"tokenizer"}`, replaced atomically), and the daemon's two sockets, `control` and
`workers` (bound by daemon.py and pool.py).

Holding the lock proves any predecessor is dead, so `take` unlinks the segments named
in its `daemon.json` and its sockets before anything else happens: no manual clean-up
after a crash or `kill -9`. `release` removes what the daemon made here, unlinks any
segment of its own that a code path missed, and lets the lock go.

Failure behaviour: a run dir another live daemon holds is a ConfigError naming its pid
and the two ways out; an unreadable or half-written `daemon.json` reads as empty.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from tokenfeed.common.config import CONTROL_SOCKET_NAME, WORKER_SOCKET_NAME, ensure_private_dir
from tokenfeed.common.errors import ConfigError
from tokenfeed.common.shm import unlink_daemon_segments

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"
INFO_NAME = "daemon.json"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    @property
    def owned(self) -> bool:
        """True from a successful `take` until `release`."""
        return self._lock_fd is not None

    def take(self) -> None:
        """Lock the run dir for this process, then clear what a dead predecessor left."""
        ensure_private_dir(self.path)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self.read_info()
            raise ConfigError(
                f"a tokenfeed daemon (pid {info.get('pid', '?')}) already serves {self.path}; "
                f"stop it with `tokenfeed stop --run-dir {self.path}` or pass another --run-dir"
            ) from None
        self._lock_fd = fd
        old = self.read_info().get("daemon_id")
        if old:
            removed = unlink_daemon_segments(str(old))
            if removed:
                log.warning("removed %d segments left by crashed daemon %s", len(removed), old)
        for name in (CONTROL_SOCKET_NAME, WORKER_SOCKET_NAME):
            (self.path / name).unlink(missing_ok=True)

    def read_info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = json.loads((self.path / INFO_NAME).read_text())
            return info
        except (OSError, ValueError):
            return {}

    def write_info(self, *, daemon_id: str, started: float, data_dir: str,
                   tokenizer: str) -> None:
        """daemon.json, before the first segment exists: a daemon killed while it still
        scans is cleaned up by the next start like any other."""
        info = {"daemon_id": daemon_id, "pid": os.getpid(), "started": started,
                "data_dir": data_dir, "tokenizer": tokenizer}
        tmp = self.path / f"{INFO_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.path / INFO_NAME)  # readers never see a half-written file

    def release(self, daemon_id: str | None) -> None:
        """Remove the sockets and daemon.json, unlink `daemon_id`'s segments that a code
        path missed, and let the lock go (last: until then no successor may start)."""
        if self._lock_fd is None:
            return
        for name in (CONTROL_SOCKET_NAME, WORKER_SOCKET_NAME, INFO_NAME):
            (self.path / name).unlink(missing_ok=True)
        if daemon_id is not None:
            unlink_daemon_segments(daemon_id)
        os.close(self._lock_fd)
        self._lock_fd = None
