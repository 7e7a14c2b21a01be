"""Reconnecting: a feed with `reconnect_s > 0` outlives a daemon that restarts.

When the daemon shuts down or goes silent (the link raises DaemonGoneError, after the
batches already prepared), the feed waits up to `reconnect_s` for a daemon to answer
on the run dir again (a systemd restart, say) and re-attaches at the position after
the last batch returned, expecting the data and tokenizer it had, so the trainer
continues as if nothing happened. The daemon may restart (or drop this consumer)
again while the feed re-attaches: each such failure is retried until the deadline.

Failure behaviour: past `reconnect_s`, the last DaemonGoneError (or the first, when no
daemon answered at all) reaches the caller of `next()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tokenfeed.common.errors import DaemonGoneError, DaemonUnavailableError
from tokenfeed.consumer.link import Link, Prepared


def expected(info: dict[str, Any]) -> dict[str, Any]:
    """What a re-attach must find again: the data and tokenizer of the last attach's reply
    (`info`), so a daemon restarted on other data is refused, not silently followed."""
    return {"fingerprint": info.get("fingerprint"),
            "tokenizer": info.get("tokenizer", {}).get("identity")}


def next_batch(gone: DaemonGoneError, reconnect_s: float, stall_timeout_s: float,
               reattach: Callable[[DaemonGoneError], Link]) -> tuple[Link, Prepared]:
    """Re-attach (`reattach`) and wait for the next batch, again and again for
    `reconnect_s`; the new link and its first batch."""
    deadline = time.monotonic() + reconnect_s
    while True:
        try:
            link = reattach(gone)
            return link, link.next_batch(stall_timeout_s)
        except (DaemonGoneError, DaemonUnavailableError) as again:
            if time.monotonic() > deadline:
                raise
            gone = again if isinstance(again, DaemonGoneError) else gone
