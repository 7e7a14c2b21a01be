"""A producer worker process: read a range of a row group's documents, tokenize, stage.

The daemon sends `task` messages (common/protocol.py, the worker channel) over a
ZeroMQ DEALER socket: rows `lo:hi` of one row group's text column (in the row
group's shuffled order when a `doc_seed` is given), and which of the worker's two
staging buffers (segments owned and unlinked by the daemon) to write into. A
worker holds up to two tasks and works through them in order, so the daemon's
round trip after a `done` never leaves its core idle. Each document becomes BOS +
`encode_ordinary(text)` (tiktoken, or a backend proven identical: backends.py); the
result is laid out in staging as

    offset 0                      tokens (itemsize bytes each)
    rows_offset (8-aligned)       int64 tokens of each row, in the task's order (0: a null
                                  or non-string value, skipped; else BOS + the text's)

then `done` carries the counts and the seconds spent reading and tokenizing.
Nothing is pickled; token data never touches the socket.

Parquet pages are decoded once per row group per worker: the decoded text column
of the last row group is kept, so the parts of one row group that a worker gets
share one read (and one shuffle permutation).

Failure behaviour: an exception while reading or tokenizing becomes a `failed`
reply naming the row group; a result larger than its staging buffer asks the daemon
for a bigger one (`grow`) and waits for it (an empty name: none could be made, and
the daemon has failed the task itself); a malformed message is logged and dropped;
a worker whose daemon died (its parent, the daemon's fork server, exits with it) exits
within a second.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.errors import ProtocolError, TokenizerError
from tokenfeed.common.ring import token_dtype_of_size
from tokenfeed.common.shm import Segment
from tokenfeed.producer.backends import make_encoder
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.storage import open_parquet, take_counts
from tokenfeed.producer.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

PARENT_CHECK_MS = 1000
NO_TOKENIZER_EXIT = 3  # a worker's exit code when its tokenizer does not load
PRELOAD_ENV = "TOKENFEED_WORKER_PRELOAD"  # the fork server's tokenizer (worker_preload.py)
OPEN_FILES = 8  # ParquetFile objects kept open: footers are re-parsed otherwise

# texts -> (all tokens, one flat uint32 array without BOS; int64 length of each text)
EncodeBatch = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def staging_layout(n_tokens: int, n_rows: int, itemsize: int) -> tuple[int, int]:
    """(rows_offset, total bytes) of a result in staging."""
    rows_offset = -(-n_tokens * itemsize // 8) * 8
    return rows_offset, rows_offset + 8 * n_rows


@lru_cache(maxsize=16)
def _parsed(text: str) -> Filter:
    return Filter.parse(text)


def read_filtered(pf: pq.ParquetFile, row_group: int, column: str, kept: Filter | None
                  ) -> tuple[pa.ChunkedArray | None, np.ndarray | None]:
    """A row group's text column and which of its rows `kept` (a source's filter) keeps:
    (text, None) without a filter; (None, mask) when the filter keeps no row. A dropped
    document then delivers nothing, as a null text does, and keeps its row index, so
    positions, elastic layouts and provenance count rows the same with or without it.

    Only the filter's columns are read besides the text, and the filter first: a row
    group it drops whole costs no text decoding. Decoding the text of the rows it drops
    is the filter's remaining cost (~7 ms of CPU per 1,024 documents of ~4 MB, against
    ~140 ms of tokenizing the 31% that `benchmarks/filter.py`'s filter keeps): Parquet
    decodes a column chunk's pages whole, and kept rows lie in every page."""
    if kept is None:
        return _read(pf, row_group, [column]).column(0), None
    table = _read(pf, row_group, list(kept.columns))
    mask = kept.mask(table).to_numpy(zero_copy_only=False)
    if not mask.any():
        return None, mask
    text = (table.column(column) if column in kept.columns
            else _read(pf, row_group, [column]).column(0))
    return text, mask


def _read(pf: pq.ParquetFile, row_group: int, columns: list[str]) -> pa.Table:
    """Columns of a row group, decoded on this thread: a worker is one process per core,
    and Arrow's thread pool (which parallelizes across columns, one here) only hands
    the work to another thread and back. Two worker-like processes reading the filtered
    row groups of benchmarks/filter.py at load 12-16: read wall -38% and -9%, read CPU
    -30% and -6% in two runs."""
    return pf.read_row_group(row_group, columns=columns, use_threads=False)


class RowGroupReader:
    """Rows of a row group's text column; the last row group read stays decoded."""

    def __init__(self) -> None:
        self.files: OrderedDict[str, pq.ParquetFile] = OrderedDict()
        self.key: tuple[str, int, str, str] | None = None
        self.column: pa.ChunkedArray | None = None  # None: a filter dropped every row
        self.mask: np.ndarray | None = None  # rows the filter keeps (None: no filter)
        self.num_rows = 0
        self.order_seed: list[int] | None = None
        self.order: np.ndarray | None = None

    def _file(self, path: str, stamp: str = "") -> pq.ParquetFile:
        pf = self.files.get(path)
        if pf is None:
            pf = self.files[path] = open_parquet(path, stamp)
            if len(self.files) > OPEN_FILES:
                self.files.popitem(last=False)
        self.files.move_to_end(path)
        return pf

    def values(
        self, path: str, row_group: int, column: str, rows: Sequence[int],
        doc_seed: list[int] | None, stamp: str = "", filter_text: str = "",
    ) -> list[Any]:
        """Values `rows[0]:rows[1]` of the row group, in its seeded order if `doc_seed`;
        with `filter_text`, None where the filter drops the row."""
        key = (path, row_group, column, filter_text)
        if key != self.key:
            self.key = self.column = self.mask = self.order = None  # a failed read keeps
            text, mask = read_filtered(                             # nothing stale
                self._file(path, stamp), row_group, column,
                _parsed(filter_text) if filter_text else None)
            self.column, self.mask = text, mask
            self.num_rows = len(text) if text is not None else len(mask) if mask is not None else 0
            self.key = key
        lo, hi = rows
        if hi > self.num_rows:
            raise ValueError(f"rows {lo}:{hi} are past the row group's {self.num_rows} rows")
        picked: np.ndarray | None = None  # row indices, in the seeded order
        if doc_seed is not None:
            if self.order is None or self.order_seed != doc_seed:
                self.order = np.random.default_rng(doc_seed).permutation(self.num_rows)
                self.order_seed = doc_seed
            picked = self.order[lo:hi]
        if self.mask is None:
            assert self.column is not None
            if picked is None:
                return self.column.slice(lo, hi - lo).to_pylist()
            return self.column.take(pa.array(picked)).to_pylist()
        # Filtered: only the kept rows' text becomes Python strings (a dropped row is
        # None without touching its text), and no array is built for the rest.
        out: list[Any] = [None] * (hi - lo)
        at = np.flatnonzero(self.mask[lo:hi] if picked is None else self.mask[picked])
        if len(at) and self.column is not None:
            index = at + lo if picked is None else picked[at]
            for i, v in zip(at.tolist(), self.column.take(pa.array(index)).to_pylist(),
                            strict=True):
                out[i] = v
        return out


def tokenize_documents(
    values: list[Any], encode_batch: EncodeBatch, bos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint32 with a BOS before each document, tokens of each value: 0 if skipped)."""
    is_str = np.fromiter((isinstance(v, str) for v in values), dtype=bool, count=len(values))
    texts = [v for v in values if isinstance(v, str)]
    flat, lengths = encode_batch(texts)
    starts = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    tokens = np.empty(len(flat) + len(texts), dtype=np.uint32)
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[starts] = False
    tokens[starts] = bos_id
    tokens[is_text] = flat
    row_tokens = np.zeros(len(values), dtype=np.int64)
    row_tokens[is_str] = lengths + 1
    return tokens, row_tokens


class _Channel:
    """The worker's DEALER: messages in order, with those that arrive out of turn kept."""

    def __init__(self, worker_id: int, address: str, daemon_pid: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"w{worker_id}".encode())
        self.sock.connect(address)
        self.daemon_pid = daemon_pid
        # Forked by the pool's fork server, which exits with the daemon: a new parent
        # pid (or no daemon pid) means the daemon is gone.
        self.server_pid = os.getppid()
        self.inbox: deque[protocol.Message] = deque()

    def send(self, op: str, **fields: Any) -> None:
        self.sock.send(protocol.encode(op, **fields))

    def wait_for(self, *ops: str) -> protocol.Message | None:
        """The first queued or incoming message of `ops` (or `exit`); None: the daemon died."""
        for msg in self.inbox:
            if msg["op"] in (*ops, "exit"):
                self.inbox.remove(msg)
                return msg
        while os.getppid() == self.server_pid and _alive(self.daemon_pid):
            if not self.sock.poll(PARENT_CHECK_MS):
                continue
            try:
                msg = protocol.decode_worker(self.sock.recv())
            except ProtocolError as e:
                log.warning("worker dropped a malformed message: %s", e)
                continue
            if msg["op"] in (*ops, "exit"):
                return msg
            self.inbox.append(msg)
        return None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a pid reused by another user's process
        return False
    return True


def task_filter(msg: protocol.Message) -> str:
    """A task's optional filter text ("" : none); anything but a string is refused."""
    text = msg.get("filter", "")
    if not isinstance(text, str):
        raise ProtocolError(f"task field 'filter' = {text!r:.40} is not a string")
    return text


def task_encoding(msg: protocol.Message) -> tuple[str, int]:
    """A task's (backend, token itemsize): the daemon learns them after it spawned its
    workers (pool.configure), so they travel with every task; anything else is refused."""
    backend, itemsize = msg.get("backend"), msg.get("itemsize")
    if not isinstance(backend, str) or not backend:
        raise ProtocolError(f"task field 'backend' = {backend!r:.40} is not a backend name")
    if itemsize not in (2, 4) or isinstance(itemsize, bool):
        raise ProtocolError(f"task field 'itemsize' = {itemsize!r:.40} is not 2 or 4")
    return backend, int(itemsize)


def worker_niceness(nice: int, daemon_pid: int = 0) -> int:
    """A worker's niceness: the daemon's (`daemon_pid`, 0: this process) plus `nice`,
    absolute so that the pool and the worker itself can both set it."""
    return min(19, os.getpriority(os.PRIO_PROCESS, daemon_pid) + nice)


def worker_main(
    worker_id: int,
    address: str,
    tokenizer_spec: str,
    bos: str | None,
    nice: int,
    parent_pid: int,
) -> None:
    """Entry point of a worker process (spawned by the pool, possibly before the daemon
    knows the backend and token size: every task names them)."""
    if nice:  # keep the trainer's latency tail short on shared cores
        target = worker_niceness(nice, parent_pid)
        if os.getpriority(os.PRIO_PROCESS, 0) < target:  # the pool may have set it already
            os.setpriority(os.PRIO_PROCESS, 0, target)
    from tokenfeed.producer.worker_preload import preloaded  # the fork server's copy

    try:
        tokenizer = preloaded(tokenizer_spec, bos) or load_tokenizer(tokenizer_spec, bos)
    except TokenizerError:
        # Workers start before the daemon has checked its tokenizer; the daemon reports
        # a bad one in one line (and the pool names this exit code), so no traceback here.
        os._exit(NO_TOKENIZER_EXIT)
    encoders: dict[str, EncodeBatch] = {}  # by backend name: one, in practice

    def encoder(backend: str) -> EncodeBatch:
        if backend not in encoders:
            encoders[backend] = make_encoder(tokenizer, backend).encode_batch
        return encoders[backend]

    reader = RowGroupReader()
    staging: dict[int, Segment] = {}  # buffer index -> mapped segment
    channel = _Channel(worker_id, address, parent_pid)
    channel.send("hello", worker=worker_id, pid=os.getpid())

    def buffer(index: int, name: str) -> Segment:
        seg = staging.get(index)
        if seg is None or seg.name != name:
            if seg is not None:
                seg.close()
            seg = staging[index] = Segment.attach(name)
        return seg

    try:
        while (msg := channel.wait_for("task")) is not None and msg["op"] == "task":
            task, path, row_group = msg["task"], msg["path"], msg["row_group"]
            started = time.perf_counter()
            try:
                backend, itemsize = task_encoding(msg)
                encode_batch = encoder(backend)
                values = reader.values(path, row_group, msg["column"], msg["rows"],
                                       msg["doc_seed"], msg["stamp"], task_filter(msg))
                read_s = time.perf_counter() - started
                tokens, row_tokens = tokenize_documents(values, encode_batch, tokenizer.bos_id)
                tokenize_s = time.perf_counter() - started - read_s
                seg = buffer(msg["buffer"], msg["staging"])
            except Exception as e:  # reported to the daemon, which re-runs or fails the task
                channel.send("failed", task=task, **take_counts(),
                             error=f"{path} row group {row_group}: {type(e).__name__}: {e}")
                continue
            rows_offset, need = staging_layout(len(tokens), len(row_tokens), itemsize)
            if need > seg.size:
                channel.send("grow", task=task, need_bytes=need)
                reply = channel.wait_for("staging")
                if reply is None or reply["op"] == "exit":
                    break
                if not reply["name"]:
                    continue  # no room: the daemon failed this task
                seg = buffer(reply["buffer"], reply["name"])
            out = np.ndarray(len(tokens), dtype=token_dtype_of_size(itemsize), buffer=seg.mm)
            np.copyto(out, tokens, casting="unsafe")
            np.ndarray(len(row_tokens), dtype=np.int64, buffer=seg.mm, offset=rows_offset)[:] = (
                row_tokens
            )
            del out
            channel.send("done", task=task, n_tokens=len(tokens), n_rows=len(row_tokens),
                         rows_offset=rows_offset, read_s=read_s, **take_counts(),
                         tokenize_s=tokenize_s)
    finally:
        channel.close()
        for seg in staging.values():
            seg.close()
