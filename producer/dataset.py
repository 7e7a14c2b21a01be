"""The corpus as the daemon sees it: files, splits, and each rank's row-group sequence.

Shards are the `*.parquet` files of one folder, sorted by name; the last
`val_files` of them are the `val` split and the rest `train` (nanochat's
convention). A split's global row-group sequence is every row group of its files
in order, repeated once per epoch; rank `r` of `W` reads global positions
`r, r+W, r+2W, ...`, so ranks stay balanced even when files have few row groups.

Only Parquet footers are read here (no text), concurrently, or none at all when a
manifest describes the shards (manifest.py). While every footer is read, the plan of
the first files can be handed out early (`scan_dataset`'s `early`): the whole plan
begins with its row groups. Problems are `DataError`s that name the file and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from tokenfeed.common.errors import DataError
from tokenfeed.producer.config import DEFAULT_TEXT_COLUMN, DEFAULT_VAL_FILES
from tokenfeed.producer.manifest import (
    Manifest,
    ShardEntry,
    cached_manifest_path,
    load_manifest,
    manifest_next_to,
    read_footers,
    save_manifest,
)
from tokenfeed.producer.storage import Shard, is_url, list_shards, open_parquet

log = logging.getLogger(__name__)

SAMPLE_FILES = 64  # files the parity sample reads from, at once


@dataclass(frozen=True, slots=True)  # one per row group: 100,000 shards make millions
class RowGroupRef:
    path: str
    row_group: int
    num_rows: int  # values of the text column, nulls included (from the footer)
    text_bytes: int  # the text column's uncompressed size (from the footer): sizes tasks
    shard_stamp: str = ""  # "<size>:<mtime ns>" of its shard at start: keys the token cache

    def parts(self, task_bytes: int) -> list[tuple[int, int]]:
        """Row ranges `[lo, hi)` of about `task_bytes` of text each, evenly sized, in order.

        A worker tokenizes one range at a time, so one stream keeps every worker busy
        whatever the row-group size (FineWeb-Edu: ~1,024 documents, ~4 MB). The split
        never changes what is delivered: a unit's parts are joined in order before
        packing, so it is not part of any position.
        """
        n = self.part_count(task_bytes)
        bounds = [self.num_rows * i // n for i in range(n + 1)]
        return list(pairwise(bounds))

    def part_count(self, task_bytes: int) -> int:
        """How many parts `parts(task_bytes)` cuts the row group into."""
        return max(1, min(self.num_rows, -(-self.text_bytes // task_bytes)))


@dataclass(frozen=True)
class SplitPlan:
    """One split's files and its global row-group sequence (one epoch)."""

    name: str
    files: tuple[str, ...]
    row_groups: tuple[RowGroupRef, ...]
    # False: the first files' row groups only, while the rest of the footers are read
    # (scan_dataset's `early`); only a fresh epoch-0 stream reads it, up to what it knows
    complete: bool = True

    def __len__(self) -> int:
        return len(self.row_groups)

    def unit_position(self, rank: int, world_size: int, unit: int) -> tuple[int, int]:
        """(epoch, ordinal) of the rank's `unit`-th row group in the global sequence."""
        g = rank + unit * world_size
        return divmod(g, len(self.row_groups))


@dataclass(frozen=True)
class Dataset:
    root: Path | str  # a folder, or an object-storage URL (storage.py)
    text_column: str
    splits: dict[str, SplitPlan]
    # "<16 hex>.<4 hex x 16>": a hash of every shard's name, size and row-group count
    # (and an object's modification time), then the same over 16 groups of shards
    fingerprint: str
    names: tuple[str, ...] = ()  # shard file names, sorted

    @property
    def complete(self) -> bool:
        """Every shard's row groups are known (False: scan_dataset's early plan)."""
        return self.splits["train"].complete

    def sample_texts(self, max_bytes: int) -> list[str]:
        """Documents from the first row groups of every file, about `max_bytes` of text.

        What a faster tokenizer backend must reproduce exactly before it is used: the
        user's own text, a slice of each file so no one source dominates.
        """
        files = self.splits["train"].files + self.splits["val"].files
        per_file = max(1, max_bytes // max(len(files), 1))

        def sample(path: str) -> list[str]:
            texts: list[str] = []
            got = 0
            try:
                pf = open_parquet(path)
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

        # the files are read at once (object storage: a round trip each), in order after
        with ThreadPoolExecutor(max_workers=SAMPLE_FILES) as pool:
            return [t for texts in pool.map(sample, files[:SAMPLE_FILES]) for t in texts]

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


FINGERPRINT_BUCKETS = 16  # shards hashed in groups too, so a mismatch can name the shards


def _bucket(name: str) -> int:
    return zlib.crc32(name.encode()) % FINGERPRINT_BUCKETS


# Footers known before a daemon may serve: one round of reads in flight, and the files the
# parity sample reads (so a backend is checked on the same text as with the whole plan).
EARLY_SHARDS = SAMPLE_FILES


def scan_dataset(root: Path | str, *, text_column: str = DEFAULT_TEXT_COLUMN,
                 val_files: int = DEFAULT_VAL_FILES,
                 manifest: str | Path | None = None, cache_dir: Path | None = None,
                 early: Callable[[Dataset], None] | None = None) -> Dataset:
    """List the shards, learn their row groups, check the text column, plan both splits.

    Row groups come from `manifest` (a path or URL; `DataError` if it is unreadable),
    else from the copy kept in `cache_dir`, else from `MANIFEST_NAME` next to the data,
    else from every footer; any shard the listing shows changed since the manifest was
    written is read from its footer, so the plan is the same whichever way (manifest.py).
    With `cache_dir` the table learned is kept there for the next start.

    `early`, when every footer is read and the train split has more than `EARLY_SHARDS`
    files: called with the plan of the first `EARLY_SHARDS` as soon as their footers are
    in (`Dataset.complete` False: no val split, no fingerprint), while the rest are read.
    Its train row groups are the first ones of the whole plan's, in the same order.
    """
    if not is_url(root):
        root = Path(root).expanduser()
    shards = list_shards(root)
    if not shards:
        raise DataError(
            f"no *.parquet files in {root}; put the shards there "
            "(or run `tokenfeed demo` to see tokenfeed on a built-in sample corpus)"
        )
    if val_files < 0:
        raise DataError(f"--val-files {val_files} must be >= 0")
    n_val = min(val_files, len(shards))
    prefix = None
    if early is not None and len(shards) - n_val > EARLY_SHARDS:
        prefix = (EARLY_SHARDS, lambda first: early(
            _planned(root, text_column, shards[:EARLY_SHARDS], first, None)))
    entries, origin = _shard_entries(root, shards, text_column, manifest, cache_dir, prefix)
    log.debug("%s: %d shards, %d row groups (%s)", root, len(shards),
              sum(len(e.rows) for e in entries), origin)
    return _planned(root, text_column, shards, entries, n_val)


def _planned(root: Path | str, text_column: str, shards: list[Shard],
             entries: list[ShardEntry], n_val: int | None) -> Dataset:
    """The dataset of `shards` (their `entries`: row groups), the last `n_val` the val
    split; `n_val` None: an early plan of the first shards (train only, incomplete)."""
    digest = hashlib.sha256()
    buckets = [hashlib.sha256() for _ in range(FINGERPRINT_BUCKETS)]
    row_groups: dict[str, list[tuple[int, int]]] = {}  # (num_rows, text_bytes) each
    stamps: dict[str, str] = {}
    for shard, entry in zip(shards, entries, strict=True):
        row_groups[shard.path] = list(zip(entry.rows, entry.text_bytes, strict=True))
        line = f"{shard.name}\0{shard.size}\0{len(entry.rows)}"
        if shard.version:  # object storage: a replaced object is another shard
            line += f"\0{shard.version}"
        digest.update(f"{line}\n".encode())
        buckets[_bucket(shard.name)].update(f"{line}\n".encode())
        stamps[shard.path] = shard.stamp
    paths = [s.path for s in shards]
    complete = n_val is not None
    n_val = n_val or 0
    train_files, val_list = paths[: len(paths) - n_val], paths[len(paths) - n_val :]

    def plan(name: str, split_files: list[str]) -> SplitPlan:
        refs = tuple(
            RowGroupRef(p, i, rows, size, stamps[p])
            for p in split_files for i, (rows, size) in enumerate(row_groups[p])
        )
        return SplitPlan(name, tuple(split_files), refs, complete)

    return Dataset(
        root=root,
        text_column=text_column,
        splits={"train": plan("train", train_files), "val": plan("val", val_list)},
        fingerprint=(digest.hexdigest()[:16] + "." + "".join(b.hexdigest()[:4] for b in buckets)
                     if complete else ""),
        names=tuple(s.name for s in shards),
    )


def _shard_entries(root: Path | str, shards: list[Shard], text_column: str,
                   manifest: str | Path | None, cache_dir: Path | None,
                   prefix: tuple[int, Callable[[list[ShardEntry]], None]] | None = None,
                   ) -> tuple[list[ShardEntry], str]:
    """(an entry per listed shard, where they came from): see `scan_dataset`. `prefix`:
    told the first entries early, when every footer is read (manifest.read_footers)."""
    found: Manifest | None = None
    origin = "footers"
    if manifest is not None:
        try:
            found = load_manifest(manifest)
        except FileNotFoundError:
            raise DataError(f"manifest {manifest} does not exist; build it with "
                            f"`tokenfeed index {root} --out {manifest}`") from None
        except OSError as e:
            raise DataError(f"cannot read manifest {manifest} ({e}); check the path "
                            "and the credentials") from None
        if found.text_column != text_column:
            raise DataError(
                f"manifest {manifest} was built for text column {found.text_column!r}, not "
                f"{text_column!r}; rebuild it with `tokenfeed index {root} --text-column "
                f"{text_column} --out {manifest}`")
        origin = f"manifest {manifest}"
    cached = cached_manifest_path(cache_dir, root, text_column) if cache_dir else None
    for where in ([cached] if cached else []) + [manifest_next_to(root)]:
        if found is not None:
            break
        try:
            candidate = load_manifest(where)
        except (FileNotFoundError, DataError, OSError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring manifest %s: %s", where, e)
            continue
        if candidate.text_column == text_column:
            found, origin = candidate, f"manifest {where}"
    if found is None:
        entries, stale = read_footers(shards, text_column, prefix=prefix), len(shards)
    else:
        entries, stale = found.entries_for(shards, text_column)
        origin += f", {stale} footers read for shards it does not match"
    if cached is not None and (stale or origin != f"manifest {cached}"):
        try:
            save_manifest(Manifest(str(root), text_column, tuple(entries)), cached)
        except OSError as e:  # a cache that cannot be written costs the next start, no more
            log.warning("could not keep the manifest in %s: %s", cached, e)
    return entries, origin


def changed_shards(saved: str, dataset: Dataset) -> list[str] | None:
    """Names of the shards among which a saved fingerprint and the dataset's differ
    (changed, added or removed ones are among them); None if the saved one has no groups."""
    parts = saved.split(".")
    if len(parts) != 2 or len(parts[1]) != 4 * FINGERPRINT_BUCKETS:
        return None
    now = dataset.fingerprint.split(".")[1]
    differ = {i for i in range(FINGERPRINT_BUCKETS)
              if parts[1][4 * i:4 * i + 4] != now[4 * i:4 * i + 4]}
    return [n for n in dataset.names if _bucket(n) in differ]


def combined_fingerprint(datasets: dict[str, Dataset]) -> str:
    """A daemon's data: `--data`'s fingerprint, or `name=fingerprint;...` of its sources."""
    if list(datasets) == ["data"]:
        return datasets["data"].fingerprint  # what states saved before mixtures hold
    return ";".join(f"{name}={d.fingerprint}" for name, d in datasets.items())


def split_fingerprint(fingerprint: str) -> dict[str, str]:
    """Each source's fingerprint in a saved `combined_fingerprint` (unnamed: `--data`'s)."""
    if not fingerprint:
        return {}
    if "=" not in fingerprint:
        return {"data": fingerprint}
    return dict(part.partition("=")[::2] for part in fingerprint.split(";"))
