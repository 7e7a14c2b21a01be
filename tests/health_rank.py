"""Ranks that take their batches through `JobHealth`, as tests/test_health.py starts them.

`python health_rank.py RUN_DIR0,RUN_DIR1,... STALL_TIMEOUT_S OUT_DIR` under torchrun: rank r
joins a gloo group, reads its stream from daemon r (`TokenFeed`), and trains: one `all_reduce` on
the default group per step, as a gradient all-reduce would. It creates OUT_DIR/ready{R}
after READY_STEPS steps, and, when the job's feed check fails, writes OUT_DIR/rank{R}.json
(the rank, the error's type, its message, the failing rank and step) before it leaves
the group and exits 0 (a rank exiting non-zero first would make torchrun stop the
others before they write). Files, not stdout lines: torchrun may join the lines of
ranks that print at the same moment.

`python health_rank.py --scripted SCENARIO RANK WORLD STORE OUT_DIR` is the same loop
over a scripted feed (`SCENARIOS`), joined through a file store: it writes
OUT_DIR/rank{R}.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokenfeed.common.errors import DaemonGoneError, TokenfeedError
from tokenfeed.consumer import JobHealth, TokenFeed

B, T = 2, 64
READY_STEPS = 3
MAX_STEPS = 1_000_000  # the test kills a daemon long before


def train(health: JobHealth, rank: int, max_steps: int,
          ready: Path | None = None) -> dict[str, Any]:
    """Steps until the feed check fails (or `max_steps`); what happened, as a dict."""
    steps = 0
    try:
        for x, _y in health:
            grad = x.sum(dtype=torch.float64).reshape(1)
            dist.all_reduce(grad)  # the step's own collective, on the default group
            steps += 1
            if steps == READY_STEPS and ready is not None:
                ready.touch()
            if steps == max_steps:
                break
    except TokenfeedError as e:
        return {"rank": rank, "steps": steps, "type": type(e).__name__, "error": str(e),
                "failed_rank": getattr(e, "rank", None), "step": getattr(e, "step", None)}
    return {"rank": rank, "steps": steps, "type": None}


class ScriptedFeed:
    """`n` batches, then StopIteration; at step `fail_at` it raises `error` instead,
    after blocking `block_s` (a rank stuck in next() until its stall deadline)."""

    def __init__(self, n: int, fail_at: int | None = None, error: Exception | None = None,
                 block_s: float = 0.0) -> None:
        self.n, self.fail_at, self.error, self.block_s = n, fail_at, error, block_s
        self.i = 0

    def __iter__(self) -> ScriptedFeed:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.i == self.fail_at and self.error is not None:
            threading.Event().wait(self.block_s)  # the stall itself, not a synchronization
            raise self.error
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        x = torch.full((B, T), self.i, dtype=torch.int32)
        return x, x.long()


SCENARIOS: dict[str, Any] = {
    # rank -> the feed it reads
    "healthy": lambda rank: ScriptedFeed(5),
    "stall": lambda rank: ScriptedFeed(10, 3, TimeoutError(
        "no batch for 2 s although the daemon is alive"), 2.0) if rank == 2 else ScriptedFeed(10),
    "daemon_gone": lambda rank: ScriptedFeed(10, 1, DaemonGoneError(
        "the tokenfeed daemon at /run/x has been silent for 5.0 s")) if rank in (1, 2)
    else ScriptedFeed(10),
    "ends_early": lambda rank: ScriptedFeed(2 if rank == 1 else 10),
    "rank_dies": lambda rank: ScriptedFeed(10, 2, SystemExit(3)) if rank == 0
    else ScriptedFeed(10),
}


def write_result(out: Path, rank: int, result: dict[str, Any]) -> None:
    tmp = out / f".rank{rank}.json"
    tmp.write_text(json.dumps(result))
    tmp.rename(out / f"rank{rank}.json")  # a reader sees it whole or not at all


def scripted_rank(rank: int, world_size: int, init_file: str, scenario: str,
                  out_dir: str) -> None:
    """One rank of a scripted scenario: writes rank{R}.json into `out_dir`."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        try:
            result = train(JobHealth(SCENARIOS[scenario](rank)), rank, 10)
        except SystemExit:  # the process dies in next(), without a word to the others
            os._exit(3)
        write_result(Path(out_dir), rank, result)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "--scripted":
        scenario, rank, world, store, out = sys.argv[2:7]
        scripted_rank(int(rank), int(world), store, scenario, out)
        return
    run_dirs, stall_timeout_s, out = sys.argv[1].split(","), float(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    feed = TokenFeed(B, T, run_dir=run_dirs[rank], device="cpu",
                     stall_timeout_s=stall_timeout_s)
    try:
        result = train(JobHealth(feed), rank, MAX_STEPS, ready=out / f"ready{rank}")
    finally:
        feed.close()
    write_result(out, rank, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
