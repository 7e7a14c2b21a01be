"""Object storage at scale and when it misbehaves: moto behind a latency and fault proxy.

A manifest makes a restart a handful of requests whatever the shard count; throttling
(503 SlowDown) and slow requests are retried and counted without changing a batch; a
shard deleted or replaced mid-run fails the stream naming it, or is skipped with
`--on-error skip` (a local file replaced by one of another size too).
Request counts are asserted, never wall-clock times (benchmarks/startup.py has those).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_batch_equals
from s3proxy import FaultProxy
from test_dataset import write_corpus
from test_object_storage import BUCKET, s3, upload  # noqa: F401  (s3: the moto fixture)

from tokenfeed.common.errors import StreamFailedError
from tokenfeed.producer.cli import main

B, T = 4, 256


@pytest.fixture
def proxy(s3: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:  # noqa: F811
    """A proxy to the moto server; daemons started after this go through it."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.mark.slow
def test_a_start_from_the_manifest_makes_at_most_five_requests_before_serving(
        start_daemon, s3, proxy, tmp_path: Path):  # noqa: F811
    root = write_corpus(tmp_path / "data", {f"shard_{i:03d}.parquet": 2 for i in range(60)})
    url = upload(s3, root, "many")
    first = start_daemon(workers=1, data=url)
    without_manifest = proxy.requests
    assert first.stop() == 0
    assert main(["index", url]) == 0  # the manifest next to the shards
    proxy.reset()
    second = start_daemon(workers=1, data=url)
    with_manifest = proxy.requests
    assert second.stop() == 0
    assert without_manifest >= 60  # a footer per shard
    assert with_manifest <= 5, [ln for ln in second.log().splitlines() if "ignoring" in ln]


@pytest.mark.slow
def test_a_restart_with_a_cache_dir_reads_its_own_copy_of_the_manifest(
        start_daemon, s3, proxy, tmp_path: Path):  # noqa: F811
    root = write_corpus(tmp_path / "data", {f"shard_{i:03d}.parquet": 1 for i in range(30)})
    url = upload(s3, root, "cached")
    cache = tmp_path / "cache"
    assert start_daemon("--cache-dir", str(cache), workers=1, data=url).stop() == 0
    proxy.reset()
    assert start_daemon("--cache-dir", str(cache), workers=1, data=url).stop() == 0
    assert proxy.by_method["GET"] <= 2, dict(proxy.by_method)  # the listing, no footer
    assert proxy.by_method["HEAD"] == 0, dict(proxy.by_method)


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_throttling_and_slow_requests_are_retried_counted_and_change_no_batch(
        start_daemon, oracle, corpus, s3, proxy):  # noqa: F811
    url = upload(s3, corpus, "faults")
    n = 300
    want = oracle(batch_size=B, seq_len=T, n=n)
    proxy.fail_every, proxy.slow_every, proxy.slow_s = 20, 100, 2.0  # 5% 503s, 1% +2 s
    daemon = start_daemon("--task-kib", "1", "--metrics-port", "0", workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for k in range(n):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
    assert proxy.failed > 0 and proxy.slowed > 0
    status = daemon.status()
    storage = status["storage"]
    assert 0 < storage["retries"] <= proxy.failed  # each 503 is one retry, reported or pending
    assert storage["failed_requests"] == 0
    deadline = time.monotonic() + 10  # /metrics serves the status of the last heartbeat
    while (scraped := retries_metric(status["metrics_url"])) == 0:
        assert time.monotonic() < deadline, "tokenfeed_storage_retries_total stayed 0"
        time.sleep(0.1)
    assert 0 < scraped <= proxy.failed


def retries_metric(url: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return float(re.search(r"^tokenfeed_storage_retries_total (\S+)$", text, re.M)[1])


def test_a_request_that_keeps_failing_is_tried_every_attempt_then_named(
        s3, proxy, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    from tokenfeed.common.errors import DataError
    from tokenfeed.producer import storage

    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.001)  # the back-off, not the count
    proxy.fail_every = 1
    retried, failed = storage.retry_count(), storage.failed_count()
    with pytest.raises(DataError, match=r"cannot list s3://tokenfeed-test/gone .*SLOW_DOWN"):
        storage.list_shards(f"s3://{BUCKET}/gone")
    assert proxy.requests == storage.RETRY_ATTEMPTS
    assert storage.retry_count() - retried == storage.RETRY_ATTEMPTS - 1
    assert storage.failed_count() - failed == 1


def _read_until_error(feed: object, n: int) -> int:
    for _ in range(n):
        next(feed)  # type: ignore[call-overload]
    return n


def test_a_shard_deleted_mid_run_fails_the_stream_naming_it(
        start_daemon, corpus, s3, proxy):  # noqa: F811
    url = upload(s3, corpus, "deleted")
    daemon = start_daemon("--task-kib", "1", workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for _ in range(3):
            next(feed)
        s3.delete_object(Bucket=BUCKET, Key="deleted/shard_00001.parquet")
        with pytest.raises(StreamFailedError,
                           match=r"shard s3://[^ ]+/shard_00001\.parquet was deleted"):
            _read_until_error(feed, 400)  # ~25 epochs: every shard is read again


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_a_shard_deleted_mid_run_is_skipped_with_on_error_skip(
        start_daemon, corpus, s3, proxy):  # noqa: F811
    url = upload(s3, corpus, "skipped")
    daemon = start_daemon("--task-kib", "1", "--on-error", "skip", workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for _ in range(3):
            next(feed)
        s3.delete_object(Bucket=BUCKET, Key="skipped/shard_00001.parquet")
        for _ in range(100):
            next(feed)
        stream = daemon.status()["streams"][0]
    assert stream["skipped_row_group_count"] > 0
    assert all("shard_00001.parquet" in g for g in stream["skipped_row_groups"])


def test_a_shard_replaced_mid_run_fails_the_stream_naming_it(
        start_daemon, corpus, s3, proxy, tmp_path: Path):  # noqa: F811
    url = upload(s3, corpus, "replaced")
    other = write_corpus(tmp_path / "other", {"x.parquet": 3}) / "x.parquet"  # another size
    daemon = start_daemon("--task-kib", "1", workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for _ in range(3):
            next(feed)
        s3.upload_file(str(other), BUCKET, "replaced/shard_00001.parquet")
        with pytest.raises(StreamFailedError,
                           match=r"shard s3://[^ ]+/shard_00001\.parquet was replaced"):
            _read_until_error(feed, 400)


def test_a_local_shard_replaced_by_another_size_mid_run_fails_the_stream_naming_it(
        start_daemon, corpus, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    daemon = start_daemon("--task-kib", "1", workers=2, data=data)
    with daemon.feed(B, T) as feed:
        for _ in range(3):
            next(feed)
        write_corpus(tmp_path / "other", {"x.parquet": 3})
        os.replace(tmp_path / "other" / "x.parquet", data / "shard_00001.parquet")
        with pytest.raises(StreamFailedError, match=r"shard_00001\.parquet was replaced"):
            _read_until_error(feed, 400)
