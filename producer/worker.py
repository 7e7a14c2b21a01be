"""A producer worker process: read one row group, tokenize it, write it to staging.

The daemon sends a `unit` (file, row group, optional document-order seed) over a
ZeroMQ DEALER socket; the worker reads only the text column, prefixes each
document with BOS, tokenizes it with `encode_ordinary` semantics into one token
array, and writes into its staging segment (owned and unlinked by the daemon):

    offset 0                      tokens (itemsize bytes each)
    starts_offset (8-aligned)     int64 start of each document in the token array

then replies `done` with the counts. Nothing is pickled; token data never touches
the socket.

Failure behaviour: an exception while reading or tokenizing becomes a `failed`
reply naming the row group; a result larger than the staging segment asks the
daemon for a bigger one (`grow`) and waits for it; a worker whose daemon died
(parent pid changed) exits within a second.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.shm import Segment
from tokenfeed.producer.tokenizer import encode_document, load_tokenizer

log = logging.getLogger(__name__)

PARENT_CHECK_MS = 1000
OPEN_FILES = 8  # ParquetFile objects kept open: footers are re-parsed otherwise


def staging_layout(n_tokens: int, n_docs: int, itemsize: int) -> tuple[int, int]:
    """(starts_offset, total bytes) of a result in staging."""
    starts_offset = -(-n_tokens * itemsize // 8) * 8
    return starts_offset, starts_offset + 8 * n_docs


def tokenize_row_group(
    pf: pq.ParquetFile,
    row_group: int,
    column: str,
    encoding: Any,
    bos_id: int,
    doc_seed: list[int] | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens uint32, document starts int64, skipped values) of one row group."""
    texts = pf.read_row_group(row_group, columns=[column]).column(0).to_pylist()
    if doc_seed is not None:
        order = np.random.default_rng(doc_seed).permutation(len(texts))
        texts = [texts[i] for i in order]
    bos = np.array([bos_id], dtype=np.uint32)
    parts: list[np.ndarray] = []
    starts: list[int] = []
    skipped = 0
    n = 0
    for text in texts:
        if not isinstance(text, str):
            skipped += 1
            continue
        ids = encode_document(encoding, text)
        starts.append(n)
        parts.append(bos)
        parts.append(ids)
        n += 1 + len(ids)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens, np.asarray(starts, dtype=np.int64), skipped


def worker_main(
    worker_id: int,
    address: str,
    tokenizer_spec: str,
    bos: str | None,
    itemsize: int,
    staging_name: str,
    nice: int,
    parent_pid: int,
) -> None:
    """Entry point of a worker process (spawned by the pool)."""
    if nice:
        os.nice(nice)  # keep the trainer's latency tail short on shared cores
    tokenizer = load_tokenizer(tokenizer_spec, bos)
    dtype = np.dtype({2: np.uint16, 4: np.uint32}[itemsize])
    staging = Segment.attach(staging_name)
    files: OrderedDict[str, pq.ParquetFile] = OrderedDict()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"w{worker_id}".encode())
    sock.connect(address)
    sock.send(protocol.encode("hello", worker=worker_id, pid=os.getpid()))

    def wait_for(op: str) -> protocol.Message | None:
        while True:
            if os.getppid() != parent_pid:
                return None
            if sock.poll(PARENT_CHECK_MS):
                msg = protocol.decode(sock.recv())
                if msg["op"] in (op, "exit"):
                    return msg

    try:
        while True:
            msg = wait_for("unit")
            if msg is None or msg["op"] == "exit":
                break
            unit = msg["unit"]
            path, row_group = msg["path"], msg["row_group"]
            try:
                pf = files.get(path)
                if pf is None:
                    pf = files[path] = pq.ParquetFile(path)
                    if len(files) > OPEN_FILES:
                        files.popitem(last=False)
                files.move_to_end(path)
                tokens, starts, skipped = tokenize_row_group(
                    pf, row_group, msg["column"], tokenizer.encoding, tokenizer.bos_id,
                    msg.get("doc_seed"),
                )
            except Exception as e:  # reported to the daemon, which fails the stream
                sock.send(protocol.encode(
                    "failed", unit=unit,
                    error=f"{path} row group {row_group}: {type(e).__name__}: {e}",
                ))
                continue
            starts_offset, need = staging_layout(len(tokens), len(starts), itemsize)
            if need > staging.size:
                sock.send(protocol.encode("grow", unit=unit, need_bytes=need))
                reply = wait_for("staging")
                if reply is None or reply["op"] == "exit":
                    break
                staging.close()
                staging = Segment.attach(reply["name"])
            out = np.ndarray(len(tokens), dtype=dtype, buffer=staging.mm)
            np.copyto(out, tokens, casting="unsafe")
            np.ndarray(len(starts), dtype=np.int64, buffer=staging.mm, offset=starts_offset)[:] = (
                starts
            )
            del out
            sock.send(protocol.encode(
                "done", unit=unit, n_tokens=len(tokens), n_docs=len(starts), skipped=skipped,
                starts_offset=starts_offset,
            ))
    finally:
        sock.close(linger=0)
        ctx.term()
        staging.close()
