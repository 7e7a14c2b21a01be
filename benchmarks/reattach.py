"""Warm re-attach: time from a restarted consumer's first next() to its first batch.

A trainer reads some batches, saves `state_dict()`, exits; the stream lingers on
the daemon with its ring filled. A new consumer loads the state and asks for a
batch: it comes from the filled ring, with no re-tokenization. Compared, in the
same run, with a cold start (a fresh stream at the same position).

    python benchmarks/reattach.py [--data DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenfeed.common.control import request
from tokenfeed.common.errors import DaemonUnavailableError
from tokenfeed.consumer import TokenFeed
from tokenfeed.tools.corpus import build_sample_corpus


def wait_ready(run_dir: Path) -> None:
    for _ in range(600):
        try:
            request(run_dir, "status", timeout_s=1.0)
            return
        except DaemonUnavailableError:
            time.sleep(0.1)
    raise SystemExit("daemon did not start")


def wait_full(run_dir: Path, slots: int) -> None:
    for _ in range(600):
        streams = request(run_dir, "status")["streams"]
        if streams and all(s["depth"] >= slots for s in streams):
            return
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tfb-", dir="/tmp"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        build_sample_corpus(data)
    run_dir, slots = tmp / "run", 4
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(data),
         "--run-dir", str(run_dir), "--workers", "2", "--slots", str(slots),
         "--log-level", "WARNING"],
    )
    warm: list[float] = []
    cold: list[float] = []
    state: dict | None = None
    try:
        wait_ready(run_dir)
        b, t = args.batch_size, args.seq_len
        for r in range(args.rounds):
            with TokenFeed(b, t, run_dir=run_dir, device="cpu") as feed:
                if state is not None:
                    feed.load_state_dict(state)
                for _ in range(3):
                    next(feed)
                state = feed.state_dict()
            wait_full(run_dir, slots)
            with TokenFeed(b, t, run_dir=run_dir, device="cpu") as feed:
                feed.load_state_dict(state)
                t0 = time.perf_counter()
                next(feed)
                warm.append(time.perf_counter() - t0)
                state = feed.state_dict()
            # Cold: a rank never seen before has no stream yet: tokenize, pack, then deliver.
            with TokenFeed(b, t, run_dir=run_dir, device="cpu", rank=r,
                           world_size=args.rounds) as feed:
                t0 = time.perf_counter()
                next(feed)
                cold.append(time.perf_counter() - t0)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    print(f"B={args.batch_size} T={args.seq_len}, {args.rounds} rounds")
    print(f"  warm re-attach, first batch: median {statistics.median(warm) * 1e3:7.1f} ms"
          f"  (max {max(warm) * 1e3:.1f} ms)")
    print(f"  cold new stream, first batch: median {statistics.median(cold) * 1e3:7.1f} ms"
          f"  (max {max(cold) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
