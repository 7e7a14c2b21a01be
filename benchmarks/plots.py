"""PNG figures of benchmark runs: the throughput scaling curve and a run's timeline.

Not a benchmark itself: `throughput.py --png` and `timeline.py --png` call it with what
they measured. matplotlib is a benchmark-only dependency (`pip install matplotlib`), not
one of tokenfeed's: it is imported only when a figure is asked for, and without it a
figure is skipped with one line on stderr while the benchmark prints its numbers as
usual. The Agg backend draws to files only (no display needed).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 100  # 10 x 4.2 in: 1000 x 420 pixels, ~50-80 KB as PNG


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib): no PNG written",
              file=sys.stderr)
        return None
    return plt


def scaling_png(path: Path, per_round: dict[str, list[float]], *, n: int, title: str) -> bool:
    """Left: one stream's tokens/s over worker counts (median and every round) against
    perfect scaling of one tiktoken thread; right: every contender at N workers/threads.
    `per_round` is throughput.py's {contender: [tokens/s per round]}. False if not written.
    """
    plt = pyplot()
    if plt is None:
        return False
    med = {k: statistics.median(v) / 1e6 for k, v in per_round.items() if v}
    curve = sorted(int(k.rsplit("x", 1)[1]) for k in med if k.startswith("tokenfeed tiktoken x"))
    single = med["tiktoken 1 thread"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=DPI,
                                      gridspec_kw={"width_ratios": [1, 1.25]})
    ideal_x = [0, max(curve)]
    left.plot(ideal_x, [x * single for x in ideal_x], "--", color="gray",
              label="perfect scaling of 1 tiktoken thread")
    for w in curve:
        rounds = [v / 1e6 for v in per_round[f"tokenfeed tiktoken x{w}"]]
        left.plot([w] * len(rounds), rounds, "o", color="tab:blue", alpha=0.35, ms=4)
    left.plot(curve, [med[f"tokenfeed tiktoken x{w}"] for w in curve], "o-", color="tab:blue",
              lw=2, label="tokenfeed, tiktoken backend (median; dots: rounds)")
    if "batch-threads" in med:
        left.plot([n], [med["batch-threads"]], "s", color="tab:orange",
                  label=f"encode_ordinary_batch, {n} threads")
    for w in curve:
        left.annotate(f"{med[f'tokenfeed tiktoken x{w}']:.2f}",
                      (w, med[f"tokenfeed tiktoken x{w}"]), textcoords="offset points",
                      xytext=(8, -12))
    top = max(max(v) for k, v in per_round.items() if k.startswith("tokenfeed tiktoken x"))
    left.set(xlabel="workers on one stream", ylabel="M tokens/s", xticks=curve,
             xlim=(0.5, max(curve) + 0.5), ylim=(0, top / 1e6 * 1.1),
             title="Scaling over workers")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=7.5)

    bars = [("seed-era loader", "seed-era in-process loader"),
            ("nanochat best-fit", "nanochat best-fit loader"),
            ("batch-threads", f"encode_ordinary_batch, {n} threads"),
            ("tiktoken 1 thread", f"limit: {n} x 1 tiktoken thread"),
            (f"tokenfeed tiktoken x{n}", f"tokenfeed, tiktoken, {n} workers"),
            (f"tokenfeed quicktok x{n}", f"tokenfeed, quicktok (exact), {n} workers")]
    bars = [(k, label) for k, label in bars if k in med]
    values = [med[k] * (n if k == "tiktoken 1 thread" else 1) for k, _ in bars]
    colors = ["tab:blue" if k.startswith("tokenfeed") else "tab:gray" for k, _ in bars]
    right.barh(range(len(bars)), values, color=colors)
    right.set_yticks(range(len(bars)), [label for _, label in bars], fontsize=8)
    right.set_xscale("log")
    for i, v in enumerate(values):
        right.text(v * 1.08, i, f"{v:.2f}", va="center", fontsize=8)
    right.set(xlabel="M tokens/s (log scale)", xlim=(min(values) / 2, max(values) * 3),
              title=f"Every contender on the same {n} cores")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def timeline_png(path: Path, samples: Sequence[dict[str, float]],
                 events: Sequence[tuple[float, str]], *, title: str) -> bool:
    """Three panels over time: ring depth of the stream (and its capacity), the share of
    each interval the trainer waited in next(), tokens/s produced and consumed; a dashed
    line at every event. Each sample: t_s, depth, capacity, stall_share, produced_per_s,
    consumed_per_s, workers_busy, and optionally others_cores (CPU other processes used,
    drawn in gray on the stall panel). False if not written.
    """
    plt = pyplot()
    if plt is None:
        return False
    t = [s["t_s"] for s in samples]
    fig, (depth, stall, rate) = plt.subplots(3, 1, sharex=True, figsize=(10, 6), dpi=DPI)
    depth.step(t, [s["depth"] for s in samples], where="post", color="tab:blue",
               label="filled slots")
    depth.plot(t, [s["capacity"] for s in samples], ":", color="gray", label="ring capacity")
    depth.step(t, [s["workers_busy"] for s in samples], where="post", color="tab:green",
               alpha=0.6, label="workers busy")
    depth.set(ylabel="slots / workers", ylim=(-0.3, max(s["capacity"] for s in samples) + 1))
    depth.legend(loc="center right", fontsize=8)
    stall.fill_between(t, [100 * s["stall_share"] for s in samples], step="post",
                       color="tab:red", alpha=0.5)
    stall.set(ylabel="trainer waiting\nin next() (%)", ylim=(0, 100))
    if samples and "others_cores" in samples[0]:  # what other processes took meanwhile
        others = stall.twinx()
        others.plot(t, [s["others_cores"] for s in samples], color="dimgray", lw=1)
        others.set_ylabel("other processes\n(cores, gray)", fontsize=8)
        others.set_ylim(0, max(2.0, *(s["others_cores"] for s in samples)))
    rate.plot(t, [s["produced_per_s"] / 1e6 for s in samples], color="tab:blue",
              label="produced (packed into the ring)")
    rate.plot(t, [s["consumed_per_s"] / 1e6 for s in samples], color="tab:orange",
              label="consumed (released by the trainer)")
    rate.set(ylabel="M tokens/s", xlabel="seconds", ylim=(0, None))
    rate.legend(loc="lower right", fontsize=8)
    for ax in (depth, stall, rate):
        ax.grid(alpha=0.3)
        for at_s, _ in events:
            ax.axvline(at_s, ls="--", color="black", lw=1)
    for at_s, label in events:
        depth.annotate(label, (at_s, 1.0), xycoords=("data", "axes fraction"),
                       xytext=(4, -12), textcoords="offset points", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> bool:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return True
