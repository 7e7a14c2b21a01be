"""Progress output: a bar redrawn in place on a terminal, whole lines elsewhere."""

from __future__ import annotations

import io

from tokenfeed.producer.progress import Progress, format_amount


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
