"""examples/train_gpt.py against a real daemon: the loss falls, and a resume continues at
the saved step with the exact next batches."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
B, T, ACCUM = 2, 32, 2  # small enough for ~0.2 s a step on a busy 2-core machine
STEP = re.compile(r"^step +(\d+)/\d+  loss ([\d.]+)", re.M)
VAL = re.compile(r"^step +(\d+)/\d+  val loss ([\d.]+)", re.M)


def train(run_dir: Path, ckpt_dir: Path, steps: int, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--steps", str(steps),
           "--batch-size", str(B), "--seq-len", str(T), "--grad-accum", str(ACCUM),
           "--lr", "1e-2", "--val-every", "2", "--val-batches", "1", "--ckpt-every", "4",
           "--ckpt-dir", str(ckpt_dir), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    return torch.load(ckpt_dir / "ckpt.pt", weights_only=False)


@pytest.mark.slow  # an example's training run; a nanochat loop's resume: test_trainer_fit.py
def test_train_gpt_loss_falls_and_a_resume_continues_at_the_saved_step_and_batch(
    start_daemon: Any, tmp_path: Path
) -> None:
    # One worker and a small staging budget: the trainer gets the cores, not read-ahead.
    daemon = start_daemon("--max-staging-mib", "4", workers=1)
    ckpt_dir = tmp_path / "ckpt"
    first = train(daemon.run_dir, ckpt_dir, 4)
    steps = [(int(s), float(loss)) for s, loss in STEP.findall(first)]
    assert [s for s, _ in steps] == [1, 2, 3, 4], first
    assert steps[-1][1] < steps[0][1] - 0.05, first
    saved = checkpoint(ckpt_dir)
    assert saved["step"] == 4 and len(saved["data"]) == 1

    second = train(daemon.run_dir, ckpt_dir, 6, "--resume")
    assert "resumed from" in second and "at step 4" in second, second
    resumed = [(int(s), float(loss)) for s, loss in STEP.findall(second)]
    assert [s for s, _ in resumed] == [5, 6], second
    assert max(loss for _, loss in resumed) < steps[0][1], second  # the model came back too
    vals = [float(v) for _, v in VAL.findall(first + second)]
    assert len(vals) == 3 and vals[-1] < vals[0], first + second
    final = checkpoint(ckpt_dir)
    assert final["step"] == 6

    # The first run read exactly batches 1-8, the resumed one exactly 9-12.
    with daemon.feed(B, T) as feed:
        for _ in range(4 * ACCUM):
            next(feed)
        assert feed.state_dict() == saved["data"][0]
        for _ in range(2 * ACCUM):
            next(feed)
        assert feed.state_dict() == final["data"][0]
