"""`python -m tokenfeed.consumer`: drain a stream like a training rank would, and report.

Prints one JSON object per line: progress every `--report-every` batches and a
final summary (batches, tokens, tokens/s, next() latency percentiles, epoch).
Used by `tokenfeed demo` to run real consumer ranks in their own processes, and
handy to check a node's feed without a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from tokenfeed.common.errors import TokenfeedError, UserInputError
from tokenfeed.consumer.feed import TokenFeed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenfeed.consumer", description=__doc__)
    p.add_argument("--run-dir")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--split", default="train")
    p.add_argument("--rank", type=int)
    p.add_argument("--world-size", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--packing", default="concat", help="concat, bestfit or nanochat")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--step-s", type=float, default=0.0, help="simulated training step per batch")
    p.add_argument("--state", help="JSON file of a feed.state_dict() to resume from")
    p.add_argument("--replicas", type=int, default=1,
                   help="processes reading this rank's batches together (TP/PP peers)")
    args = p.parse_args(argv)
    try:
        feed = TokenFeed(
            args.batch_size, args.seq_len, split=args.split, rank=args.rank,
            world_size=args.world_size, device=args.device, run_dir=args.run_dir,
            replicas=args.replicas, packing=args.packing,
        )
        if args.state:
            with open(args.state) as f:
                feed.load_state_dict(json.load(f))
        waits = np.zeros(args.batches)
        with feed:
            start = time.perf_counter()
            for i in range(args.batches):
                t0 = time.perf_counter()
                next(feed)
                waits[i] = time.perf_counter() - t0
                if args.step_s:
                    time.sleep(args.step_s)
                if (i + 1) % args.report_every == 0 and i + 1 < args.batches:
                    print(json.dumps({"rank": feed.spec.rank, "batches": i + 1,
                                      "elapsed_s": time.perf_counter() - start}), flush=True)
            elapsed = time.perf_counter() - start
            tokens = args.batches * args.batch_size * args.seq_len
            print(json.dumps({
                "rank": feed.spec.rank, "done": True, "batches": args.batches, "tokens": tokens,
                "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
                "next_p50_us": float(np.percentile(waits, 50) * 1e6),
                "next_p99_us": float(np.percentile(waits, 99) * 1e6),
                "epoch": feed.epoch, "state": feed.state_dict(),
            }), flush=True)
    except UserInputError as e:
        print(f"tokenfeed consumer: error: {e}", file=sys.stderr)
        return 2
    except TokenfeedError as e:
        print(f"tokenfeed consumer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
