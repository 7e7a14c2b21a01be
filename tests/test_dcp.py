"""torch.distributed.checkpoint at several data-parallel sizes: a job of 2 ranks saves
its data position, jobs of 2, 3 and 1 ranks load it, and across the two jobs every
token of the epoch is delivered exactly once (the elastic rule, counted as in
tests/test_elastic.py). Real rank processes in a gloo group (tests/dcp_rank.py), with
`TokenFeedStateful` through torch's own `dcp.save`/`dcp.load`, and with the torchtitan
loader through torchtitan's own `CheckpointManager` where torchtitan is installed."""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_elastic import epoch_tokens
from test_launchers import clean_env
from test_trainer_fit import free_port

RANK_SCRIPT = Path(__file__).with_name("dcp_rank.py")
TIMEOUT_S = 240

KINDS = ["feed", pytest.param("titan", marks=pytest.mark.skipif(
    importlib.util.find_spec("torchtitan") is None, reason="torchtitan is not installed"))]


def run_job(world: int, kind: str, run_dir: Path, ckpt: Path, out: Path, *flags: str) -> None:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), "--run-dir", str(run_dir), "--ckpt", str(ckpt),
             "--kind", kind, "--out", str(out / f"rank{rank}.npy"), *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failures = []
    for rank, proc in enumerate(procs):
        try:
            output = proc.communicate(timeout=TIMEOUT_S)[0]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            raise AssertionError(f"{world}-rank job ran past {TIMEOUT_S} s") from None
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited {proc.returncode}:\n{output[-3000:]}")
    assert not failures, "\n".join(failures)


def delivered(out: Path) -> collections.Counter:
    tokens: collections.Counter = collections.Counter()
    for path in sorted(out.glob("rank*.npy")):
        tokens.update(np.load(path).tolist())
    return tokens


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_at_two_ranks_loaded_at_two_three_and_one_every_token_once(
        start_daemon, corpus, encoding, tmp_path, kind):
    daemon = start_daemon(workers=2)
    ckpt, saved = tmp_path / "ckpt", tmp_path / "saved"
    saved.mkdir()
    run_job(2, kind, daemon.run_dir, ckpt, saved, "--save-after", "5")
    before = delivered(saved)
    assert sum(before.values()) == 2 * 5 * (2 * 64 + 1)
    want = epoch_tokens(corpus, encoding)
    for world in (2, 3, 1):
        out = tmp_path / f"loaded-{world}"
        out.mkdir()
        run_job(world, kind, daemon.run_dir, ckpt, out, "--save-after", "5", "--load")
        assert before + delivered(out) == want, f"{world} ranks after 2"
    assert os.listdir(ckpt)  # one checkpoint served every load
