"""`tokenfeed demo`: the whole pipeline on one node, offline, in a few seconds.

Builds a small real-text corpus (Python's own documentation, see `corpus.py`;
progress on stderr) unless `--data` is given, starts a real daemon process, runs two consumer ranks
in their own processes (`python -m tokenfeed.consumer`, as torchrun would), prints
throughput and queue depth while they drain, then stops everything and checks
that no shared-memory segment and no process is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from tokenfeed.common.control import request
from tokenfeed.common.errors import DaemonUnavailableError, TokenfeedError
from tokenfeed.common.shm import SHM_DIR, segment_name
from tokenfeed.tools.corpus import build_sample_corpus
from tokenfeed.tools.progress import Progress

WORLD_SIZE = 2
START_TIMEOUT_S = 60.0


def _wait_for_daemon(daemon: subprocess.Popen[bytes], run_dir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise TokenfeedError(f"the daemon exited with code {daemon.returncode} at start")
        try:
            return request(run_dir, "status", timeout_s=1.0)
        except DaemonUnavailableError:
            time.sleep(0.1)
    raise TokenfeedError(f"the daemon did not answer within {START_TIMEOUT_S:.0f} s")


def _pump(stream: IO[bytes], rank: int, out: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
    for line in stream:
        with contextlib.suppress(ValueError):
            out.put((rank, json.loads(line)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tokenfeed-demo-"))
    run_dir = workdir / "run"
    log_path = workdir / "daemon.log"
    print("tokenfeed demo")
    try:
        if args.data:
            data = Path(args.data).expanduser()
            print(f"  corpus     {data}")
        else:
            data = workdir / "data"
            t0 = time.perf_counter()
            progress = Progress("  building the sample corpus", total=0, unit="sources",
                                stream=sys.stderr)
            try:
                files = build_sample_corpus(data, progress=progress)
            finally:
                progress.close()
            size = sum(f.stat().st_size for f in files)
            print(f"  corpus     {len(files)} Parquet shards of Python's own documentation "
                  f"({size / 1e6:.1f} MB compressed) built in {time.perf_counter() - t0:.1f} s "
                  f"at {data}")
        cmd = [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(data),
               "--run-dir", str(run_dir), "--tokenizer", args.tokenizer,
               "--workers", str(args.workers), "--slots", str(args.slots),
               "--val-files", str(args.val_files), "--text-column", args.text_column]
        if args.bos:
            cmd += ["--bos", args.bos]
        with open(log_path, "wb") as log_file:
            daemon = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            return _drive(args, daemon, run_dir, log_path)
        finally:
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drive(
    args: argparse.Namespace, daemon: subprocess.Popen[bytes], run_dir: Path, log_path: Path
) -> int:
    try:
        status = _wait_for_daemon(daemon, run_dir)
    except TokenfeedError as e:
        daemon.wait(timeout=30)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        print(f"tokenfeed: error: {tail[0] if tail else e}", file=sys.stderr)
        return 2
    daemon_id, worker_pids = status["daemon_id"], status["workers"]["pids"]
    print(f"  daemon     pid {daemon.pid}, {args.workers} tokenizer workers, "
          f"tokenizer {status['tokenizer']}, run dir {run_dir}")
    print(f"  consumers  {WORLD_SIZE} ranks x {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} tokens, in their own processes")
    lines: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    ranks = []
    for rank in range(WORLD_SIZE):
        p = subprocess.Popen(
            [sys.executable, "-m", "tokenfeed.consumer", "--run-dir", str(run_dir),
             "--rank", str(rank), "--world-size", str(WORLD_SIZE), "--device", "cpu",
             "--batches", str(args.batches), "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--report-every", "10"],
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None
        threading.Thread(target=_pump, args=(p.stdout, rank, lines), daemon=True).start()
        ranks.append(p)
    progress = [0] * WORLD_SIZE
    finals: dict[int, dict[str, Any]] = {}
    start = last_print = time.perf_counter()
    last_total = 0
    window = args.batch_size * args.seq_len
    while len(finals) < WORLD_SIZE:
        try:
            rank, msg = lines.get(timeout=0.2)
            progress[rank] = msg["batches"]
            if msg.get("done"):
                finals[rank] = msg
        except queue.Empty:
            if all(p.poll() is not None for p in ranks) and lines.empty():
                break
        now = time.perf_counter()
        if now - last_print >= 1.0:
            last_tick, last_print = last_print, now
            depth = "-"
            try:
                s = request(run_dir, "status", timeout_s=1.0)
                depth = ", ".join(f"{st['depth']}/{st['slots']}" for st in s["streams"]
                                  if st["split"] == "train")
            except TokenfeedError:
                pass
            if not any(progress):
                print(f"  [{now - start:5.1f} s] consumer ranks starting (importing torch, "
                      f"attaching); queue depth per rank {depth or '-'}", flush=True)
                continue
            rate = (sum(progress) - last_total) * window / (now - last_tick)
            print(f"  [{now - start:5.1f} s] batches {' + '.join(map(str, progress))}  "
                  f"{rate / 1e6:6.2f} M tokens/s  queue depth per rank {depth}", flush=True)
            last_total = sum(progress)
    for p in ranks:
        p.wait(timeout=60)
    elapsed = time.perf_counter() - start
    failed = [r for r, p in enumerate(ranks) if p.returncode != 0]
    daemon.send_signal(15)
    daemon.wait(timeout=30)
    if failed:
        print(f"tokenfeed: error: consumer rank(s) {failed} failed; see above", file=sys.stderr)
        return 1
    tokens = sum(f["tokens"] for f in finals.values())
    print(f"  done       {sum(f['batches'] for f in finals.values())} batches, "
          f"{tokens / 1e6:.2f} M tokens in {elapsed:.1f} s = {tokens / elapsed / 1e6:.2f} M "
          "tokens/s (including start-up)")
    for rank in sorted(finals):
        f = finals[rank]
        cur = f["state"]["cursor"]
        print(f"  rank {rank}     next() p50 {f['next_p50_us']:.0f} µs, p99 "
              f"{f['next_p99_us']:.0f} µs; resumes in epoch {cur['epoch']} at row group "
              f"{cur['row_group']} (document {cur['doc']}, token {cur['offset']} of the group)")
    leftovers = sorted(p.name for p in SHM_DIR.glob(segment_name(daemon_id, "") + "*"))
    alive = [pid for pid in [daemon.pid, *worker_pids] if _alive(pid)]
    print(f"  stopped    daemon exit code {daemon.returncode}; shared-memory segments left: "
          f"{len(leftovers)}; processes left: {len(alive)}")
    return 0 if daemon.returncode == 0 and not leftovers and not alive else 1
