"""Feeds still open at interpreter exit are closed, so the daemon frees their slots now.

A feed's link thread is a daemon thread, which dies silently at exit: without this the
daemon would keep the feed's slots until --consumer-timeout-s. The set is weak, so the
hook never keeps a feed alive, and the hook is registered on first use (nothing happens
at import).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from typing import Protocol


class Closable(Protocol):
    def close(self) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def _close_all() -> None:
    for feed in list(_open):
        with contextlib.suppress(Exception):
            feed.close()


def track(feed: Closable) -> None:
    """Close `feed` at interpreter exit if it is still open then."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(_close_all)
            _registered = True
    _open.add(feed)


def forget(feed: Closable) -> None:
    _open.discard(feed)
