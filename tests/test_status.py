"""`tokenfeed status`: the JSON keys, and the screen's advice for a starved stream."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from conftest import wait_until

from tokenfeed.producer.telemetry import advice
from tokenfeed.producer.view import render_screen, render_text


def _status_cli(run_dir: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfeed.producer", "status", "--run-dir",
                           str(run_dir), *args], capture_output=True, text=True, timeout=60)


def _starved(daemon: Any, feed: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    """Read as fast as possible until the daemon sees the stream's trainer waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        for _ in range(5):
            next(feed)
        s = daemon.status()
        if s["advice"] and (s["streams"][0]["stall_share"] or 0) > 0.01:
            return s
        assert time.monotonic() < deadline, f"no stall seen: {s['streams']}"


def test_watch_screen_advises_more_workers_for_a_starved_stream(start_daemon):
    daemon = start_daemon(workers=1, slots=2)
    with daemon.feed(8, 512, prefetch=1) as feed:  # 4k-token batches: one worker lags
        status = _starved(daemon, feed)
    screen = render_screen(status, width=80)
    lines = screen.splitlines()
    assert all(len(line) <= 80 for line in lines), screen
    assert any(line.startswith("advice: stream 0 (train rank 0/1)") for line in lines), screen
    if status["workers"]["busy"] >= status["workers"]["alive"]:
        assert "add workers: `tokenfeed scale --workers " in screen.replace("\n", " "), screen
    assert "train" in screen and "/2" in screen


def test_status_json_has_the_documented_keys(start_daemon):
    daemon = start_daemon(workers=2, slots=4)
    with daemon.feed(2, 64) as feed:
        for _ in range(3):
            next(feed)
        wait_until(lambda: (s := daemon.status())["streams"][0]["tokens_per_s"]["produced"]
                   is not None and s["workers"]["tokens_per_worker_cpu_s"] > 0,
                   what="two samples of the stream's rates and a worker's report")
        result = _status_cli(daemon.run_dir, "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["workers"]["count"] == 2 and s["workers"]["target"] == 2
    assert {"alive", "busy", "restarts", "tokens_per_worker_cpu_s"} <= set(s["workers"])
    assert {"uptime_s", "tokenizer", "tokenizer_backend", "totals", "advice"} <= set(s)
    (st,) = s["streams"]
    for key in ("split", "rank", "world_size", "depth", "capacity", "packing", "tokens_per_s",
                "stall_share", "epoch", "epoch_progress", "waste_share", "consumers",
                "consumer_list", "tokens_produced", "tokens_consumed", "stall_s", "step_s"):
        assert key in st, key
    assert st["capacity"] == 4 and st["consumers"] == 1
    assert st["tokens_per_s"]["produced"] is not None
    assert s["workers"]["tokens_tokenized"] > 0
    assert s["workers"]["tokens_per_worker_cpu_s"] > 0


def test_status_screen_of_a_live_daemon_fits_80_columns(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64, rank=1, world_size=2) as feed:
        next(feed)
        result = _status_cli(daemon.run_dir)
    assert result.returncode == 0, result.stderr
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    assert "1/2" in result.stdout and "workers 1/1" in result.stdout


def _status(**over: Any) -> dict[str, Any]:
    stream = {"stream": 3, "split": "train", "rank": 2, "world_size": 8, "packing": "bestfit",
              "depth": 0, "capacity": 8, "slots": 8, "consumers": 1, "stall_share": 0.2,
              "tokens_per_s": {"produced": 1.5e6, "consumed": 1.4e6}, "epoch": 1,
              "epoch_progress": 0.41, "waste_share": 0.002, "error": None,
              "position": {"epoch": 1}, "replicas": {"expected": 1}}
    s = {"daemon_id": "4242-1-2-abc", "uptime_s": 3725, "tokenizer": "cl100k_base",
         "tokenizer_backend": "quicktok", "data_dir": "/data/fineweb",
         "workers": {"alive": 4, "target": 4, "busy": 4, "restarts": 0,
                     "tokens_per_worker_cpu_s": 2.3e6},
         "staging": {"bytes": 0, "budget_bytes": 1 << 30}, "totals": {"skipped_values": 7},
         "streams": [stream]}
    for k, v in over.items():
        (stream if k in stream else s)[k] = v
    return s


def test_advice_scales_workers_by_the_stall_when_all_are_busy():
    assert advice(_status(), max_workers=64).endswith("`tokenfeed scale --workers 5`")
    assert "`tokenfeed scale --workers 6`" in advice(_status(stall_share=0.3), max_workers=64)


def test_advice_names_the_consumer_side_when_workers_idle_and_the_ring_holds_batches():
    s = _status(depth=5, workers={"alive": 4, "target": 4, "busy": 1})
    assert "the consumer side is the bottleneck" in advice(s)


def test_advice_names_the_staging_budget_and_says_nothing_without_a_stall():
    s = _status(workers={"alive": 4, "target": 4, "busy": 0},
                staging={"bytes": 2 << 30, "budget_bytes": 1 << 30})
    assert "--max-staging-mib" in advice(s)
    assert advice(_status(stall_share=0.005)) is None
    assert advice(_status(stall_share=None)) is None


def test_plain_and_rich_screens_show_the_same_figures():
    s = _status()
    s["advice"] = advice(s)
    for screen in (render_text(s), render_screen(s)):
        assert "bestfit" in screen and "1.5M" in screen and "20%" in screen
        assert "1 41%" in screen and "2/8" in screen and "up 1h02m" in screen
        assert "advice: stream 3" in screen
        assert all(len(line) <= 80 for line in screen.splitlines()), screen


def test_the_screen_shows_the_token_cache_when_there_is_one():
    s = _status(cache={"hits": 30, "misses": 10, "bytes": 2 << 30, "max_bytes": 64 << 30,
                       "writes": 10, "evicted": 0})
    for screen in (render_text(s), render_screen(s)):
        assert "cache 2.1GB of 68.7GB  hits 75%" in screen, screen
