"""Internet scale on paper: start-up requests and bytes, plan memory, staging and rings.

    python benchmarks/scale_model.py [--row-groups-per-shard 53] [--latency-ms 20]
                                     [--batch-size 32 --seq-len 2048 --ranks-per-node 8]

A model, not a measurement: for 1,823 / 20,000 / 100,000 shards and 8-512 nodes, what a
daemon's start costs per node and for the whole job, with and without a manifest, and
what a node holds in memory. Every figure comes from the code's own constants and
classes, so it changes when they do:

- footers in flight (`manifest.FOOTER_READS_IN_FLIGHT`), and how many files' footers a
  one-source daemon waits for before it serves a fresh stream (`dataset.EARLY_SHARDS`:
  the rest are read while it serves); a footer read is one ranged GET
  (the listing gave the size, so no HEAD comes first) of the file's last
  `FOOTER_READ_BYTES` (Arrow's default footer read, 64 KiB), or the whole file if smaller;
- the manifest's size: `manifest.Manifest.to_bytes()` of a table of that many shards
  (random row sizes, so gzip is not flattered), fetched with one HEAD and one GET;
- a listing: one request per `LIST_PAGE_KEYS` keys (S3 ListObjectsV2), ~`LIST_KEY_BYTES`
  of XML each;
- the parity sample a faster tokenizer backend is checked on (`dataset.SAMPLE_FILES`
  files, an open, a footer and a text page each; none with `--tokenizer-backend
  tiktoken`);
- the plan's memory: `dataset.RowGroupRef` objects measured with tracemalloc, one per row
  group (both splits), plus one path string per shard;
- per node: the rings (`common.ring.RingLayout(...).size_bytes` with `--slots`' default,
  the tokenizer's token width) of `--ranks-per-node` streams, the staging budget
  (`config.DEFAULT_STAGING_BYTES`) and the workers' own staging buffers
  (`pool.STAGING_BYTES` x `pool.QUEUE_DEPTH` each).

FineWeb-Edu-100B's shape is the default: 1,823 shards of ~53 row groups (~97 M documents
in row groups of 1,024). Time at start is the critical path at `--latency-ms` a request:
footers take 2 round trips in waves of FOOTER_READS_IN_FLIGHT; the manifest path is the
listing pages plus the manifest's two requests, one after another.
"""

from __future__ import annotations

import argparse
import random
import sys
import tracemalloc

from _common import table

from tokenfeed.common.ring import RingLayout, token_dtype
from tokenfeed.producer import pool
from tokenfeed.producer.config import DEFAULT_STAGING_BYTES, DaemonConfig
from tokenfeed.producer.dataset import EARLY_SHARDS, SAMPLE_FILES, RowGroupRef
from tokenfeed.producer.manifest import FOOTER_READS_IN_FLIGHT, Manifest, ShardEntry

FOOTER_READ_BYTES = 64 << 10  # Arrow's default footer read (parquet::kDefaultFooterReadSize)
FOOTER_REQUESTS = 1  # one ranged GET of the tail (storage.read_footer_metadata)
MANIFEST_REQUESTS = 2  # HEAD + GET
LIST_PAGE_KEYS = 1000  # S3 ListObjectsV2 page
LIST_KEY_BYTES = 350  # XML per key in a listing page (key, size, etag, date, class)
SAMPLE_REQUESTS_PER_FILE = 3  # open, footer, one text page
TEXT_PAGE_BYTES = 1 << 20  # the parity sample's read per file: about a text page
SHARD_COUNTS = (1823, 20_000, 100_000)
NODE_COUNTS = (8, 64, 512)
CL100K_VOCAB = 100_277


def manifest_bytes(shards: int, row_groups: int, sample: int = 500) -> int:
    """Size of the manifest of `shards` shards, from `sample` of them built for real."""
    rng = random.Random(0)
    entries = tuple(
        ShardEntry(f"shard_{i:05d}.parquet", rng.randrange(50 << 20, 60 << 20),
                   str(1_700_000_000_000_000_000 + rng.randrange(10**12)),
                   1_700_000_000_000_000_000 + rng.randrange(10**12),
                   (*(1024 for _ in range(row_groups - 1)), rng.randrange(1, 1024)),
                   tuple(rng.randrange(3 << 20, 5 << 20) for _ in range(row_groups)))
        for i in range(sample))
    size = len(Manifest("s3://bucket/fineweb-edu", "text", entries).to_bytes())
    return size * shards // sample


def plan_bytes_per_row_group() -> float:
    """tracemalloc's bytes per RowGroupRef as the planner makes them (distinct ints)."""
    n = 20_000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    refs = [RowGroupRef("s3://bucket/fineweb-edu/shard_00001.parquet", i, 1000 + i,
                        4_000_000 + i, "55000000:1700000000000000000") for i in range(n)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    del refs
    return grown / n


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row-groups-per-shard", type=int, default=53)
    p.add_argument("--shard-mb", type=float, default=55.0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--workers", type=int, default=12)
    args = p.parse_args()
    rg = args.row_groups_per_shard
    lat_s = args.latency_ms / 1000
    footer_bytes = min(FOOTER_READ_BYTES, int(args.shard_mb * 1e6))
    print(f"model: {rg} row groups a shard, {args.shard_mb:g} MB shards, {args.latency_ms:g} ms "
          f"a request, {FOOTER_READS_IN_FLIGHT} footers in flight, footer read "
          f"{FOOTER_READ_BYTES >> 10} KiB, listing pages of {LIST_PAGE_KEYS} keys")

    rows = []
    for shards in SHARD_COUNTS:
        pages = -(-shards // LIST_PAGE_KEYS)
        list_bytes = shards * LIST_KEY_BYTES
        m_bytes = manifest_bytes(shards, rg)
        cold_req = pages + FOOTER_REQUESTS * shards
        cold_bytes = list_bytes + shards * footer_bytes
        cold_s = pages * lat_s + FOOTER_REQUESTS * lat_s * -(-shards // FOOTER_READS_IN_FLIGHT)
        # a one-source daemon serves a fresh stream once the first files' footers are in
        early = min(shards, EARLY_SHARDS)
        early_req = pages + FOOTER_REQUESTS * early
        early_s = pages * lat_s + FOOTER_REQUESTS * lat_s * -(-early // FOOTER_READS_IN_FLIGHT)
        seq_s = pages * lat_s + FOOTER_REQUESTS * lat_s * shards
        warm_req = pages + MANIFEST_REQUESTS
        warm_bytes = list_bytes + m_bytes
        warm_s = (pages + MANIFEST_REQUESTS) * lat_s
        for nodes in NODE_COUNTS:
            rows.append([f"{shards:,}", nodes,
                         f"{cold_req:,}", mib(cold_bytes), f"{cold_s:.1f}",
                         f"{early_req:,}", f"{early_s:.2f}",
                         f"{warm_req:,}", mib(warm_bytes), f"{warm_s:.2f}",
                         f"{cold_req * nodes:,}", f"{warm_req * nodes + cold_req:,}",
                         f"{seq_s:,.0f}"])
    print()
    print("start-up requests, MiB and seconds (critical path) per node; requests for the job")
    print("(job, manifest: every node reads the manifest + one `tokenfeed index` run)")
    print("(serves: a fresh stream of a one-source daemon is served once the first "
          f"{EARLY_SHARDS} files' footers are in; the rest are read meanwhile)")
    print(table(["shards", "nodes", "req/node", "MiB/node", "s/node", "serves req", "serves s",
                 "req/node M",
                 "MiB/node M", "s/node M", "job req", "job req M", "s sequential"], rows))
    sample_req = SAMPLE_FILES * SAMPLE_REQUESTS_PER_FILE
    print(f"+ with a faster tokenizer backend (auto): the parity sample, {sample_req} requests "
          f"and ~{mib(SAMPLE_FILES * (footer_bytes + TEXT_PAGE_BYTES))} MiB per node, "
          f"{SAMPLE_REQUESTS_PER_FILE} round trips (its {SAMPLE_FILES} files at once)")
    print("+ a restart with --cache-dir: the listing alone "
          f"({', '.join(f'{-(-s // LIST_PAGE_KEYS)}' for s in SHARD_COUNTS)} requests)")

    per_rg = plan_bytes_per_row_group()
    print()
    print(f"plan memory of a daemon: {per_rg:.0f} bytes per row group (RowGroupRef, "
          "tracemalloc) + a path per shard")
    print(table(["shards", "row groups", "plan MiB", "manifest KiB"],
                [[f"{s:,}", f"{s * rg:,}", mib(s * rg * per_rg + s * 100),
                  f"{manifest_bytes(s, rg) / 1024:,.0f}"] for s in SHARD_COUNTS]))

    defaults = DaemonConfig(data_dir="x", run_dir=__import__("pathlib").Path("/tmp"))
    itemsize = token_dtype(CL100K_VOCAB).itemsize
    ring = RingLayout(defaults.slots, args.batch_size * args.seq_len + 1, itemsize).size_bytes
    worker_staging = args.workers * pool.QUEUE_DEPTH * pool.STAGING_BYTES
    total = args.ranks_per_node * ring + DEFAULT_STAGING_BYTES + worker_staging
    print()
    print(f"memory per node (B={args.batch_size}, T={args.seq_len}, {itemsize}-byte tokens "
          f"(cl100k), {defaults.slots} slots, {args.ranks_per_node} ranks, "
          f"{args.workers} workers):")
    print(table(["what", "MiB"], [
        [f"rings ({args.ranks_per_node} x {mib(ring)} MiB, /dev/shm)",
         mib(args.ranks_per_node * ring)],
        ["staging budget (--max-staging-mib, at most)", mib(DEFAULT_STAGING_BYTES)],
        [f"workers' staging buffers ({args.workers} x {pool.QUEUE_DEPTH} x "
         f"{mib(pool.STAGING_BYTES)} MiB, /dev/shm, at least)", mib(worker_staging)],
        ["total", mib(total)],
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
