"""Where shards live: a local folder, or object storage (`s3://`, `gs://`, ...) via pyarrow.fs.

    shard = list_shards("s3://bucket/fineweb")[0]   # Shard(name, path, size, version, mtime_ns)
    pf = open_parquet(shard.path)                    # ranged reads: footer, then column pages

A shard's `path` is a local path or a full URL (`s3://bucket/key`); `open_parquet` opens
either, so workers get a plain string in their tasks. Object stores are opened once per
bucket and process with pyarrow's own clients, which read credentials, region and
endpoint from the standard environment and config files (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...; for GCS, the Google
application credentials), never from flags or logs. A Parquet reader over such a file
fetches the footer and then only the byte ranges of the columns it reads.

**Retries.** Every object-storage request (listing, metadata, each ranged read) is tried
up to `RETRY_ATTEMPTS` times with exponential back-off and full jitter (a sleep drawn from
[0, min(`RETRY_CAP_S`, `RETRY_BASE_S` * 2^attempt)], so hundreds of nodes throttled at
the same moment do not come back at the same moment). The S3 client's own retries are
off (`S3_SDK_ATTEMPTS`) so that each retry is seen here: `retry_count()` (this process)
is what status and Prometheus report, summed over the daemon and its workers. A read
that fails is first checked against the object (one metadata request): an object that
is gone or replaced is not retried but raises `ShardChangedError` naming it (what counts
as a change: `open_parquet`); the stream then follows `--on-error` as for any row group
that cannot be read.

`version` identifies a shard's content beyond its size: empty for local files (whose
fingerprint has always been name, size and row groups), the object's modification time
in nanoseconds for object storage, so a replaced object (same size or not) is a
different shard and a saved state refuses it. `mtime_ns` is the modification time of
either kind (it keys the token cache and checks a manifest).

Failure behaviour: a missing bucket, denied access or an unknown scheme raises
`DataError` naming the URL and the fix; a request that still fails after its attempts
raises the last `OSError`.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokenfeed.common.errors import DataError

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 8  # tries of one request: at a 5% error rate, 8 in a row is 4e-11
RETRY_BASE_S = 0.05  # first back-off bound; doubles each attempt
RETRY_CAP_S = 5.0  # a back-off never exceeds this (S3's throttling clears in seconds)
S3_SDK_ATTEMPTS = 1  # the AWS SDK's own retries: off, ours are counted
T = TypeVar("T")

_filesystems: dict[str, Any] = {}
_lock = threading.Lock()
_counts = {"retries": 0, "failed": 0}  # this process: requests retried, and given up


class ShardChangedError(DataError):
    """A shard was deleted or replaced after the daemon planned it."""


@dataclass(frozen=True)
class Shard:
    name: str  # file name: sorting and the fingerprint use it
    path: str  # local path, or the full URL of the object
    size: int
    version: str  # "" for local files; the object's mtime (ns) for object storage
    mtime_ns: int = 0  # the modification time, local or not

    @property
    def stamp(self) -> str:
        """"<size>:<mtime ns>": what the token cache keys the shard by."""
        return f"{self.size}:{self.mtime_ns if not self.version else self.version}"


def is_url(data: str | os.PathLike[str]) -> bool:
    return "://" in str(data)


def retry_count() -> int:
    """Object-storage requests this process retried."""
    return _counts["retries"]


def failed_count() -> int:
    """Object-storage requests this process gave up on after `RETRY_ATTEMPTS`."""
    return _counts["failed"]


def storage_summary(pool_stats: dict[str, Any]) -> dict[str, int]:
    """status's `storage`: object-storage requests retried and given up on, by the daemon
    (listing, footers, manifest) and its workers (their `done`/`failed` reports) together."""
    return {"retries": retry_count() + int(pool_stats.get("storage_retries", 0)),
            "failed_requests": failed_count() + int(pool_stats.get("storage_failed", 0))}


def take_counts() -> dict[str, int]:
    """Requests retried and given up on since the last call: the fields a worker adds to
    its `done`/`failed` reports (optional fields of the worker channel)."""
    with _lock:
        counts = {"retries": _counts["retries"], "failed_requests": _counts["failed"]}
        _counts["retries"] = _counts["failed"] = 0
    return counts


def _count(key: str) -> None:
    with _lock:
        _counts[key] += 1


def backoff_s(attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0.0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt))


def with_retries(what: str, call: Callable[[], T],
                 permanent: Callable[[OSError], BaseException | None] = lambda e: None) -> T:
    """`call()`, retried on `OSError` with back-off; `permanent(e)` may name an error
    that retrying cannot cure (a deleted object), which is raised at once instead."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as e:
            final = permanent(e)
            if final is not None:
                raise final from None
            if attempt == RETRY_ATTEMPTS - 1:
                _count("failed")
                raise
            _count("retries")
            delay_s = backoff_s(attempt)
            log.debug("%s failed (%s); retry %d in %.2f s", what, e, attempt + 1, delay_s)
            time.sleep(delay_s)  # back-off before the next attempt, not a synchronization
    raise AssertionError("unreachable")


def _filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URL; one filesystem per bucket."""
    scheme, rest = url.split("://", 1)
    bucket = rest.split("/", 1)[0]
    key = f"{scheme}://{bucket}"
    endpoint = (os.environ.get("AWS_ENDPOINT_URL") or None) if scheme == "s3" else None
    with _lock:
        fs = _filesystems.get(f"{key} {endpoint}")  # another endpoint: another client
        if fs is None:
            try:
                if scheme == "s3":
                    fs = pafs.S3FileSystem(
                        endpoint_override=endpoint,
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(
                            max_attempts=S3_SDK_ATTEMPTS),
                    )
                else:
                    fs, _ = pafs.FileSystem.from_uri(url)
            except Exception as e:
                raise DataError(
                    f"cannot open {key} ({type(e).__name__}: {e}); check the URL scheme "
                    "(s3://, gs://, ...) and the credentials in the environment"
                ) from None
            _filesystems[f"{key} {endpoint}"] = fs
    return fs, rest


def list_shards(data: str | os.PathLike[str]) -> list[Shard]:
    """The `*.parquet` shards of a folder or bucket prefix, sorted by name."""
    if not is_url(data):
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data dir {root} does not exist; pass --data DIR with your Parquet shards")
        shards = []
        for p in sorted(root.glob("*.parquet")):
            if p.is_file():
                st = p.stat()
                shards.append(Shard(p.name, str(p), st.st_size, "", st.st_mtime_ns))
        return shards
    url = str(data).rstrip("/")
    fs, prefix = _filesystem(url)
    scheme = url.split("://", 1)[0]
    try:
        infos = with_retries(f"listing {url}",
                             lambda: fs.get_file_info(pafs.FileSelector(prefix, recursive=False)))
    except FileNotFoundError:
        raise DataError(f"{url} does not exist; check the bucket and prefix") from None
    except OSError as e:
        raise DataError(
            f"cannot list {url} ({e}); check the bucket name, the endpoint (AWS_ENDPOINT_URL) "
            "and that the credentials may list it"
        ) from None
    shards = [
        Shard(info.base_name, f"{scheme}://{info.path}", int(info.size or 0),
              str(info.mtime_ns or ""), int(info.mtime_ns or 0))
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    ]
    return sorted(shards, key=lambda s: s.name)


def read_object(url: str) -> bytes:
    """A whole (small) object, with retries: a manifest."""
    fs, inner = _filesystem(url)

    def read() -> bytes:
        with fs.open_input_stream(inner, compression=None) as f:
            return bytes(f.read())

    return with_retries(f"reading {url}", read)


def write_object(url: str, data: bytes) -> None:
    fs, inner = _filesystem(url)

    def write() -> None:
        with fs.open_output_stream(inner, compression=None) as f:
            f.write(data)

    with_retries(f"writing {url}", write)


class _ObjectFile(io.RawIOBase):
    """A read-only object whose every ranged read is retried (see the module docstring)."""

    def __init__(self, fs: Any, inner: str, url: str, stamp: str) -> None:
        super().__init__()
        self.fs, self.inner, self.url, self.stamp = fs, inner, url, stamp
        if stamp:
            self._check()  # a replaced object is refused before any byte of it is used
        try:
            self.raw = with_retries(f"opening {url}", lambda: fs.open_input_file(inner))
        except FileNotFoundError:
            raise self._gone() from None
        self.size = int(self.raw.size())
        self.pos = 0

    def _gone(self) -> ShardChangedError:
        return ShardChangedError(
            f"shard {self.url} was deleted after the daemon listed it; restore it, or restart "
            "the daemon (and its trainers) on the data as it is now")

    def _check(self) -> None:
        info = with_retries(f"checking {self.url}", lambda: self.fs.get_file_info(self.inner))
        if info.type == pafs.FileType.NotFound:
            raise self._gone()
        now = f"{int(info.size or 0)}:{int(info.mtime_ns or 0)}"
        if self.stamp and now != self.stamp:
            raise ShardChangedError(
                f"shard {self.url} was replaced after the daemon listed it (size:mtime was "
                f"{self.stamp}, now {now}); restore it, or restart the daemon (and its "
                "trainers) on the data as it is now")

    def _permanent(self, e: OSError) -> BaseException | None:
        """After a failed read: is the object gone or replaced? (else: retry)"""
        try:
            self._check()
        except ShardChangedError as changed:
            return changed
        except OSError:
            pass  # the check failed too: the store is unwell, retry the read
        return None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def read(self, size: int = -1) -> bytes:
        n = self.size - self.pos if size is None or size < 0 else min(size, self.size - self.pos)
        if n <= 0:
            return b""
        pos = self.pos
        data = with_retries(f"reading {self.url}", lambda: self.raw.read_at(n, pos),
                            self._permanent)
        self.pos += len(data)
        return bytes(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed and hasattr(self, "raw"):
            self.raw.close()
        super().close()


def open_parquet(path: str, stamp: str = "") -> pq.ParquetFile:
    """A Parquet file, local or in object storage (ranged reads, each retried).

    With `stamp` (`Shard.stamp` when the daemon listed it), a shard that changed since is
    a `ShardChangedError` naming it: as the fingerprint sees shards, a local file by its
    size (a `touch` or a copy that keeps the content is no change), an object by its size
    and modification time (objects are only ever replaced whole)."""
    if not is_url(path):
        try:
            if stamp:
                st = os.stat(path)
                if str(st.st_size) != stamp.split(":", 1)[0]:
                    raise ShardChangedError(
                        f"shard {path} was replaced after the daemon listed it; restore it, "
                        "or restart the daemon (and its trainers) on the data as it is now")
            return pq.ParquetFile(path)
        except FileNotFoundError:
            raise ShardChangedError(
                f"shard {path} was deleted after the daemon listed it; restore it, or "
                "restart the daemon (and its trainers) on the data as it is now") from None
    fs, inner = _filesystem(path)
    return pq.ParquetFile(_ObjectFile(fs, inner, path, stamp))


def read_footer_metadata(shard: Shard) -> pq.FileMetaData:
    """A shard's Parquet footer alone, as the scan reads it: in object storage one ranged
    GET of the object's tail (its size is the listing's, so no HEAD comes first)."""
    if not is_url(shard.path):
        return open_parquet(shard.path).metadata
    import pyarrow.dataset as ds  # the daemon's scan only: workers never import it

    fs, inner = _filesystem(shard.path)

    def read() -> pq.FileMetaData:
        fragment = ds.ParquetFileFormat().make_fragment(inner, filesystem=fs,
                                                        file_size=shard.size)
        return fragment.metadata

    return with_retries(f"reading the footer of {shard.path}", read)
