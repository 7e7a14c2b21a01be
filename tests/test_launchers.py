"""Each launcher's ranks read their own streams: torchrun (a gloo group), Slurm's
variables alone (`srun python train.py`), explicit arguments; a launch of several
tasks with no rank information is an error, never every task reading rank 0's data.

Rank processes are real (`tests/rank_probe.py`), attached to a real daemon; their
batches are compared with the oracle's by digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_batch_equals, window_digest

from tokenfeed.common.errors import ConfigError
from tokenfeed.consumer import TokenFeed

PROBE = Path(__file__).with_name("rank_probe.py")
B, T, N = 2, 64, 3
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
               "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 180


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def probe_results(out_dir: Path) -> list[dict]:
    """What each probe rank wrote to OUT_DIR, in rank order."""
    return sorted((json.loads(f.read_text()) for f in out_dir.glob("rank*.json")),
                  key=lambda r: r["rank"])


def expect_streams(results: list[dict], oracle, world_size: int) -> None:
    assert [(r["rank"], r["world_size"]) for r in results] == [
        (rank, world_size) for rank in range(world_size)]
    for r in results:
        want = oracle(rank=r["rank"], world_size=world_size, batch_size=B, seq_len=T, n=N)
        assert r["digests"] == [window_digest(w, B, T) for w in want], f"rank {r['rank']}"


@pytest.mark.slow
def test_torchrun_ranks_read_their_own_streams(start_daemon, oracle, tmp_path):
    daemon = start_daemon(workers=1)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(PROBE), str(daemon.run_dir), str(N), str(tmp_path), "--dist"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    results = probe_results(tmp_path)
    expect_streams(results, oracle, 2)
    assert [r["gathered"] for r in results] == [2, 2]


def test_slurm_variables_alone_give_each_task_its_stream(start_daemon, oracle, tmp_path):
    """What `srun --ntasks=2 python train.py` sets, and nothing else."""
    daemon = start_daemon(workers=1)
    procs = [subprocess.Popen(
        [sys.executable, str(PROBE), str(daemon.run_dir), str(N), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r)))
        for r in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            raise
        assert proc.returncode == 0, outputs[-1]
    expect_streams(probe_results(tmp_path), oracle, 2)


def test_explicit_arguments_win_over_every_launcher_variable(start_daemon, oracle, monkeypatch):
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("SLURM_PROCID", "5"),
                        ("SLURM_NTASKS", "8"), ("OMPI_COMM_WORLD_SIZE", "8")):
        monkeypatch.setenv(name, value)
    daemon = start_daemon(workers=1)
    with daemon.feed(B, T, rank=1, world_size=2) as feed:
        assert (feed.spec.rank, feed.spec.world_size) == (1, 2)
        want = oracle(rank=1, world_size=2, batch_size=B, seq_len=T, n=2)
        for window in want:
            assert_batch_equals(next(feed), window)


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"])
def test_several_tasks_without_rank_information_is_a_clear_error(monkeypatch, tmp_path,
                                                                 variable):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "4")
    with pytest.raises(ConfigError) as info:  # before any daemon is asked
        TokenFeed(B, T, run_dir=tmp_path, device="cpu")
    message = str(info.value)
    assert f"{variable}=4" in message and "same data" in message
    assert "torchrun" in message and "rank= and world_size=" in message
