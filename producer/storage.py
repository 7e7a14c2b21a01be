"""Where shards live: a local folder, or object storage (`s3://`, `gs://`, ...) via pyarrow.fs.

    shard = list_shards("s3://bucket/fineweb")[0]   # Shard(name, path, size, version)
    pf = open_parquet(shard.path)                    # ranged reads: footer, then column pages

A shard's `path` is a local path or a full URL (`s3://bucket/key`); `open_parquet` opens
either, so workers get a plain string in their tasks. Object stores are opened once per
bucket and process with pyarrow's own clients, which read credentials, region and
endpoint from the standard environment and config files (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...; for GCS, the Google
application credentials), never from flags or logs, and retry throttling and transient
errors themselves (`S3_RETRY_ATTEMPTS` for S3). A Parquet reader over such a file
fetches the footer and then only the byte ranges of the columns it reads.

`version` identifies a shard's content beyond its size: empty for local files (whose
fingerprint has always been name, size and row groups), the object's modification time
in nanoseconds for object storage, so a replaced object (same size or not) is a
different shard and a saved state refuses it.

Failure behaviour: a missing bucket, denied access or an unknown scheme raises
`DataError` naming the URL and the fix.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokenfeed.common.errors import DataError

S3_RETRY_ATTEMPTS = 10  # pyarrow's default is 3: a busy bucket throttles more than that
_filesystems: dict[str, Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Shard:
    name: str  # file name: sorting and the fingerprint use it
    path: str  # local path, or the full URL of the object
    size: int
    version: str  # "" for local files; the object's mtime (ns) for object storage


def is_url(data: str | os.PathLike[str]) -> bool:
    return "://" in str(data)


def _filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URL; one filesystem per bucket."""
    scheme, rest = url.split("://", 1)
    bucket = rest.split("/", 1)[0]
    key = f"{scheme}://{bucket}"
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:
                if scheme == "s3":
                    fs = pafs.S3FileSystem(
                        endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(
                            max_attempts=S3_RETRY_ATTEMPTS),
                    )
                else:
                    fs, _ = pafs.FileSystem.from_uri(url)
            except Exception as e:
                raise DataError(
                    f"cannot open {key} ({type(e).__name__}: {e}); check the URL scheme "
                    "(s3://, gs://, ...) and the credentials in the environment"
                ) from None
            _filesystems[key] = fs
    return fs, rest


def list_shards(data: str | os.PathLike[str]) -> list[Shard]:
    """The `*.parquet` shards of a folder or bucket prefix, sorted by name."""
    if not is_url(data):
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data dir {root} does not exist; pass --data DIR with your Parquet shards")
        return [Shard(p.name, str(p), p.stat().st_size, "")
                for p in sorted(root.glob("*.parquet")) if p.is_file()]
    url = str(data).rstrip("/")
    fs, prefix = _filesystem(url)
    scheme = url.split("://", 1)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=False))
    except FileNotFoundError:
        raise DataError(f"{url} does not exist; check the bucket and prefix") from None
    except OSError as e:
        raise DataError(
            f"cannot list {url} ({e}); check the bucket name, the endpoint (AWS_ENDPOINT_URL) "
            "and that the credentials may list it"
        ) from None
    shards = [
        Shard(info.base_name, f"{scheme}://{info.path}", int(info.size or 0),
              str(info.mtime_ns or ""))
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    ]
    return sorted(shards, key=lambda s: s.name)


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file, local or in object storage (ranged reads)."""
    if not is_url(path):
        return pq.ParquetFile(path)
    fs, inner = _filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))
