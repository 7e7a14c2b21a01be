"""The daemon's log lines: one per event, as text or as JSON for log collectors.

    --log-format text: 2026-12-02 01:22:33,101 tokenfeed 4242-1-2-abc INFO ...: message
    --log-format json: {"time": "2026-12-02T01:22:33.101Z", "level": "INFO",
                        "logger": "tokenfeed.producer.daemon", "daemon_id": "4242-1-2-abc",
                        "stream": 0, "message": "...", "pid": 4242}

Every line names the daemon (its id once known, "-" before) and, for an event about
one stream, its id: taken from the record's `stream` attribute (`extra=`) or else
from "stream N" in the message. Nothing is logged per batch at INFO: attaches,
detaches, worker starts and deaths, resizes and stream failures are the events.
`configure` is called once by `tokenfeed serve`, never at import.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

LOG_FORMATS = ("text", "json")  # the first is the default
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_STREAM_IN_MESSAGE = re.compile(r"\bstream (\d+)\b")
_daemon_id = "-"


def set_daemon_id(daemon_id: str) -> None:
    """Name this daemon in every line from now on."""
    global _daemon_id
    _daemon_id = daemon_id


class _Context(logging.Filter):
    """Adds `daemon_id` and `stream` (int or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.daemon_id = _daemon_id
        stream = getattr(record, "stream", None)
        if not isinstance(stream, int):
            found = _STREAM_IN_MESSAGE.search(record.getMessage())
            stream = int(found.group(1)) if found else None
        record.stream = stream
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "daemon_id": getattr(record, "daemon_id", _daemon_id),
            "stream": getattr(record, "stream", None),
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, fmt: str) -> None:
    """Log to stderr at `level` in `fmt` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s tokenfeed %(daemon_id)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
