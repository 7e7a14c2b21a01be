"""The shard table: every shard's row groups, read from footers concurrently or from a manifest.

A daemon plans from one `ShardEntry` per shard (name, size, version, modification time,
and per row group its rows and the text column's uncompressed bytes). It learns them in
one of two ways:

- **Footers**, `read_footers`: up to `FOOTER_READS_IN_FLIGHT` at once on a thread pool
  (pyarrow releases the GIL while it waits), so start-up is about
  shards x round trip / 64 instead of shards x round trip: 2,000 objects at 20 ms a
  request (one ranged GET each) take ~0.7 s instead of ~80 s.
- **A manifest**, `Manifest`: the same table written once by `tokenfeed index DATA`
  (next to the data, `MANIFEST_NAME`, or anywhere with `--out`) and read with one
  request. It is trusted per shard only where the listing still shows the same name,
  size and version (object storage: modification time; local files: size and mtime);
  any other shard's footer is read as above, so the plan, and the fingerprint a saved
  state is checked against, are exactly what reading every footer would give. A daemon
  with `--cache-dir` keeps a copy there (`cached_manifest_path`), so its own restarts
  need only the listing.

Layout of a manifest: gzip'd JSON (one line, a few hundred KB for 2,000 shards)

    {"format": "tokenfeed-manifest", "version": 1, "root": "s3://bucket/prefix",
     "text_column": "text", "shards": [{"name": ..., "size": ..., "version": ...,
     "mtime_ns": ..., "rows": [row group rows...], "text_bytes": [...]}, ...]}

Failure behaviour: a shard that is not Parquet or lacks the text column is a
`DataError` naming it (the first such shard in name order, whatever order the reads
finish in); a manifest that cannot be parsed, or was built for another text column, is
a `DataError` naming it and the command that rebuilds it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tokenfeed.common.errors import DataError
from tokenfeed.producer.storage import (
    Shard,
    is_url,
    list_shards,
    read_footer_metadata,
    read_object,
    write_object,
)

log = logging.getLogger(__name__)

FOOTER_READS_IN_FLIGHT = 64  # S3 serves thousands of GETs/s per prefix; 64 keeps one node polite
# Local footers are CPU, not round trips: 2,000 of them cost 0.14 CPU s read one after
# another, 0.22-0.35 s on 64 threads contending for the GIL (0.17-0.19 s on 4)
LOCAL_FOOTER_READS_IN_FLIGHT = 4
MANIFEST_NAME = "tokenfeed-manifest.json.gz"
FORMAT = "tokenfeed-manifest"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    name: str
    size: int
    version: str  # Shard.version: "" for local files, the object's mtime (ns) otherwise
    mtime_ns: int
    rows: tuple[int, ...]  # per row group: values of the text column, nulls included
    text_bytes: tuple[int, ...]  # per row group: the text column's uncompressed bytes

    def matches(self, shard: Shard) -> bool:
        """The listing shows this very shard (same name, size, version, mtime)."""
        return (self.name, self.size, self.version, self.mtime_ns) == (
            shard.name, shard.size, shard.version, shard.mtime_ns)


def _is_text_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)) or str(t) == "string_view"


def read_footer(shard: Shard, text_column: str) -> ShardEntry:
    """One shard's entry from its footer (in object storage: one ranged GET)."""
    try:
        meta = read_footer_metadata(shard)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{shard.path} is not a readable Parquet file ({e}); remove or fix it"
        ) from None
    schema = meta.schema.to_arrow_schema()
    if text_column not in schema.names:
        raise DataError(
            f"{shard.path} has no column {text_column!r} (its columns: "
            f"{', '.join(schema.names)}); pass --text-column with the name of the text column"
        )
    column_type = schema.field(text_column).type
    if not _is_text_type(column_type):
        raise DataError(
            f"column {text_column!r} of {shard.path} has type {column_type}, not string; "
            "pass --text-column with a string column"
        )
    rows, text_bytes = [], []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        rows.append(rg.num_rows)
        text_bytes.append(sum(rg.column(j).total_uncompressed_size
                              for j in range(rg.num_columns)
                              if rg.column(j).path_in_schema == text_column))
    return ShardEntry(shard.name, shard.size, shard.version, shard.mtime_ns,
                      tuple(rows), tuple(text_bytes))


def read_footers(shards: Sequence[Shard], text_column: str,
                 in_flight: int = FOOTER_READS_IN_FLIGHT,
                 prefix: tuple[int, Callable[[list[ShardEntry]], None]] | None = None,
                 ) -> list[ShardEntry]:
    """Entries of `shards`, in their order, reading up to `in_flight` footers at once
    (`LOCAL_FOOTER_READS_IN_FLIGHT` at most for local files). `prefix` = (k, call):
    `call` gets the first k entries as soon as they are in, while the rest are read."""
    if shards and not is_url(shards[0].path):
        in_flight = min(in_flight, LOCAL_FOOTER_READS_IN_FLIGHT)
    pool = ThreadPoolExecutor(max_workers=max(1, min(in_flight, len(shards))),
                              thread_name_prefix="tokenfeed-footer")
    try:
        futures = [pool.submit(read_footer, s, text_column) for s in shards]
        entries: list[ShardEntry] = []
        for future in futures:  # in shard order: the first bad shard by name is reported
            entries.append(future.result())
            if prefix is not None and len(entries) == prefix[0]:
                prefix[1](list(entries))
        return entries
    finally:  # on an error, the footers not yet started are not read
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Manifest:
    root: str
    text_column: str
    shards: tuple[ShardEntry, ...]

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "root": self.root,
               "text_column": self.text_column,
               "shards": [{**asdict(e), "rows": list(e.rows), "text_bytes": list(e.text_bytes)}
                          for e in self.shards]}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return gzip.compress(raw, mtime=0)  # same table, same bytes

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(gzip.decompress(data))
            if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {doc.get('format')!r} version {doc.get('version')!r}")
            shards = tuple(
                ShardEntry(str(s["name"]), int(s["size"]), str(s["version"]),
                           int(s["mtime_ns"]), tuple(int(r) for r in s["rows"]),
                           tuple(int(b) for b in s["text_bytes"]))
                for s in doc["shards"])
            if any(len(e.rows) != len(e.text_bytes) for e in shards):
                raise ValueError("a shard's rows and text_bytes differ in length")
            return cls(str(doc["root"]), str(doc["text_column"]), shards)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(
                f"{where} is not a tokenfeed manifest ({type(e).__name__}: {e}); rebuild it "
                "with `tokenfeed index DATA --out ...`"
            ) from None

    def entries_for(self, listing: Sequence[Shard], text_column: str,
                    in_flight: int = FOOTER_READS_IN_FLIGHT) -> tuple[list[ShardEntry], int]:
        """(entries of the listed shards, how many footers had to be read): the
        manifest's where the listing shows the same shard, else the footer's."""
        known = {e.name: e for e in self.shards}
        stale = [s for s in listing if not (s.name in known and known[s.name].matches(s))]
        fresh = {e.name: e for e in read_footers(stale, text_column, in_flight)}
        return [fresh.get(s.name) or known[s.name] for s in listing], len(stale)


def manifest_next_to(root: Path | str) -> str:
    return f"{str(root).rstrip('/')}/{MANIFEST_NAME}"


def cached_manifest_path(cache_dir: Path, root: Path | str, text_column: str) -> Path:
    """Where a daemon keeps its copy: one file per (data location, text column)."""
    key = hashlib.sha256(f"{root}\0{text_column}".encode()).hexdigest()[:16]
    return cache_dir / "manifests" / f"{key}.json.gz"


def load_manifest(where: str | Path) -> Manifest:
    """A manifest from a path or URL; FileNotFoundError if there is none."""
    where = str(where)
    data = read_object(where) if is_url(where) else Path(where).expanduser().read_bytes()
    return Manifest.from_bytes(data, where)


def save_manifest(manifest: Manifest, where: str | Path) -> None:
    """Write a manifest, atomically for a local file (a reader never sees half of one)."""
    data = manifest.to_bytes()
    if is_url(str(where)):
        write_object(str(where), data)
        return
    path = Path(where).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(manifest: Manifest) -> dict[str, Any]:
    return {"shards": len(manifest.shards),
            "row_groups": sum(len(e.rows) for e in manifest.shards),
            "text_bytes": sum(sum(e.text_bytes) for e in manifest.shards)}


def build_manifest(root: Path | str, text_column: str) -> Manifest:
    """`tokenfeed index`: list the shards and read every footer (concurrently)."""
    shards = list_shards(root)
    if not shards:
        raise DataError(f"no *.parquet files in {root}; nothing to index")
    return Manifest(str(root), text_column, tuple(read_footers(shards, text_column)))
