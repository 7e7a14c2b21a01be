"""Imported first by the pool's fork server: worker imports and the tokenizer, once.

Workers are forked from a fork server (the `forkserver` start method: a fresh process
the pool starts, so nothing of the daemon's ZeroMQ state or threads is inherited).
The server imports this module before it forks anything; when the pool names its
tokenizer in PRELOAD_ENV, the tokenizer is loaded here too, so that every worker
forked after starts with its imports done and its tokenizer loaded, sharing those
pages: a start, a respawn or a scale-up costs a fork instead of ~1 CPU-second each.

Failure behaviour: a tokenizer that fails to load here is left to the worker, which
loads it and reports the error as before; a server started without PRELOAD_ENV (or
with another tokenizer than a worker asks for) preloads nothing for it.
"""

from __future__ import annotations

import json
import logging
import os

from tokenfeed.producer.tokenizer import Tokenizer, load_tokenizer
from tokenfeed.producer.worker import PRELOAD_ENV

log = logging.getLogger(__name__)

_loaded: dict[tuple[str, str | None], Tokenizer] = {}


def preloaded(spec: str, bos: str | None) -> Tokenizer | None:
    """The tokenizer the fork server loaded for (spec, bos), if it did."""
    return _loaded.get((spec, bos))


def _preload() -> None:
    raw = os.environ.get(PRELOAD_ENV)
    if not raw:
        return
    try:
        want = json.loads(raw)
        spec, bos, niceness = str(want["spec"]), want["bos"], int(want["niceness"])
        # The server's own start-up (and so every worker's) runs at the workers' niceness.
        if os.getpriority(os.PRIO_PROCESS, 0) < niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        _loaded[(spec, bos)] = load_tokenizer(spec, bos)
    except Exception as e:  # the worker loads it itself and reports what went wrong
        log.debug("fork server preloaded no tokenizer: %s", e)


_preload()
