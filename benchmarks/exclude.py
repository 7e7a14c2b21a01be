"""Exclusion lists: what dropping listed rows costs a unit, and what a list costs an attach.

    python benchmarks/exclude.py [--repeats 200]

Shape (FineWeb-Edu's): row groups of 1,024 documents of lognormal lengths (median 800
tokens, sigma 1: ~1.3M tokens a unit), 1,823 shards of 100 row groups each for the
lookups. Measured, in one run:

- `exclude_unit` on one unit with 0, 1, 16 and 256 of its rows listed, in file order
  and in a shuffled epoch's order (what a reader adds to each unit it hands out; a unit
  with no listed row costs one dict lookup and nothing here);
- a list of 65,536 entries (the most an attach carries): its size on the wire, and the
  daemon's time to decode, check against the shards, hash and index it the first time,
  and when another rank sends it again (kept by a digest); the shard table itself is
  built once per daemon and timed apart.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tokenfeed.common.exclude import MAX_ATTACH_ENTRIES, Entry, to_wire
from tokenfeed.producer.dataset import Dataset, RowGroupRef, SplitPlan
from tokenfeed.producer.exclude import NONE, _shards, exclude_unit, for_attach

DOCS, SHARDS, ROW_GROUPS = 1024, 1823, 100


def unit(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.maximum(1, rng.lognormal(np.log(800), 1.0, DOCS).astype(np.int64))
    return rng.integers(0, 100_000, int(lengths.sum()), dtype=np.uint32), lengths


def best_us(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokens, lengths = unit(rng)
    out: dict[str, object] = {"unit_documents": DOCS, "unit_tokens": int(lengths.sum())}
    drop_us = {}
    for listed in (0, 1, 16, 256):
        rows = np.sort(rng.choice(DOCS, listed, replace=False)).astype(np.int64)
        for order_name, order in (("file", None), ("shuffled", rng.permutation(DOCS))):
            drop_us[f"{listed} listed, {order_name} order"] = round(best_us(
                lambda rows=rows, order=order: exclude_unit(tokens, lengths, rows, order, 1,
                                                            (0, 0, False)), args.repeats), 1)
    out["exclude_unit_median_us"] = drop_us

    refs = tuple(RowGroupRef(f"/data/shard_{s:05d}.parquet", g, DOCS, 4 << 20)
                 for s in range(SHARDS) for g in range(ROW_GROUPS))
    files = tuple(dict.fromkeys(r.path for r in refs))
    dataset = Dataset("/data", "text", {"train": SplitPlan("train", files, refs),
                                        "val": SplitPlan("val", (), ())}, "0" * 16)
    t0 = time.perf_counter()
    _shards(dataset)
    out["shard_table_once_s"] = round(time.perf_counter() - t0, 3)
    picks = rng.choice(len(refs) * DOCS, MAX_ATTACH_ENTRIES, replace=False)
    entries = [Entry(i + 1, None, refs[p // DOCS].path.rsplit("/", 1)[-1],
                     refs[p // DOCS].row_group, int(p % DOCS)) for i, p in enumerate(picks)]
    wire = to_wire(entries, "list")
    out["wire_bytes"] = sum(len(g[0]) + len(g[1]) + len(g[2]) for g in wire)
    msg = {"exclude": wire, "exclude_name": "list"}
    t0 = time.perf_counter()
    listed = for_attach(msg, {"data": dataset}, NONE)
    listed.rows("data")
    _ = listed.sha256
    out["attach_list_first_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    assert for_attach(msg, {"data": dataset}, NONE) is listed
    out["attach_list_again_s"] = round(time.perf_counter() - t0, 4)
    out["entries"] = len(listed)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
