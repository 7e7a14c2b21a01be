"""The short soak (benchmarks/soak.py) in CI: random kills and pauses, nothing lost or torn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.mark.slow  # each fault it mixes has its own fast test in test_faults.py
@pytest.mark.timeout(600)
def test_short_soak_loses_duplicates_and_tears_nothing_and_leaves_no_segments():
    proc = subprocess.run([sys.executable, str(SOAK), "--seconds", "40", "--seed", "1"],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "lost 0, duplicated 0, torn 0, segments left 0, consumer crashes 0" in out, out
    assert "PASS" in out
