"""The corpus as the daemon sees it: files, splits, and each rank's row-group sequence.

Shards are the `*.parquet` files of one folder, sorted by name; the last
`val_files` of them are the `val` split and the rest `train` (nanochat's
convention). A split's global row-group sequence is every row group of its files
in order, repeated once per epoch; rank `r` of `W` reads global positions
`r, r+W, r+2W, ...`, so ranks stay balanced even when files have few row groups.

Only Parquet footers are read here (no text), so start-up cost does not grow with
the corpus beyond one footer per file. Problems are `DataError`s that name the
file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokenfeed.common.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowGroupRef:
    path: str
    row_group: int
    num_rows: int  # values of the text column, nulls included (from the footer)
    text_bytes: int  # the text column's uncompressed size (from the footer): sizes tasks

    def parts(self, task_bytes: int) -> list[tuple[int, int]]:
        """Row ranges `[lo, hi)` of about `task_bytes` of text each, evenly sized, in order.

        A worker tokenizes one range at a time, so one stream keeps every worker busy
        whatever the row-group size (FineWeb-Edu: ~1,024 documents, ~4 MB). The split
        never changes what is delivered: a unit's parts are joined in order before
        packing, so it is not part of any position.
        """
        n = max(1, min(self.num_rows, -(-self.text_bytes // task_bytes)))
        bounds = [self.num_rows * i // n for i in range(n + 1)]
        return list(pairwise(bounds))


@dataclass(frozen=True)
class SplitPlan:
    """One split's files and its global row-group sequence (one epoch)."""

    name: str
    files: tuple[str, ...]
    row_groups: tuple[RowGroupRef, ...]

    def __len__(self) -> int:
        return len(self.row_groups)

    def unit_position(self, rank: int, world_size: int, unit: int) -> tuple[int, int]:
        """(epoch, ordinal) of the rank's `unit`-th row group in the global sequence."""
        g = rank + unit * world_size
        return divmod(g, len(self.row_groups))


@dataclass(frozen=True)
class Dataset:
    root: Path
    text_column: str
    splits: dict[str, SplitPlan]
    fingerprint: str  # hash of file names, sizes and row-group counts

    def sample_texts(self, max_bytes: int) -> list[str]:
        """Documents from the first row groups of every file, about `max_bytes` of text.

        What a faster tokenizer backend must reproduce exactly before it is used: the
        user's own text, a slice of each file so no one source dominates.
        """
        files = self.splits["train"].files + self.splits["val"].files
        texts: list[str] = []
        per_file = max(1, max_bytes // max(len(files), 1))
        for path in files[:64]:
            got = 0
            try:
                pf = pq.ParquetFile(path)
                for i in range(pf.num_row_groups):
                    values = pf.read_row_group(i, columns=[self.text_column]).column(0)
                    for value in values.to_pylist():
                        if isinstance(value, str) and got < per_file:
                            texts.append(value)
                            got += len(value)
                    if got >= per_file:
                        break
            except Exception as e:  # a bad row group is the stream's to report, not start-up's
                log.warning("parity sample: skipping the rest of %s (%s)", path, e)
        return texts

    def split(self, name: str) -> SplitPlan:
        plan = self.splits.get(name)
        if plan is None or not plan.row_groups:
            raise DataError(
                f"split {name!r} has no row groups in {self.root} "
                f"(train: {len(self.splits['train'].files)} files, "
                f"val: {len(self.splits['val'].files)} files); add Parquet files or change "
                "--val-files (the last N files form the val split)"
            )
        return plan


def _is_text_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)) or str(t) == "string_view"


def _row_group_size(meta: pq.ParquetFile, index: int, column: str) -> tuple[int, int]:
    """(rows, uncompressed bytes of `column`) of one row group, from the footer alone."""
    rg = meta.metadata.row_group(index)
    text_bytes = sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                     if rg.column(j).path_in_schema == column)
    return rg.num_rows, text_bytes


def scan_dataset(root: Path, *, text_column: str = "text", val_files: int = 1) -> Dataset:
    """Read every shard's footer, check the text column, and plan both splits."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist; pass --data DIR with your Parquet shards")
    files = sorted(p for p in root.glob("*.parquet") if p.is_file())
    if not files:
        raise DataError(
            f"no *.parquet files in {root}; put the shards there "
            "(or run `tokenfeed demo` to see tokenfeed on a built-in sample corpus)"
        )
    if val_files < 0:
        raise DataError(f"--val-files {val_files} must be >= 0")
    digest = hashlib.sha256()
    row_groups: dict[Path, list[tuple[int, int]]] = {}  # (num_rows, text_bytes) each
    for path in files:
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(
                f"{path} is not a readable Parquet file ({e}); remove or fix it"
            ) from None
        schema = meta.schema_arrow
        if text_column not in schema.names:
            raise DataError(
                f"{path} has no column {text_column!r} (its columns: {', '.join(schema.names)}); "
                "pass --text-column with the name of the text column"
            )
        column_type = schema.field(text_column).type
        if not _is_text_type(column_type):
            raise DataError(
                f"column {text_column!r} of {path} has type {column_type}, not string; "
                "pass --text-column with a string column"
            )
        row_groups[path] = [_row_group_size(meta, i, text_column)
                            for i in range(meta.num_row_groups)]
        digest.update(f"{path.name}\0{path.stat().st_size}\0{meta.num_row_groups}\n".encode())
    n_val = min(val_files, len(files))
    train_files, val_list = files[: len(files) - n_val], files[len(files) - n_val :]

    def plan(name: str, split_files: list[Path]) -> SplitPlan:
        refs = tuple(
            RowGroupRef(str(p), i, rows, size)
            for p in split_files for i, (rows, size) in enumerate(row_groups[p])
        )
        return SplitPlan(name, tuple(str(p) for p in split_files), refs)

    return Dataset(
        root=root,
        text_column=text_column,
        splits={"train": plan("train", train_files), "val": plan("val", val_list)},
        fingerprint=digest.hexdigest()[:16],
    )
