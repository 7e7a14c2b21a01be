"""The `tokenfeed status` screen: one daemon's status as text that fits 80 columns.

    tokenfeed 4242-...  up 1h02m  cl100k_base (quicktok)  /data/fineweb
    workers 12/12 alive, 12 busy  restarts 0  2.3M tok/worker-s  skipped docs 0
     id split  rank pack    depth  made/s  used/s stall  epoch waste cons
      0 train   0/8 concat    3/8    1.2M    1.1M   12%  0 41%    0%    1
    stream 0 mix: code 30% got 31% (recent 29%) epoch 2, web 70% got 69% (...) epoch 0
    advice: stream 0 (train rank 0/8): its trainer waits 12% of the time ...

`render_screen` returns the screen as a string (the `--watch` screen, once): drawn
by `rich` when it is installed (`pip install "tokenfeed[ops]"`), else as plain
columns with the same content. `watch` redraws it in place every period until
Ctrl-C. Figures the daemon cannot know yet (no heartbeat yet, one sample) show "-".
"""

from __future__ import annotations

import io
import textwrap
import time
from collections.abc import Callable
from typing import Any

COLUMNS = ("id", "split", "rank", "pack", "depth", "made/s", "used/s", "stall", "epoch",
           "waste", "cons")
RIGHT = {"id", "rank", "depth", "made/s", "used/s", "stall", "epoch", "waste", "cons"}


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}" if x >= 0.01 or x == 0 else f"{x:.1%}"


def _duration(s: float) -> str:
    s = int(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _consumers(stream: dict[str, Any]) -> str:
    """Consumers attached, and of how many replicas when a group was declared."""
    group = stream.get("replicas") or {}
    if group.get("expected", 1) > 1:
        return f"{group['attached']}/{group['expected']}"
    return str(stream["consumers"])


def header_lines(s: dict[str, Any]) -> list[str]:
    w = s["workers"]
    per_s = w.get("tokens_per_worker_cpu_s")
    skipped = (s.get("totals") or {}).get("skipped_values", 0)
    lines = [
        f"tokenfeed {s['daemon_id'][:24]}  up {_duration(s['uptime_s'])}  "
        f"{s['tokenizer']} ({s.get('tokenizer_backend', '?')})  {s.get('data_dir', '')}",
        f"workers {w['alive']}/{w['target']} alive, {w['busy']} busy  restarts "
        f"{w.get('restarts', 0)}  {_si(per_s)} tok/worker-s  skipped docs {skipped:,.0f}",
    ]
    if s.get("plan_complete") is False:  # served.py: an early plan
        lines.append("plan: the first files' footers only, reading the rest (shuffled and "
                     "resumed streams wait)")
    cache = s.get("cache")
    if cache:  # --cache-dir: row groups tokenized once per node
        looked = cache.get("hits", 0) + cache.get("misses", 0)
        lines.append(f"cache {_si(cache.get('bytes', 0))}B of {_si(cache.get('max_bytes'))}B  "
                     f"hits {_pct(cache.get('hits', 0) / looked if looked else None)}  "
                     f"writes {cache.get('writes', 0)}  evicted {cache.get('evicted', 0)}")
    return lines


def stream_rows(s: dict[str, Any]) -> list[list[str]]:
    rows = []
    for st in s["streams"]:
        rates = st.get("tokens_per_s") or {}
        progress = st.get("epoch_progress")
        epoch = f"{st.get('epoch', st['position']['epoch'])}"
        if progress is not None:
            epoch += f" {progress:.0%}"
        rows.append([
            str(st["stream"]), st["split"], f"{st['rank']}/{st['world_size']}",
            st.get("packing", "?"), f"{st['depth']}/{st.get('capacity', st['slots'])}",
            _si(rates.get("produced")), _si(rates.get("consumed")),
            _pct(st.get("stall_share")), epoch, _pct(st.get("waste_share")), _consumers(st),
        ])
    return rows


def footer_lines(s: dict[str, Any]) -> list[str]:
    lines = []
    if not s["streams"]:
        lines.append("(no streams: no consumer has attached yet)")
    for st in s["streams"]:
        if st.get("mix"):  # a mixture: target and realized token share of each source
            lines.append(f"stream {st['stream']} mix: " + ", ".join(
                f"{name} {m['weight']:.0%} got {_pct(m['share'])} "
                f"(recent {_pct(m['share_recent'])}) epoch {m['epoch']}"
                + (" done" if m.get("done") else "")
                for name, m in st["mix"].items()))
        if st.get("error"):
            lines.append(f"stream {st['stream']} error: {st['error']}")
    if s.get("advice"):
        lines.append(f"advice: {s['advice']}")
    return lines


def render_text(s: dict[str, Any]) -> str:
    """The screen as plain columns (no `rich`)."""
    rows = [list(COLUMNS), *stream_rows(s)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    table = [" ".join(cell.rjust(w) if name in RIGHT else cell.ljust(w)
                      for cell, w, name in zip(r, widths, COLUMNS, strict=True)).rstrip()
             for r in rows]
    footer = [textwrap.fill(line, width=80, subsequent_indent="  ")
              for line in footer_lines(s)]
    return "\n".join([*header_lines(s), *table, *footer])


def _renderable(s: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in RIGHT else "left", no_wrap=True)
    for row in stream_rows(s):
        table.add_row(*row)
    footer = [Text(line, style="bold yellow" if line.startswith("advice") else "red")
              for line in footer_lines(s)]
    return Group(*(Text(line, overflow="fold") for line in header_lines(s)), table, *footer)


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def render_screen(s: dict[str, Any], width: int = 80) -> str:
    """The `--watch` screen for status `s`, as text `width` columns wide."""
    if not have_rich():
        return render_text(s)
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(
        _renderable(s))
    return out.getvalue().rstrip("\n")


def watch(fetch: Callable[[], dict[str, Any]], period_s: float) -> None:
    """Redraw the screen every `period_s` until Ctrl-C (KeyboardInterrupt propagates)."""
    if not have_rich():
        while True:
            print("\033[2J\033[H" + render_text(fetch()), flush=True)
            time.sleep(period_s)
    from rich.live import Live

    with Live(_renderable(fetch()), auto_refresh=False) as live:
        while True:
            time.sleep(period_s)
            live.update(_renderable(fetch()), refresh=True)
