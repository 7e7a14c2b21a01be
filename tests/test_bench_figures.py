"""The benchmarks' PNG figures: drawn from a saved run, and skipped without matplotlib."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import plots  # noqa: E402
import throughput  # noqa: E402


def saved_run() -> tuple[dict[str, list[float]], int, str]:
    return throughput.read_output((BENCHMARKS / "README.md").read_text())


def test_the_saved_run_in_benchmarks_readme_reads_back_as_its_table() -> None:
    per_round, n, title = saved_run()
    assert n == 2 and len(per_round["tokenfeed tiktoken x1"]) == 3
    # the medians the README's Performance table quotes: 2.29 and 4.43 M tokens/s
    assert statistics.median(per_round["tokenfeed tiktoken x1"]) == pytest.approx(2.29e6)
    assert statistics.median(per_round["tokenfeed tiktoken x2"]) == pytest.approx(4.43e6)
    assert "row groups of 1,024 documents, 4.43 MB, 1.11 M tokens;" in title


def test_without_matplotlib_no_figure_is_written_and_a_note_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    per_round, n, title = saved_run()
    assert not plots.scaling_png(tmp_path / "s.png", per_round, n=n, title=title)
    assert not plots.timeline_png(tmp_path / "t.png", [], [], title=title)
    assert list(tmp_path.iterdir()) == []
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_both_figures_are_small_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (a benchmark-only dependency)")
    per_round, n, title = saved_run()
    assert plots.scaling_png(tmp_path / "s.png", per_round, n=n, title=title)
    samples = [{"t_s": t / 4, "depth": t % 9, "capacity": 8, "stall_share": 0.5 * (t < 40),
                "produced_per_s": 2e6, "consumed_per_s": 2e6, "workers_busy": 1 + (t >= 40)}
               for t in range(80)]
    assert plots.timeline_png(tmp_path / "t.png", samples, [(10.0, "scale")], title=title)
    for name in ("s.png", "t.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 200_000
