"""JobHealth: one rank's failed or stalled feed is the same error on every rank.

The logic runs in real rank processes joined in a gloo group
(tests/health_rank.py's scripted feeds, one process a rank); the acceptance
run is a 3-rank torchrun job, each rank on its own daemon, whose rank 1 daemon is
killed (or its workers stopped: a stall): every rank raises the same `JobFeedError`
(none is left in a collective).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import wait_until, worker_pids
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
    dead = [3 if scenario == "rank_dies" and r == 0 else 0 for r in range(WORLD)]
    assert [p.returncode for p in procs] == dead, "\n".join(outputs)
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


@pytest.mark.timeout(180)
def test_healthy_ranks_pass_every_check_and_end_together(tmp_path):
    results = run_ranks("healthy", tmp_path)
    assert results == [{"rank": r, "steps": 5, "type": None} for r in range(WORLD)]


@pytest.mark.timeout(180)
@pytest.mark.slow
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
@pytest.mark.slow
def test_two_failing_ranks_name_the_first_and_the_others(tmp_path):
    results = run_ranks("daemon_gone", tmp_path)
    assert len({r["error"] for r in results}) == 1, results
    assert [(r["failed_rank"], r["step"], r["steps"]) for r in results] == [(1, 1, 1)] * WORLD
    assert results[0]["error"].startswith(
        "rank 1 of 3 (also failed: rank 2) could not deliver its batch at step 1: "
        "DaemonGoneError: the tokenfeed daemon at /run/x has been silent for 5.0 s")


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_a_feed_that_ends_on_one_rank_only_is_an_error_everywhere(tmp_path):
    results = run_ranks("ends_early", tmp_path)
    assert len({r["error"] for r in results}) == 1, results
    assert [(r["failed_rank"], r["step"]) for r in results] == [(1, 2)] * WORLD
    assert "its feed ended (StopIteration) while other ranks' went on" in results[0]["error"]


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_a_rank_whose_process_dies_is_an_error_on_every_other_rank(tmp_path):
    results = run_ranks("rank_dies", tmp_path)
    assert [r["rank"] for r in results] == [1, 2]
    assert [(r["type"], r["failed_rank"], r["step"]) for r in results] == [
        ("JobFeedError", None, 2)] * 2
    assert all(r["error"].startswith(
        "a rank left the job-wide feed check (its process exited, or it spent longer than "
        "timeout_s between two checks) at step 2: ") for r in results), results


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


def test_a_check_timeout_that_is_not_positive_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"timeout_s=0 must be > 0 seconds"):
        JobHealth(ScriptedFeed(1), timeout_s=0)


def test_a_feed_of_several_ranks_without_a_process_group_is_a_clear_error():
    feed = SimpleNamespace(spec=SimpleNamespace(rank=1, world_size=4))
    with pytest.raises(ConfigError) as info:
        JobHealth(feed)  # type: ignore[arg-type]
    assert "rank 1 of 4" in str(info.value) and "init_process_group()" in str(info.value)


# A dead daemon is DaemonGoneError within DAEMON_SILENCE_S (5 s): a longer stall deadline
# there, so that the feed does not give up on the batch first.
STALL_TIMEOUT_S = {"daemon killed": 30.0, "workers stopped": 5.0}


def stop_workers(daemon) -> list[int]:
    """SIGSTOP the daemon's workers: it stays alive and answers, its stream stalls."""
    pids = worker_pids(daemon)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault", ["daemon killed", "workers stopped"])
def test_one_ranks_failed_feed_is_the_same_error_on_every_rank_of_a_torchrun_job(
        start_daemon, fault, tmp_path):
    daemons = [start_daemon(workers=1) for _ in range(WORLD)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = tmp_path / "ranks"
    out.mkdir()
    log = (tmp_path / "torchrun.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
         "--standalone", str(RANK_SCRIPT), ",".join(str(d.run_dir) for d in daemons),
         str(STALL_TIMEOUT_S[fault]), str(out)],
        stdout=log, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"})
    log.close()

    def output() -> str:
        return (tmp_path / "torchrun.log").read_text()

    def every_rank_wrote(pattern: str) -> bool:
        """Every rank made its file, or torchrun ended (the asserts below say why)."""
        return len(list(out.glob(pattern))) == WORLD or proc.poll() is not None

    stopped: list[int] = []
    try:
        wait_until(lambda: every_rank_wrote("ready*"), 240, "every rank's third step")
        assert proc.poll() is None, output()
        faulted = time.monotonic()
        if fault == "daemon killed":  # rank 1's node loses its daemon
            daemons[1].proc.kill()
            daemons[1].proc.wait()
        else:  # rank 1's daemon lives on, its stream stalls
            stopped = stop_workers(daemons[1])
        wait_until(lambda: every_rank_wrote("rank*.json"), 90, "every rank's error")
        reported_s = time.monotonic() - faulted
        assert proc.wait(timeout=60) == 0, output()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    results = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    assert [r["rank"] for r in results] == list(range(WORLD)), output()
    assert {r["type"] for r in results} == {"JobFeedError"}, results
    assert len({r["error"] for r in results}) == 1, results
    assert {r["failed_rank"] for r in results} == {1}
    assert len({r["steps"] for r in results}) == 1  # every rank stopped at the same step
    error = results[0]["error"]
    assert error.startswith("rank 1 of 3 could not deliver its batch at step ")
    if fault == "daemon killed":
        assert f"DaemonGoneError: the tokenfeed daemon at {daemons[1].run_dir}" in error
    else:
        assert "TimeoutError: no batch for 5 s although the daemon is alive" in error
    print(f"{fault}: every rank raised {reported_s:.1f} s after the fault: {error}")
    assert reported_s < 60, f"the job took {reported_s:.1f} s to report the fault"
