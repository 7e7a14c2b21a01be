"""Shards in object storage: a real S3-compatible server (moto) on 127.0.0.1.

Batches served from `s3://bucket/prefix` must equal those served from the same files on
disk, bit for bit, and a saved state must refuse a bucket in which an object was
replaced, naming it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_batch_equals

from tokenfeed.common.errors import DataError, StateMismatchError

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "tokenfeed-test"
B, T = 4, 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A moto S3 server of its own; the environment points every client (daemons too) at it."""
    port = free_port()
    server = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=10)


def upload(client: object, corpus: Path, prefix: str) -> str:
    for path in sorted(corpus.glob("*.parquet")):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")  # type: ignore[attr-defined]
    return f"s3://{BUCKET}/{prefix}"


def test_batches_from_s3_equal_batches_from_disk(start_daemon, oracle, corpus, s3):
    url = upload(s3, corpus, "corpus")
    want = oracle(batch_size=B, seq_len=T, n=30)  # the local files' reference
    daemon = start_daemon("--task-kib", "1", workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for k in range(30):
            assert_batch_equals(next(feed), want[k], f"batch {k}")


@pytest.mark.slow
def test_a_replaced_object_makes_the_saved_state_fail_naming_it(start_daemon, corpus, s3,
                                                               tmp_path):
    url = upload(s3, corpus, "replaced")
    daemon = start_daemon(workers=2, data=url)
    with daemon.feed(B, T) as feed:
        for _ in range(5):
            next(feed)
        state = feed.state_dict()
    assert daemon.stop() == 0
    time.sleep(1.1)  # object modification times have a resolution of a second
    other = tmp_path / "other.parquet"
    shutil.copy(sorted(corpus.glob("*.parquet"))[0], other)  # other content, same name
    s3.upload_file(str(other), BUCKET, "replaced/shard_00002.parquet")
    again = start_daemon(workers=1, data=url)
    with again.feed(B, T) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"shard_00002\.parquet"):
            next(feed)


def test_a_missing_bucket_is_a_clear_error(start_daemon, s3):
    from tokenfeed.producer.dataset import scan_dataset

    with pytest.raises(DataError, match="no-such-bucket"):
        scan_dataset(f"s3://no-such-bucket-{os.getpid()}/x")
