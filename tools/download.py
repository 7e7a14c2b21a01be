"""Fetch Parquet shards `BASE_URL/shard_00000.parquet` ... into a folder, in parallel.

    summary = download(DownloadConfig(base_url=..., indices=range(8), out_dir=...), progress)

Naming is nanochat's (`SHARD_NAME`, which `corpus.py` writes too). `PRESETS` are the
public shard sets nanochat trains on; with a preset, `shard_indices` adds the set's last
shard, which nanochat keeps as its val shard, so that the last file of the folder is the
val split for `serve` too.

Per file, on one of `workers` threads:
- a file already at its final name that opens as Parquet is complete: skipped, no request;
- otherwise GET it, streaming 1 MiB chunks into `NAME.tmp` (a stale one from a killed run
  is overwritten), then check the byte count against Content-Length and that the file
  opens as Parquet (footer magic and metadata), then rename it to `NAME` atomically;
- connection errors, timeouts, HTTP 5xx and 429, truncated bodies and invalid Parquet are
  retried `attempts` times in all, waiting `backoff_s`, 2x, 4x ... (at most
  `max_backoff_s`) in between; other HTTP errors (404, 403) are permanent and fail the file
  at once.

Failure behaviour: a file that cannot be fetched is reported in the summary with its URL
and last error (the other files go on); no `.tmp` is left behind on any path, Ctrl-C
included (the workers stop between chunks). Only the standard library's HTTP client is
used: nothing to install. The CLI imports this module for its flags (`PRESETS`,
`DownloadConfig`'s defaults) on every command, so the HTTP client and pyarrow (~250 ms)
are imported only when a download runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tokenfeed.common.errors import ConfigError
from tokenfeed.tools.progress import Progress

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TMP_SUFFIX = ".tmp"
# Status codes worth another try: the server is overloaded or briefly failing.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "tokenfeed-download"
SHARD_NAME = "shard_{:05d}.parquet"  # nanochat's: shard_00000.parquet ...


@dataclass(frozen=True)
class Preset:
    base_url: str
    last_shard: int  # nanochat's val shard: the highest index of the set


# From nanochat's nanochat/dataset.py (BASE_URL, MAX_SHARD), old and current.
PRESETS = {
    "fineweb-edu-100b": Preset(
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
    "climbmix-400b": Preset(
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
}


def shard_indices(num_shards: int, preset: str | None) -> tuple[int, ...]:
    """The first `num_shards` shards, plus a preset's val shard (its last) as nanochat does."""
    if preset is None:
        return tuple(range(num_shards))
    last = PRESETS[preset].last_shard
    return (*range(min(num_shards, last)), last)


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    base_url: str
    indices: tuple[int, ...]
    out_dir: Path
    workers: int = 4
    attempts: int = 5
    backoff_s: float = 2.0  # the first wait; doubles per retry
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0  # per connect and per read

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url {self.base_url!r} must start with http:// or https://")
        if not self.indices:
            raise ConfigError("--num-shards must be >= 1")
        if min(self.indices) < 0:
            raise ConfigError(f"shard index {min(self.indices)} must be >= 0")
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"--workers {self.workers} must be in [1, 64]")
        if self.attempts < 1:
            raise ConfigError(f"--attempts {self.attempts} must be >= 1")
        if self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError(f"--backoff-s {self.backoff_s} must be >= 0 and the timeout > 0")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out {self.out_dir} is a file; pass a directory")

    def url(self, index: int) -> str:
        return f"{self.base_url.rstrip('/')}/{SHARD_NAME.format(index)}"


@dataclass
class Summary:
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (url, last error)
    bytes_fetched: int = 0
    retries: int = 0


class _Retry(Exception):
    """A transient failure: try again after the back-off."""


class _Permanent(Exception):
    """A failure another try will not fix (404, 403, ...)."""


def is_complete(path: Path) -> bool:
    """The file opens as Parquet: both magics and a readable footer."""
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            return False
        pq.ParquetFile(path).metadata  # noqa: B018 - parses the footer
        return True
    except Exception:  # any unreadable file is simply not complete
        return False


class _Fetcher:
    def __init__(self, config: DownloadConfig, progress: Progress | None) -> None:
        self.config = config
        self.progress = progress
        self.stop = threading.Event()
        self.summary = Summary()
        self._lock = threading.Lock()
        # Progress: each file's Content-Length once it answered (None: it adds nothing
        # more: skipped, failed or no length sent); files not answered yet are estimated at
        # the mean, since the shards of a set are about the same size.
        self._lengths: dict[int, int | None] = {}
        self._files = len(set(config.indices))
        self._counted: dict[int, int] = {}  # bytes of the current attempt, per file

    def _expect(self, index: int, length: int | None) -> None:
        """Record what file `index` will add to the progress total, and revise the total."""
        with self._lock:
            self._lengths[index] = length
            known = [n for n in self._lengths.values() if n is not None]
            if self.progress is not None and known:
                unanswered = self._files - len(self._lengths)
                self.progress.total = sum(known) + unanswered * sum(known) / len(known)

    def _uncount(self, index: int) -> None:
        """Take a failed attempt's bytes back: the bar shows the bytes of files kept or
        still coming, and the rate the speed at which they come."""
        counted = self._counted.pop(index, 0)
        if counted and self.progress is not None:
            self.progress.update(-counted)

    def one(self, index: int) -> None:
        config = self.config
        name = SHARD_NAME.format(index)
        dest = config.out_dir / name
        url = config.url(index)
        if is_complete(dest):
            with self._lock:
                self.summary.skipped.append(name)
            self._expect(index, None)
            return
        tmp = dest.with_name(name + TMP_SUFFIX)
        error = ""
        try:
            for attempt in range(1, config.attempts + 1):
                if self.stop.is_set():
                    error = "interrupted"
                    break
                try:
                    size = self._get(index, url, tmp)
                    if not is_complete(tmp):
                        raise _Retry(f"the body ({size:,} bytes) is not a valid Parquet file")
                    os.replace(tmp, dest)
                    with self._lock:
                        self.summary.fetched.append(name)
                        self.summary.bytes_fetched += size
                    return
                except _Permanent as e:
                    error = str(e)
                    break
                except _Retry as e:
                    error = str(e)
                if attempt < config.attempts:
                    delay_s = min(config.backoff_s * 2 ** (attempt - 1), config.max_backoff_s)
                    logger.info("%s: %s; retry %d/%d in %.1f s", url, error, attempt,
                                config.attempts - 1, delay_s)
                    with self._lock:
                        self.summary.retries += 1
                    self.stop.wait(delay_s)
            self._uncount(index)
            self._expect(index, None)
            with self._lock:
                self.summary.failed.append((url, error))
        finally:
            tmp.unlink(missing_ok=True)

    def _get(self, index: int, url: str, tmp: Path) -> int:
        """Stream `url` into `tmp`; the bytes written. Raises `_Retry` or `_Permanent`."""
        import http.client
        import urllib.error
        import urllib.request

        self._uncount(index)  # what an earlier attempt of this file counted
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        written = 0
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response, \
                    open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                self._expect(index, expected)
                # read1: what has arrived, up to a chunk, so that a slow server still
                # shows progress and a stop is seen between chunks; a body cut short ends
                # in b"" here (not IncompleteRead) and fails the Content-Length check
                while chunk := response.read1(CHUNK_BYTES):
                    if self.stop.is_set():
                        raise _Permanent("interrupted")
                    out.write(chunk)
                    written += len(chunk)
                    if self.progress is not None:
                        self._counted[index] = written
                        self.progress.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code in RETRY_STATUS:
                raise _Retry(f"HTTP {e.code} {e.reason}") from None
            raise _Permanent(f"HTTP {e.code} {e.reason} (not retried)") from None
        except http.client.IncompleteRead as e:
            missing = f"{e.expected:,} bytes" if e.expected else "bytes"
            raise _Retry(f"truncated body: the connection closed with {missing} still to "
                         "come") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise _Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        if expected is not None and written != expected:
            raise _Retry(f"truncated body: {written:,} bytes of Content-Length {expected:,}")
        return written


def download(config: DownloadConfig, progress: Progress | None = None) -> Summary:
    """Fetch every shard of `config`; see the module docstring. Ctrl-C stops the workers
    between chunks, removes their `.tmp` files and re-raises."""
    from concurrent.futures import ThreadPoolExecutor

    config.out_dir.mkdir(parents=True, exist_ok=True)
    fetcher = _Fetcher(config, progress)
    with ThreadPoolExecutor(max_workers=config.workers,
                            thread_name_prefix="tokenfeed-download") as pool:
        futures = [pool.submit(fetcher.one, index) for index in _unique(config.indices)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            fetcher.stop.set()
            for future in futures:
                future.cancel()
            raise
    return fetcher.summary


def _unique(indices: Iterable[int]) -> list[int]:
    return sorted(set(indices))
