"""Progress output: a bar redrawn in place on a terminal, whole lines elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq

from tokenfeed.tools.corpus import build_sample_corpus
from tokenfeed.tools.progress import Progress, format_amount, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_report_is_a_whole_line_and_close_prints_once() -> None:
    out = io.StringIO()
    progress = Progress("read", total=200, unit="chars", stream=out, interval_s=0)
    progress.update(50)
    progress.update(50, note="half")
    progress.close()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("read: 50 chars / 200 chars (25%)")
    assert lines[1].startswith("read: 100 chars / 200 chars (50%)") and lines[1].endswith("half")
    assert progress.done == 100


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_with_a_newline() -> None:
    out = Terminal()
    progress = Progress("download", total=4e6, unit="B", stream=out)
    progress.update(2e6)
    progress.close()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 15 + "." * 15 + "] 2.00 MB / 4.00 MB (50%)" in text


def test_reports_are_spaced_by_the_interval() -> None:
    out = io.StringIO()
    progress = Progress("read", total=0, unit="B", stream=out, interval_s=3600)
    for _ in range(1000):
        progress.update(1)
    assert out.getvalue() == ""
    progress.close()
    assert out.getvalue().startswith("read: 1.00 kB")


def test_amounts_use_si_prefixes() -> None:
    assert format_amount(999, "files") == "999 files"
    assert format_amount(1_500_000_000, "B") == "1.50 GB"
    assert format_amount(12_300_000, "chars") == "12.30 M chars"


def test_a_known_total_gives_an_eta_until_the_final_line() -> None:
    out = io.StringIO()
    progress = Progress("read", total=1000, unit="B", stream=out, interval_s=0)
    progress._start_s -= 10  # 10 s ago: 250 B in 10 s leaves 750 B, 30 s
    progress.update(250)
    progress.close()
    first, last = out.getvalue().splitlines()
    assert first == "read: 250 B / 1.00 kB (25%)  25 B/s  10 s  ETA 30 s"
    assert "ETA" not in last


def test_durations_stay_short() -> None:
    assert [format_duration(s) for s in (0.4, 59, 185, 7620)] == ["0 s", "59 s", "3m05s",
                                                                  "2h07m"]


def test_the_sample_corpus_build_reports_sources_parsed_to_the_end(tmp_path: Path) -> None:
    out, tty = io.StringIO(), Terminal()
    for stream, where in ((out, tmp_path / "log"), (tty, tmp_path / "tty")):
        progress = Progress("corpus", total=0, unit="sources", stream=stream, interval_s=0)
        files = build_sample_corpus(where, target_bytes=20_000, num_files=2, progress=progress)
        progress.close()
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) > 0
        # the target is met early: the total becomes the sources parsed, the bar ends full
        assert progress.done == progress.total > 0
    lines = out.getvalue().splitlines()
    assert len(lines) > 1 and all(line.startswith("corpus: ") for line in lines)
    assert lines[-1].split("  ")[0].endswith("(100%)")
    # redrawn in place (at most 10 times a second), one newline at the end
    assert tty.getvalue().count("\n") == 1 and tty.getvalue().startswith("\rcorpus: [")
    assert tty.getvalue().rsplit("\r", 1)[1].startswith("corpus: [" + "#" * 30 + "]")
