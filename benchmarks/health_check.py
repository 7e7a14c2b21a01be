"""What `JobHealth`'s job-wide check costs a training step.

    python benchmarks/health_check.py [--ranks 3] [--checks 2000] [--warmup 200]

Starts --ranks processes on this machine, joined in a gloo group through a file
store; each takes batches from an endless in-memory feed through a `JobHealth`, so
a step is the check alone (one `all_reduce` of three int64 on the health group's
gloo group). After --warmup steps each rank times --checks steps; rank 0 prints the
p50, p99 and mean in µs, and every rank's p50. Ranks of one node talk over loopback
TCP here; across nodes add the network's round trips (gloo's all-reduce of a few
bytes is a few of them). Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import repeat
from pathlib import Path

import numpy as np
from _common import machine_line


def rank_main(rank: int, ranks: int, store: str, checks: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from tokenfeed.consumer import JobHealth

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=ranks)
    batch = torch.zeros(1, dtype=torch.int32)
    health = JobHealth(repeat(batch))
    for _ in range(warmup):
        next(health)
    times_us = []
    for _ in range(checks):
        start = time.perf_counter()
        next(health)
        times_us.append((time.perf_counter() - start) * 1e6)
    Path(out, f"rank{rank}.json").write_text(json.dumps(times_us))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.ranks, args.store, args.checks, args.warmup, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--ranks", str(args.ranks),
             "--checks", str(args.checks), "--warmup", str(args.warmup),
             "--store", str(Path(tmp, "store")), "--out", tmp],
            env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(args.ranks)]
        codes = [p.wait(timeout=600) for p in procs]
        if codes != [0] * args.ranks:
            sys.exit(f"rank processes exited with {codes}")
        per_rank = [np.array(json.loads(Path(tmp, f"rank{r}.json").read_text()))
                    for r in range(args.ranks)]
    print(machine_line())
    print(f"JobHealth check, {args.ranks} ranks on one machine (gloo, loopback), "
          f"{args.checks} steps after {args.warmup} warm-up:")
    first = per_rank[0]
    print(f"  rank 0: p50 {np.percentile(first, 50):.1f} us, p99 {np.percentile(first, 99):.1f} "
          f"us, mean {first.mean():.1f} us")
    print("  p50 per rank: " + ", ".join(f"{np.percentile(t, 50):.1f} us" for t in per_rank))


if __name__ == "__main__":
    main()
