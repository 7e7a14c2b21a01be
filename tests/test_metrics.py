"""`tokenfeed serve --metrics-port`: /metrics over real HTTP, moving with the feed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tokenfeed.producer.metrics import metric_names

SCRAPE_TIMEOUT_S = 5.0


def scrape(daemon: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one GET /metrics."""
    url = daemon.status()["metrics_url"]
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


TRAIN0 = (("rank", "0"), ("split", "train"), ("world_size", "1"))


def test_metrics_serve_every_family_with_units_and_bounded_labels(start_daemon):
    daemon = start_daemon("--metrics-port", "0", workers=2, slots=4)
    assert daemon.status()["metrics_url"].startswith("http://127.0.0.1:")
    with daemon.feed(2, 64) as feed:
        next(feed)
        deadline = time.monotonic() + 60
        while not (m := scrape(daemon)).get("tokenfeed_tokens_produced_total", {}).get(TRAIN0):
            assert time.monotonic() < deadline, "the stream never reached /metrics"
            time.sleep(0.1)
    for name in metric_names():
        assert name in m, f"{name} missing from /metrics"
    (info,) = m["tokenfeed_info"]
    assert dict(info)["daemon_id"] == daemon.daemon_id
    assert m["tokenfeed_ring_capacity_batches"][TRAIN0] == 4
    assert m["tokenfeed_workers"][(("state", "target"),)] == 2
    assert m["tokenfeed_tokens_produced_total"][TRAIN0] >= 2 * 64 + 1


def test_depth_gauge_drains_and_stall_counter_rises_when_a_consumer_outruns_one_worker(
        start_daemon):
    daemon = start_daemon("--metrics-port", "0", workers=1, slots=4)
    # 16 x 2048 tokens a batch, about two passes over the train split each: one worker
    # tokenizes far slower than a consumer copies.
    with daemon.feed(16, 2048, prefetch=1) as feed:
        next(feed)
        deadline = time.monotonic() + 60
        # /metrics serves the status of the last heartbeat (every 0.5 s): the stream's
        # samples appear from the first one after the attach
        while scrape(daemon).get("tokenfeed_ring_depth_batches", {}).get(TRAIN0) != 4:
            assert time.monotonic() < deadline, "the ring never filled"
            time.sleep(0.1)
        depths, stalls = [], []
        deadline = time.monotonic() + 60
        while True:
            next(feed)
            m = scrape(daemon)
            depths.append(m["tokenfeed_ring_depth_batches"][TRAIN0])
            stalls.append(m["tokenfeed_consumer_stall_seconds_total"][TRAIN0])
            reported = [x for x in stalls if x > 0]  # the first heartbeat may come later
            if min(depths) < 4 and reported and stalls[-1] > reported[0]:
                break
            assert time.monotonic() < deadline, f"depths {depths[-20:]}, stall {stalls[-20:]}"
        consumed = m["tokenfeed_tokens_consumed_total"][TRAIN0]
    assert consumed >= 16 * 2048
    assert m["tokenfeed_consumer_step_seconds_total"][TRAIN0] >= 0


def test_a_metrics_port_in_use_is_one_line_and_exit_2(corpus, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(corpus),
             "--run-dir", str(tmp_path / "r"), "--workers", "1", "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tokenfeed:")]
    assert len(errors) == 1 and f"--metrics-port {port}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def wait_scrape(daemon: Any, ready: Any, what: str, timeout_s: float = 60.0
                ) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Scrape until `ready(m)` (/metrics serves the status of the last heartbeat)."""
    deadline = time.monotonic() + timeout_s
    while not ready(m := scrape(daemon)):
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.1)
    return m


def test_val_store_metrics_show_what_is_held_and_rounds_after_the_first_as_hits(
        start_daemon):
    daemon = start_daemon("--metrics-port", "0", workers=2)
    hits = "tokenfeed_val_store_lookups_total"
    with daemon.feed(2, 64, split="val", max_batches=6) as feed:
        assert len(list(feed)) == 6  # round 1: tokenized, kept
        vs = daemon.status()["val_store"]
        assert vs["row_groups"] > 0 and vs["bytes"] > 0 and vs["misses"] > 0
        m = wait_scrape(daemon, lambda m: m.get("tokenfeed_val_store_row_groups", {}).get(())
                        == vs["row_groups"], "round 1 never reached /metrics")
        assert m["tokenfeed_val_store_bytes"][()] == vs["bytes"]
        assert m["tokenfeed_val_store_budget_bytes"][()] == vs["max_bytes"] == 1 << 30
        assert m["tokenfeed_val_store_refused_total"][()] == 0
        misses = m[hits][(("result", "miss"),)]
        assert misses == vs["misses"] and m[hits][(("result", "hit"),)] == vs["hits"]
        assert len(list(feed)) == 6  # round 2: every row group from the store
        after = daemon.status()["val_store"]
    assert after["misses"] == vs["misses"] and after["hits"] >= vs["hits"] + vs["row_groups"]
    assert after["bytes"] == vs["bytes"]
    m = wait_scrape(daemon, lambda m: m.get(hits, {}).get((("result", "hit"),))
                    == after["hits"], "round 2's hits never reached /metrics")
    assert m[hits][(("result", "miss"),)] == misses
    assert m["tokenfeed_val_store_row_groups"][()] == vs["row_groups"]


def test_no_val_store_metrics_with_a_token_cache(start_daemon, tmp_path):
    daemon = start_daemon("--metrics-port", "0", "--cache-dir", str(tmp_path / "cache"),
                          workers=1)
    with daemon.feed(2, 64, split="val", max_batches=2) as feed:
        assert len(list(feed)) == 2
    m = wait_scrape(daemon, lambda m: "tokenfeed_workers" in m, "no scrape")
    assert daemon.status()["val_store"] is None
    assert not any(name.startswith("tokenfeed_val_store") for name in m)
