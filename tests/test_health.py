"""JobHealth: one rank's failed or stalled feed is the same error on every rank.

The logic runs in real rank processes joined in a gloo group
(tests/health_rank.py's scripted feeds, one process a rank); the acceptance
run is a 3-rank torchrun job, each rank on its own daemon, whose rank 1 daemon is
killed: every rank raises the same `JobFeedError` (none is left in a collective).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from health_rank import ScriptedFeed

from tokenfeed.common.errors import ConfigError, DaemonGoneError, JobFeedError
from tokenfeed.consumer import JobHealth

RANK_SCRIPT = Path(__file__).with_name("health_rank.py")
WORLD = 3


def run_ranks(scenario: str, tmp_path: Path) -> list[dict]:
    """WORLD rank processes of `scenario`; each rank's result, in rank order."""
    out = tmp_path / "out"
    out.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, str(RANK_SCRIPT), "--scripted", scenario, str(r), str(WORLD),
         str(tmp_path / "store"), str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(WORLD)]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(outputs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.timeout(180)
def test_healthy_ranks_pass_every_check_and_end_together(tmp_path):
    results = run_ranks("healthy", tmp_path)
    assert results == [{"rank": r, "steps": 5, "type": None} for r in range(WORLD)]


@pytest.mark.timeout(180)
def test_a_rank_stalled_in_next_is_the_same_error_on_every_rank(tmp_path):
    results = run_ranks("stall", tmp_path)
    assert {r["type"] for r in results} == {"JobFeedError"}
    assert len({r["error"] for r in results}) == 1, results
    assert [(r["failed_rank"], r["step"], r["steps"]) for r in results] == [(2, 3, 3)] * WORLD
    error = results[0]["error"]
    assert error.startswith("rank 2 of 3 could not deliver its batch at step 3: TimeoutError: "
                            "no batch for 2 s although the daemon is alive")
    assert "every rank of the job stops at this step" in error


@pytest.mark.timeout(180)
def test_two_failing_ranks_name_the_first_and_the_others(tmp_path):
    results = run_ranks("daemon_gone", tmp_path)
    assert len({r["error"] for r in results}) == 1, results
    assert [(r["failed_rank"], r["step"], r["steps"]) for r in results] == [(1, 1, 1)] * WORLD
    assert results[0]["error"].startswith(
        "rank 1 of 3 (also failed: rank 2) could not deliver its batch at step 1: "
        "DaemonGoneError: the tokenfeed daemon at /run/x has been silent for 5.0 s")


@pytest.mark.timeout(180)
def test_a_feed_that_ends_on_one_rank_only_is_an_error_everywhere(tmp_path):
    results = run_ranks("ends_early", tmp_path)
    assert len({r["error"] for r in results}) == 1, results
    assert [(r["failed_rank"], r["step"]) for r in results] == [(1, 2)] * WORLD
    assert "its feed ended (StopIteration) while other ranks' went on" in results[0]["error"]


def test_without_a_process_group_a_single_rank_raises_its_own_failure():
    health = JobHealth(ScriptedFeed(5, 2, DaemonGoneError("the daemon at /run/x shut down")))
    assert [int(next(health)[0][0, 0]) for _ in range(2)] == [1, 2]
    with pytest.raises(JobFeedError) as info:
        next(health)
    assert (info.value.rank, info.value.step) == (0, 2)
    assert str(info.value).startswith("rank 0 of 1 could not deliver its batch at step 2: "
                                      "DaemonGoneError: the daemon at /run/x shut down")
    with pytest.raises(JobFeedError) as again:  # no step past a failure
        next(health)
    assert again.value is info.value


def test_a_feed_of_several_ranks_without_a_process_group_is_a_clear_error():
    feed = SimpleNamespace(spec=SimpleNamespace(rank=1, world_size=4))
    with pytest.raises(ConfigError) as info:
        JobHealth(feed)  # type: ignore[arg-type]
    assert "rank 1 of 4" in str(info.value) and "init_process_group()" in str(info.value)


def _lines(proc: subprocess.Popen, into: queue.Queue) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        into.put(line)
    into.put(None)


def wait_for(lines: queue.Queue, seen: list[str], done, deadline: float) -> None:
    """Read `lines` into `seen` until `done(seen)`, the stream ends, or the deadline."""
    while not done(seen):
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return
        if line is None:
            return
        seen.append(line)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_daemon_is_the_same_error_on_every_rank_of_a_torchrun_job(start_daemon):
    daemons = [start_daemon(workers=1) for _ in range(WORLD)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
         "--standalone", str(RANK_SCRIPT), ",".join(str(d.run_dir) for d in daemons)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        wait_for(lines, seen, lambda s: sum("ready" in line for line in s) == WORLD,
                 time.monotonic() + 240)
        assert sum("ready" in line for line in seen) == WORLD, "".join(seen)
        killed = time.monotonic()
        daemons[1].proc.kill()  # rank 1's node loses its daemon
        daemons[1].proc.wait()
        wait_for(lines, seen, lambda s: sum(line.startswith("{") for line in s) == WORLD,
                 killed + 90)
        reported_s = time.monotonic() - killed
        assert proc.wait(timeout=60) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    results = sorted((json.loads(line) for line in seen if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(WORLD)), "".join(seen)
    assert {r["type"] for r in results} == {"JobFeedError"}, results
    assert len({r["error"] for r in results}) == 1, results
    assert {r["failed_rank"] for r in results} == {1}
    assert len({r["steps"] for r in results}) == 1  # every rank stopped at the same step
    error = results[0]["error"]
    assert error.startswith("rank 1 of 3 could not deliver its batch at step ")
    assert f"DaemonGoneError: the tokenfeed daemon at {daemons[1].run_dir}" in error
    print(f"every rank raised {reported_s:.1f} s after the kill: {error}")
    assert reported_s < 60, f"the job took {reported_s:.1f} s to report the dead daemon"
