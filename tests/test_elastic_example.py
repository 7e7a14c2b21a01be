"""examples/elastic_resume.py under torchrun: 2 ranks, then 3 ranks resuming their states."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "elastic_resume.py"


def torchrun(nproc: int, ckpt: Path, steps: int, run_dir: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         "--standalone", str(EXAMPLE), "--ckpt-dir", str(ckpt), "--steps", str(steps),
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    return sorted(re.findall(r"rank \d+/\d+: trained on \d+ tokens, step \d+", out.stdout))


@pytest.mark.slow  # torchrun twice; elastic resume itself: test_elastic.py, test_state_fixtures.py
@pytest.mark.timeout(600)
def test_the_example_resumes_two_ranks_on_three(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    first = torchrun(2, tmp_path, 3, daemon.run_dir)
    assert first == [f"rank {r}/2: trained on 1536 tokens, step 3" for r in range(2)]
    second = torchrun(3, tmp_path, 5, daemon.run_dir)
    assert second == [f"rank {r}/3: trained on 1024 tokens, step 5" for r in range(3)]
    files = sorted(p.name for p in tmp_path.glob("data-rank*.json"))
    assert files == ["data-rank0.json", "data-rank1.json", "data-rank2.json"]
    assert all('"elastic"' in (tmp_path / f).read_text() for f in files)
