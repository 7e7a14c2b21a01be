"""Progress of long CLI work: a bar on a terminal, a plain line every few seconds elsewhere.

    progress = Progress("download", total=n_bytes, unit="B", stream=sys.stderr)
    progress.update(len(chunk))     # from any thread
    progress.close()                # the final line, always printed

    download: [###############...............] 2.00 GB / 4.00 GB (50%)  41.2 MB/s  49 s  ETA 49 s

A line shows the amount done, out of `total` when known (it may be set or revised while
work goes on: an estimate), the mean rate since the start, the elapsed time and, while a
known total is not reached, the time left at that rate (ETA).

On a terminal the bar is redrawn in place with "\\r" at most every `TTY_INTERVAL_S`; in a
log file or a pipe (a job script, CI) that would leave one unreadable line of carriage
returns, so there a whole line is printed every `interval_s` instead. Only the CLI makes
these: library code never writes to a stream by itself.

Failure behaviour: none of its own. A closed or broken stream raises from `write` as it
would for any other CLI output.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

TTY_INTERVAL_S = 0.1  # redraws per second on a terminal: smooth, yet cheap
LOG_INTERVAL_S = 10.0  # one line per 10 s keeps a day-long log to ~9k lines
BAR_CELLS = 30


def format_duration(seconds: float) -> str:
    """12 s, 3m05s, 2h07m: short enough to keep a bar on one 80-column line."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_amount(amount: float, unit: str) -> str:
    """`amount` with a decimal SI prefix: 1.50 GB, 12.3 M chars, 999 files."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(amount) >= scale:
            sep = "" if unit == "B" else " "
            return f"{amount / scale:.2f} {prefix}{sep}{unit}"
    return f"{amount:,.0f} {unit}"


class Progress:
    """Counts work done out of `total` (0 when unknown) and reports it on `stream`."""

    def __init__(
        self,
        label: str,
        *,
        total: float,
        unit: str,
        stream: TextIO,
        interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._tty = bool(isatty is not None and isatty())
        self._interval_s = TTY_INTERVAL_S if self._tty else interval_s
        self._lock = threading.Lock()
        self._done = 0.0
        self._start_s = time.monotonic()
        self._last_s = self._start_s
        self._closed = False

    @property
    def done(self) -> float:
        return self._done

    def update(self, amount: float, *, note: str = "") -> None:
        """Add `amount` of work; report if the interval has passed."""
        with self._lock:
            self._done += amount
            now = time.monotonic()
            if now - self._last_s >= self._interval_s and not self._closed:
                self._last_s = now
                self._write(self._line(now, note), final=False)

    def close(self, note: str = "") -> None:
        """Print the final state once; later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write(self._line(time.monotonic(), note), final=True)

    def _line(self, now: float, note: str) -> str:
        elapsed_s = max(now - self._start_s, 1e-9)
        rate = f"{format_amount(self._done / elapsed_s, self.unit)}/s"
        done = format_amount(self._done, self.unit)
        if self.total > 0:
            fraction = min(self._done / self.total, 1.0)
            head = f"{done} / {format_amount(self.total, self.unit)} ({fraction:.0%})"
            if self._tty:
                filled = round(fraction * BAR_CELLS)
                head = f"[{'#' * filled}{'.' * (BAR_CELLS - filled)}] {head}"
        else:
            head = done
        eta = ""
        if 0 < self._done < self.total and not self._closed:
            eta = f"  ETA {format_duration((self.total - self._done) * elapsed_s / self._done)}"
        tail = f"  {note}" if note else ""
        return f"{self.label}: {head}  {rate}  {format_duration(elapsed_s)}{eta}{tail}"

    def _write(self, line: str, *, final: bool) -> None:
        if self._tty:
            # "\x1b[K" clears what a longer previous line left to the right
            self._stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
