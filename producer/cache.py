"""A node-local cache of tokenized row groups: tokenize once, serve later epochs from memory.

One file per row group, `<dir>/<key>.tok`, holding its rows in file order:

    HEADER (48 bytes)   magic(8s) version(I) itemsize(I) n_rows(Q) n_tokens(Q) checksum(Q)
                        reserved(8x)
    row_tokens          int64[n_rows]: tokens of each row, 0 for a skipped (null) value
    tokens              itemsize * n_tokens: each row's BOS + encode_ordinary(text)

`key` is a digest of what determines the tokens and nothing else: the shard's name,
size and modification time when the daemon started (an object's, in object storage),
the row group's index, the text column, and the tokenizer's identity (the encoding,
never the backend: backends are exact). A changed shard or another tokenizer therefore
never reads stale tokens, and a shuffled epoch reads the same entry: rows are permuted
when the entry is read, as a worker would.

Safe by construction: an entry is written to a unique temporary name and renamed into
place, so a reader (this daemon or another of the same user sharing the directory)
sees a whole entry or none; every read checks the header and the size, and an adler32
of the payload the first time this daemon reads the entry and whenever its file changed
since (device, inode, size or modification time, which each read sets); a torn or
corrupted entry is deleted, counted and tokenized again. Entries are read (`preadv`)
into arrays of their own, never mapped: a file truncated under a map raises SIGBUS.
Checking every read would cost 32% of the daemon's time serving a warm cache (2.4 ms
of each 1.08M-token unit, 1.9 of them adler32); a bounded memo skips it for unchanged
files, so warm epochs cost a read (~0.4 ms a unit). What the memo lets through: a file
changed in place within the mtime's resolution, or media errors after a verified read.
A stream that cuts a unit's tokens into windows as they lie (concat, in file order, no
exclusions) can leave them in the file: `get(..., in_file=True)` of an entry verified
before returns `FileTokens`, which `read_into` a ring slot straight from the file (one
copy, the kernel's, instead of a read into an array and a second copy into the slot;
serving 8 ranks from a warm cache, those reads and copies were ~40% of the daemon's CPU).
It holds the entry open, so an eviction or a rewrite meanwhile (both rename or unlink)
does not change what it reads; a file truncated in place under it is a short read,
raised as CacheError (the stream fails, naming the entry).
Writes happen on a background thread, so the daemon's loop never waits for a disk.
The directory is bounded by `max_bytes`: before a write that would push it over, the
least recently used entries (mtime, touched on every hit) are removed, under an flock so
two daemons do not evict at once; an entry larger than the whole bound is not cached. The
size is this daemon's estimate (a scan at start and at each eviction, plus its own
writes), so daemons sharing a directory can overshoot it until one of them evicts. A full
or failing disk disables the cache with one warning; a stream never fails because of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import struct
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenfeed.common.errors import TokenfeedError
from tokenfeed.common.ring import token_dtype_of_size

log = logging.getLogger(__name__)

MAGIC = b"TFCACHE1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ8x")
SUFFIX = ".tok"
LOCK_NAME = ".lock"
QUEUE_UNITS = 64  # entries waiting for the writer; past it new ones are not cached
# Entries whose verified state is remembered (~200 bytes each): 4,096 FineWeb-Edu row
# groups of ~4 MB are a 16 GiB cache; past it, the least recently read is checked again.
VERIFIED_ENTRIES = 4096


@dataclass(frozen=True)
class CachedRows:
    """A row group's rows in file order: `tokens[starts[i]:starts[i] + row_tokens[i]]`,
    in arrays of their own (read from the entry, not views of it)."""

    tokens: np.ndarray | FileTokens  # FileTokens: asked with in_file=True
    row_tokens: np.ndarray

    def in_order(self, order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, row_tokens) with the rows in `order` (None: file order, these arrays)."""
        assert isinstance(self.tokens, np.ndarray), "FileTokens are taken as they lie"
        if order is None:
            return self.tokens, self.row_tokens
        return gather_rows(self.tokens, self.row_tokens, order)


class CacheError(TokenfeedError):
    """A cache entry read in place changed under its reader (truncated in place)."""


class FileTokens:
    """A verified entry's tokens left in its file, read on demand into their destination.

    Behaves as far as a unit's token array is asked (`len`, `dtype`, `nbytes`); the
    concat packer copies windows out of it with `read_into`. Owns a duplicate of the
    entry's descriptor, closed by `close` or when it is collected.
    """

    def __init__(self, fd: int, offset: int, n_tokens: int, dtype: np.dtype[Any],
                 path: Path) -> None:
        self.fd, self.offset, self.n_tokens, self.dtype, self.path = (
            fd, offset, n_tokens, dtype, path)
        self._finalizer = weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def nbytes(self) -> int:
        return self.n_tokens * self.dtype.itemsize

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Tokens `start : start + len(out)` into `out` (1-D, contiguous)."""
        if not 0 <= start <= start + len(out) <= self.n_tokens:
            raise IndexError(f"tokens {start}:{start + len(out)} of {self.n_tokens}")
        target = out if out.dtype == self.dtype else np.empty(len(out), dtype=self.dtype)
        try:
            got = _read_into(self.fd, [target], self.offset + start * self.dtype.itemsize)
        except OSError as e:
            raise CacheError(f"token cache entry {self.path} could not be read: {e}") from e
        if got != target.nbytes:
            raise CacheError(
                f"token cache entry {self.path} is shorter than when it was opened (truncated "
                "in place by another process?); clear the --cache-dir and restart the daemon")
        if target is not out:
            out[:] = target

    def close(self) -> None:
        self._finalizer()


def _read_into(fd: int, arrays: list[np.ndarray], offset: int) -> int:
    """Fill `arrays` from `fd` at `offset` (one preadv, more if the kernel returns less);
    returns the bytes read, fewer than asked only at the end of the file."""
    views = [a.data.cast("B") for a in arrays]
    want, done = sum(len(v) for v in views), 0
    while done < want:
        skip, rest = done, []
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        n = os.preadv(fd, rest, offset + done)
        if n == 0:
            break
        done += n
    return done


def gather_rows(
    tokens: np.ndarray, row_tokens: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `order[0], order[1], ...` of a unit: its tokens and row lengths, re-laid."""
    starts = np.cumsum(row_tokens) - row_tokens
    lengths = row_tokens[order]
    out_starts = np.cumsum(lengths) - lengths
    index = np.repeat(starts[order] - out_starts, lengths) + np.arange(int(lengths.sum()))
    return tokens[index], lengths


def file_order(tokens: np.ndarray, row_tokens: np.ndarray,
               order: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Undo `order`: the rows of a unit read in `order`, put back in file order."""
    if order is None:
        return tokens, row_tokens
    return gather_rows(tokens, row_tokens, np.argsort(order))


class TokenCache:
    def __init__(self, root: Path, max_bytes: int, tokenizer_identity: str, itemsize: int,
                 column: str) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.identity = tokenizer_identity
        self.itemsize = itemsize
        self.dtype = token_dtype_of_size(itemsize)
        self.column = column
        self.enabled = True
        self.hits = self.misses = self.corrupt = self.writes = self.evicted = 0
        self.bytes_used = sum(p.stat().st_size for p in self.root.glob("*" + SUFFIX))
        # entry name -> (device, inode, size, mtime ns) of its file when it was last read
        # whole and its checksum held; reads of an unchanged file skip the checksum.
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        self._queue: queue.Queue[tuple[Path, np.ndarray, np.ndarray] | None] = (
            queue.Queue(QUEUE_UNITS))
        # Entries queued and not yet written, served from memory meanwhile: a reader that
        # comes back at once (the next round of a validation set) must not miss them.
        self._pending: dict[Path, CachedRows] = {}
        self._pending_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="tokenfeed-cache",
                                        daemon=True)
        self._writer.start()
        for tmp in self.root.glob("*.tmp-*"):  # a crashed writer's leftovers
            with contextlib.suppress(OSError):
                if int(tmp.name.rsplit("-", 1)[1]) != os.getpid():
                    tmp.unlink()

    # -- keys -----------------------------------------------------------------

    def path(self, shard: str, stamp: str, row_group: int) -> Path:
        """The entry of a row group of `shard` as it was when the daemon started (`stamp`:
        its size and modification time)."""
        key = "\0".join([shard.rsplit("/", 1)[-1], stamp, str(row_group), self.column,
                         self.identity, str(self.itemsize)])
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:32] + SUFFIX)

    # -- reads ----------------------------------------------------------------

    def get(self, shard: str, stamp: str, row_group: int, *, in_file: bool = False
            ) -> CachedRows | None:
        """The entry's rows, or None. `in_file`: an entry verified before keeps its tokens
        in the file (FileTokens), for a reader that takes them in file order."""
        if not self.enabled:
            return None
        path = self.path(shard, stamp, row_group)
        with self._pending_lock:
            pending = self._pending.get(path)
        if pending is not None:
            self.hits += 1
            return pending
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self.misses += 1
            return None
        try:
            return self._read(fd, path, in_file)
        except OSError as e:
            self._discard(path, str(e))
            return None
        finally:
            os.close(fd)

    def _read(self, fd: int, path: Path, in_file: bool = False) -> CachedRows | None:
        """The entry open at `fd`, read into arrays of its own (a read, not a map: an entry
        truncated meanwhile is a short read here, where a map would raise SIGBUS)."""
        st = os.fstat(fd)
        if st.st_size < HEADER.size:
            self._discard(path, "shorter than its header")
            return None
        magic, version, itemsize, n_rows, n_tokens, checksum = HEADER.unpack(
            os.pread(fd, HEADER.size, 0))
        payload = HEADER.size + 8 * n_rows + itemsize * n_tokens
        if (magic, version, itemsize) != (MAGIC, VERSION, self.itemsize) or (
                st.st_size != payload):
            self._discard(path, f"header or size wrong ({st.st_size} bytes, {payload} expected)")
            return None
        row_tokens = np.empty(n_rows, dtype=np.int64)  # sizes checked against the file's
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if in_file and self._verified.get(path.name) == seen:
            if _read_into(fd, [row_tokens], HEADER.size) != row_tokens.nbytes:
                self._discard(path, "shorter than its header says")
                return None
            self._touch(fd, path)
            self.hits += 1
            return CachedRows(FileTokens(os.dup(fd), HEADER.size + row_tokens.nbytes, n_tokens,
                                         self.dtype, path), row_tokens)
        tokens = np.empty(n_tokens, dtype=self.dtype)
        if _read_into(fd, [row_tokens, tokens], HEADER.size) != payload - HEADER.size:
            self._discard(path, "shorter than its header says")
            return None
        if self._verified.get(path.name) != seen:
            if zlib.adler32(tokens.data, zlib.adler32(row_tokens.data)) != checksum:
                self._discard(path, "checksum mismatch")
                return None
            if int(row_tokens.sum()) != n_tokens or (row_tokens < 0).any():
                self._discard(path, "row lengths do not add up")
                return None
        self._touch(fd, path)
        self.hits += 1
        return CachedRows(tokens, row_tokens)

    def _touch(self, fd: int, path: Path) -> None:
        """Mark the entry just read as recently used, and as verified in that state."""
        with contextlib.suppress(OSError):
            os.utime(fd)  # least recently used goes first
            st = os.fstat(fd)  # the mtime just set, as the file system stores it
            self._remember(path.name, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    def _remember(self, name: str, seen: tuple[int, int, int, int]) -> None:
        """Note an entry as verified while its file stays as `seen`, in a bounded memo."""
        self._verified.pop(name, None)
        if len(self._verified) >= VERIFIED_ENTRIES:
            del self._verified[next(iter(self._verified))]  # the least recently read
        self._verified[name] = seen

    def _discard(self, path: Path, why: str) -> None:
        self._verified.pop(path.name, None)
        self.corrupt += 1
        self.misses += 1
        if self.corrupt <= 3:
            log.warning("token cache entry %s is damaged (%s); tokenizing it again", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    # -- writes ---------------------------------------------------------------

    def put(self, shard: str, stamp: str, row_group: int, tokens: np.ndarray,
            row_tokens: np.ndarray) -> None:
        """Queue a row group's rows (file order) for writing; never blocks."""
        if not self.enabled:
            return
        path = self.path(shard, stamp, row_group)
        if path.exists():
            return
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        rows = np.ascontiguousarray(row_tokens, dtype=np.int64)
        with self._pending_lock:
            self._pending[path] = CachedRows(data, rows)
        try:  # checksum and write on the writer thread
            self._queue.put_nowait((path, rows, data))
        except queue.Full:
            with self._pending_lock:
                self._pending.pop(path, None)

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            finally:
                with self._pending_lock:
                    self._pending.pop(item[0], None)
                self._queue.task_done()

    def _write(self, path: Path, rows: np.ndarray, data: np.ndarray) -> None:
        size = HEADER.size + rows.nbytes + data.nbytes
        if size > self.max_bytes:
            return  # one entry over the whole bound: the directory would not fit it
        if self.bytes_used + size > self.max_bytes:
            self._evict(room_bytes=size)  # before the write: the bound holds at every moment
        checksum = zlib.adler32(data.data, zlib.adler32(rows.data))  # buffers: no copy
        header = HEADER.pack(MAGIC, VERSION, self.itemsize, len(rows), len(data), checksum)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(rows.data)
                f.write(data.data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self.enabled:
                self.enabled = False
                log.warning("token cache %s disabled: cannot write (%s); streams go on "
                            "tokenizing", self.root, e)
            return
        self.writes += 1
        self.bytes_used += size

    def _evict(self, room_bytes: int) -> None:
        """Remove least recently used entries until the directory and `room_bytes` more
        fit in 90% of the bound (the rest is slack, so evictions come in batches)."""
        with open(self.root / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            for p in self.root.glob("*" + SUFFIX):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries):
                if total + room_bytes <= 0.9 * self.max_bytes:
                    break
                with contextlib.suppress(OSError):
                    p.unlink()
                    total -= size
                    self.evicted += 1
            self.bytes_used = total

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for the queued writes to finish."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._writer.join(timeout=10)

    def stats(self) -> dict[str, object]:
        return {"dir": str(self.root), "enabled": self.enabled, "hits": self.hits,
                "misses": self.misses, "corrupt": self.corrupt, "writes": self.writes,
                "evicted": self.evicted, "bytes": self.bytes_used, "max_bytes": self.max_bytes}
