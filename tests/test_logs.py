"""`tokenfeed serve --log-format json`: one JSON object per event, none per batch."""

from __future__ import annotations

import json
import logging

from tokenfeed.producer.logs import JsonFormatter, _Context


def _lines(daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def test_json_log_names_the_daemon_and_stream_and_is_silent_per_batch(start_daemon):
    daemon = start_daemon("--log-format", "json", workers=1)
    with daemon.feed(2, 64) as feed:
        for _ in range(5):
            next(feed)
        before = len(_lines(daemon))
        for _ in range(60):
            next(feed)
        assert len(_lines(daemon)) == before, "INFO lines per batch"
    daemon.stop()
    text = [line for line in daemon.log().splitlines() if line.strip()]
    lines = _lines(daemon)
    assert len(lines) == len(text), f"lines that are not JSON: {text}"
    # "-" only for what start-up logs before the id exists (the backend check).
    assert all(line["daemon_id"] in (daemon.daemon_id, "-") for line in lines)
    attached = [line for line in lines if "attached to stream" in line["message"]]
    assert attached and attached[0]["stream"] == 0 and attached[0]["level"] == "INFO"
    assert attached[0]["daemon_id"] == daemon.daemon_id
    assert {"time", "logger", "pid"} <= set(attached[0])


def test_a_stream_given_as_extra_wins_over_the_message():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "stream %d closed", (7,), None)
    record.stream = 3
    _Context().filter(record)
    out = json.loads(JsonFormatter().format(record))
    assert out["stream"] == 3 and out["message"] == "stream 7 closed"
