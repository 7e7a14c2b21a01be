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
