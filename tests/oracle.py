"""Reference oracle: the data contract of ARCHITECTURE.md ("Data semantics"), in one page.

This is what the daemon's output is compared to, bit for bit. It is written to be
obviously right, not fast: one process, no shared memory, no tokenfeed imports, each
rule of the contract as a short function in the order the data flows.

1. Files and splits: `*.parquet` in `data_dir`, sorted by name; the last `val_files`
   files are "val", the others "train".
2. Global row-group sequence: every row group of every file of the split, files in
   order, row groups in order. Its length is N; the infinite stream repeats it once
   per epoch (no shuffle).
3. Rank striding: rank r of W reads global positions g = r, r+W, r+2W, ... of that
   infinite stream: epoch g // N, ordinal g % N. No per-file striding.
4. Documents: only `text_column` is read; nulls and non-`str` values are skipped (and
   counted); a document's tokens are `[bos_id] + enc.encode_ordinary(text)`.
5. Packing (`concat`): the rank's documents are concatenated; window k is
   stream[k*L:(k+1)*L] with L = batch_size*seq_len + 1; inputs = w[:-1] as (B, T)
   int32, targets = w[1:] as (B, T) int64.

Failure behaviour: a bad argument (unknown split, rank outside [0, W), an empty split,
a non-positive shape) raises ValueError naming the value. A rank whose row groups hold
no document at all raises ValueError instead of looping forever.

Speed: about one `encode_ordinary` call per document plus list appends; ~1M tokens
take a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

SPLITS = ("train", "val")


def split_files(data_dir: Path, split: str, val_files: int = 1) -> list[Path]:
    """The split's shards in order: the last `val_files` sorted files are val, the rest train."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
    if val_files < 0:
        raise ValueError(f"val_files={val_files} must be >= 0")
    files = sorted(
        (p for p in Path(data_dir).glob("*.parquet") if p.is_file()), key=lambda p: p.name
    )
    n_train = max(len(files) - val_files, 0)
    chosen = files[:n_train] if split == "train" else files[n_train:]
    if not chosen:
        raise ValueError(
            f"split {split!r} of {data_dir} is empty ({len(files)} parquet files, "
            f"val_files={val_files})"
        )
    return chosen


def row_group_sequence(files: list[Path]) -> list[tuple[Path, int]]:
    """One epoch of the global row-group sequence: (file, row group index), files in order."""
    return [(path, i) for path in files for i in range(pq.ParquetFile(path).num_row_groups)]


def rank_row_groups(
    files: list[Path], *, rank: int, world_size: int
) -> Iterator[tuple[int, int, Path, int]]:
    """Infinite: (epoch, ordinal, file, row group) at global positions rank, rank+W, ..."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    sequence = row_group_sequence(files)
    n = len(sequence)
    if n == 0:
        raise ValueError(f"files {[str(f) for f in files]} hold no row groups")
    g = rank
    while True:
        path, index = sequence[g % n]
        yield g // n, g % n, path, index
        g += world_size


def read_texts(path: Path, row_group: int, text_column: str = "text") -> tuple[list[str], int]:
    """The row group's documents in order, and how many null / non-str values were skipped."""
    table = pq.ParquetFile(path).read_row_group(row_group, columns=[text_column])
    texts: list[str] = []
    skipped = 0
    for value in table.column(text_column).to_pylist():
        if isinstance(value, str):
            texts.append(value)
        else:
            skipped += 1
    return texts, skipped


def rank_documents(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str,
    rank: int,
    world_size: int,
    val_files: int = 1,
    text_column: str = "text",
) -> Iterator[list[int]]:
    """Infinite: each document's tokens, BOS first, in the rank's row-group order."""
    files = split_files(Path(data_dir), split, val_files)
    n = len(row_group_sequence(files))
    # Within N consecutive strides a rank visits every ordinal it will ever visit
    # ((r + kW) mod N covers the residue class of r mod gcd(N, W)), so N empty row
    # groups in a row means the stream can never yield: fail instead of spinning.
    empty_in_a_row = 0
    for _epoch, _ordinal, path, index in rank_row_groups(files, rank=rank, world_size=world_size):
        texts, _skipped = read_texts(path, index, text_column)
        empty_in_a_row = 0 if texts else empty_in_a_row + 1
        if empty_in_a_row >= n:
            raise ValueError(
                f"rank {rank} of {world_size} in split {split!r} of {data_dir} reads no "
                f"document in column {text_column!r}"
            )
        for text in texts:
            yield [bos_id, *enc.encode_ordinary(text)]


def reference_windows(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    val_files: int = 1,
    text_column: str = "text",
) -> list[np.ndarray]:
    """The first `num_batches` concat windows: int64 arrays of batch_size*seq_len+1 tokens."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
    if num_batches < 0:
        raise ValueError(f"num_batches={num_batches} must be >= 0")
    window_tokens = batch_size * seq_len + 1
    docs = rank_documents(
        data_dir,
        enc=enc,
        bos_id=bos_id,
        split=split,
        rank=rank,
        world_size=world_size,
        val_files=val_files,
        text_column=text_column,
    )
    windows: list[np.ndarray] = []
    pending: list[int] = []  # stream tokens not yet in a window, in order
    while len(windows) < num_batches:
        while len(pending) < window_tokens:
            pending.extend(next(docs))
        windows.append(np.array(pending[:window_tokens], dtype=np.int64))
        # Windows do not overlap: the next one starts at the token after this one's last.
        pending = pending[window_tokens:]
    return windows


def reference_batches(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    val_files: int = 1,
    text_column: str = "text",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `num_batches` (inputs int32 (B, T), targets int64 (B, T)) pairs."""
    windows = reference_windows(
        data_dir,
        enc=enc,
        bos_id=bos_id,
        split=split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seq_len=seq_len,
        num_batches=num_batches,
        val_files=val_files,
        text_column=text_column,
    )
    return [
        (
            w[:-1].reshape(batch_size, seq_len).astype(np.int32),
            w[1:].reshape(batch_size, seq_len).astype(np.int64),
        )
        for w in windows
    ]
