"""What `tokenfeed status` and /metrics report beyond a stream's own `describe()`.

Rates come from counters sampled at every daemon heartbeat (HEARTBEAT_INTERVAL_S)
and kept for WINDOW_S: tokens/s produced (packed into ring slots) and consumed
(released by a consumer), and the stall share, the fraction of its consumers' wall
time spent waiting inside `next()` (stall / (stall + step), from the seconds each
consumer reports with its heartbeats). Counters of streams that were dropped stay in
`Retired`, so per-daemon totals (and the Prometheus counters) never go down.

`advice` turns a status into at most one line: a stream whose consumers wait more
than STALL_ADVICE_SHARE of their time, and what would help.

Failure behaviour: nothing here raises on what peers report; figures that are not
known yet (no heartbeat, one sample) are None.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenfeed.producer.valstore import ValStore

WINDOW_S = 10.0  # rates over the last 10 s: steady enough to read, recent enough to act on
STALL_ADVICE_SHARE = 0.01  # a trainer waiting 1% of its time for data deserves a line
# Counters each stream reports, in `extras` and in Retired.
COUNTERS = ("tokens_produced", "tokens_consumed", "stall_s", "step_s", "skipped_values",
            "tokens_cropped")


class RateWindow:
    """(time, counters) samples of one stream over the last WINDOW_S."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, dict[str, float]]] = deque()

    def sample(self, now: float, counters: dict[str, float]) -> None:
        self.samples.append((now, counters))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def delta(self, name: str) -> tuple[float, float] | None:
        """(increase of `name`, seconds) over the window, or None before two samples."""
        if len(self.samples) < 2:
            return None
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return last[name] - first[name], t1 - t0

    def rate(self, name: str) -> float | None:
        d = self.delta(name)
        return None if d is None else d[0] / d[1]


def stall_share(stall_s: float, step_s: float) -> float | None:
    total = stall_s + step_s
    return stall_s / total if total > 0 else None


def stream_counters(stream: Any) -> dict[str, float]:
    """The monotonic counters of a live stream (a producer.stream.Stream)."""
    window = stream.spec.window_tokens
    packer = stream.packer.stats()
    return {
        "tokens_produced": stream.batches * window,
        "tokens_consumed": stream.table.consumed * window,
        "stall_s": stream.table.stall_s,
        "step_s": stream.table.step_s,
        "skipped_values": stream.skipped,
        "tokens_cropped": packer.get("tokens_cropped", 0),
    }


def stream_extras(stream: Any, rates: RateWindow | None) -> dict[str, Any]:
    """Status fields of one stream beyond its describe(): capacity, counters, rates,
    stall share, epoch progress, waste and its consumers."""
    counters = stream_counters(stream)
    packer = stream.packer.stats()
    packed, cropped = packer.get("tokens_packed", 0), packer.get("tokens_cropped", 0)
    recent = None
    if rates is not None:
        d_stall, d_step = rates.delta("stall_s"), rates.delta("step_s")
        if d_stall is not None and d_step is not None:
            recent = stall_share(d_stall[0], d_step[0])
    cursor = stream.cursor()
    consumers = [
        {"id": c.identity.decode(errors="replace"), "stall_s": round(c.stall_s, 6),
         "step_s": round(c.step_s, 6), "stall_share": stall_share(c.stall_s, c.step_s),
         "held": len(c.held), "next_seq": c.next_send}
        for c in stream.table.consumers.values()
    ]
    return {
        "capacity": stream.ring.layout.slot_count,
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in counters.items()},
        "tokens_per_s": {
            "produced": None if rates is None else rates.rate("tokens_produced"),
            "consumed": None if rates is None else rates.rate("tokens_consumed"),
        },
        # Recent (over the rate window) when consumers reported twice, else since start.
        "stall_share": recent if recent is not None else stall_share(
            counters["stall_s"], counters["step_s"]),
        "epoch": cursor["epoch"],
        "epoch_progress": stream.progress(cursor),
        "waste_share": cropped / (packed + cropped) if packed + cropped else 0.0,
        "consumer_list": consumers,
    }


@dataclass
class Retired:
    """Counters of dropped streams, by (split, rank, world_size): totals stay monotonic."""

    by_labels: dict[tuple[str, int, int], dict[str, float]]

    def add(self, stream: Any) -> None:
        key = (stream.spec.split, stream.spec.rank, stream.spec.world_size)
        into = self.by_labels.setdefault(key, dict.fromkeys(COUNTERS, 0.0))
        for name, value in stream_counters(stream).items():
            into[name] += value

    def as_list(self) -> list[dict[str, Any]]:
        return [{"split": k[0], "rank": k[1], "world_size": k[2], **v}
                for k, v in sorted(self.by_labels.items())]


def totals(streams: list[dict[str, Any]], retired: list[dict[str, Any]]) -> dict[str, float]:
    """Per-daemon sums of the stream counters, live and dropped streams together."""
    return {name: sum(s.get(name, 0) for s in [*streams, *retired]) for name in COUNTERS}


def worker_summary(pool: dict[str, Any], restarts: int, tokens_tokenized: float,
                   size: int) -> dict[str, Any]:
    """The pool's own stats plus `count` (workers serving), `restarts` (deaths replaced)
    and tokens tokenized per worker-second of reading and tokenizing."""
    busy_s = float(pool.get("read_s", 0.0)) + float(pool.get("tokenize_s", 0.0))
    return {**pool, "count": size, "restarts": restarts, "tokens_tokenized": tokens_tokenized,
            "tokens_per_worker_cpu_s": tokens_tokenized / busy_s if busy_s > 0 else None}


def val_store_stats(stores: Mapping[str, ValStore]) -> dict[str, int] | None:
    """The val stores' counters, summed over text columns (None: a token cache serves)."""
    if not stores:
        return None
    total: dict[str, int] = {}
    for store in stores.values():
        for key, value in store.stats().items():
            total[key] = total.get(key, 0) + int(value)
    return total


def _label(s: dict[str, Any]) -> str:
    return f"stream {s['stream']} ({s['split']} rank {s['rank']}/{s['world_size']})"


def advice(status: dict[str, Any], max_workers: int | None = None) -> str | None:
    """One line on the worst-stalled stream, or None when no trainer waits for data."""
    failed = [s for s in status.get("streams", []) if s.get("error")]
    if failed:
        return f"{_label(failed[0])} failed: {failed[0]['error']}"
    stalled = [s for s in status.get("streams", [])
               if s.get("consumers") and (s.get("stall_share") or 0.0) > STALL_ADVICE_SHARE]
    if not stalled:
        return None
    worst = max(stalled, key=lambda s: s["stall_share"])
    share = worst["stall_share"]
    head = f"{_label(worst)}: its trainer waits {share:.0%} of the time for data; "
    w = status["workers"]
    alive, busy, target = w.get("alive", 0), w.get("busy", 0), w.get("target", 0)
    if alive < target:
        return head + (f"only {alive} of {target} workers are up (restarted "
                       f"{w.get('restarts', 0)} times): see the daemon's log")
    if alive and busy >= alive:
        # Producing at (1 - share) of demand: scale by 1 / (1 - share), at least one more.
        want = max(target + 1, math.ceil(target / max(1.0 - share, 0.05)))
        if max_workers is not None:
            want = min(want, max_workers)
        if want > target:
            return head + f"all {alive} workers are busy: add workers: " \
                          f"`tokenfeed scale --workers {want}`"
        return head + f"all {alive} workers are busy at this node's limit: use a faster " \
                      "tokenizer backend (tokenfeed[fast]) or fewer ranks per node"
    staging = status.get("staging", {})
    if staging.get("bytes", 0) >= staging.get("budget_bytes", 1):
        return head + "workers idle because the staging budget is spent: raise " \
                      "--max-staging-mib"
    if worst.get("depth", 0) > 0:
        return head + (f"its ring holds {worst['depth']} batches, so the consumer side is "
                       "the bottleneck: the trainer's CPU (its link thread copies each "
                       "batch) or too small a prefetch")
    return head + (f"workers idle ({busy}/{alive} busy) with an empty ring: reading is the "
                   "bottleneck (slow data disk or a row group larger than the staging "
                   "budget) or the daemon's loop lacks CPU")
