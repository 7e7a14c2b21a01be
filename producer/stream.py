"""One stream: a rank's sources -> tokenized units -> packed windows -> ring slots.

A stream reads each of its sources with a `SourceReader` (reader.py: row groups as
units, tasks, retries, the token cache), packs the units in order into free slots
(one source), or first interleaves the sources' documents into virtual units with
a `Mixer` (mixer.py: a mixture), and tracks which attached consumer has been sent
and has released which batch.

Slots and the consumers holding them are `SlotTable`'s (slots.py): the stream fills
and publishes, the table announces, releases and reclaims.

Read-ahead: a one-source stream reads until its ring's free slots plus one task per
pool place are covered; a mixture splits that between its sources by weight, and
reads first the source a virtual unit waits for. A mixture mixes lazily (only when
a free slot waits for tokens), so a weight change applies from the next batch not
yet filled, give or take the packer's own buffer and one virtual unit.

Failure behaviour: a reader's task that fails MAX_ATTEMPTS times fails the stream
(`on_error="fail"`), and its consumers get an error naming the file and row group;
with `on_error="skip"` its whole row group delivers nothing instead.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from tokenfeed.common.config import MAX_POSITION, StreamSpec
from tokenfeed.common.errors import StateMismatchError, TokenfeedError
from tokenfeed.common.ring import Ring
from tokenfeed.producer.bestfit import buffer_pieces
from tokenfeed.producer.cache import TokenCache
from tokenfeed.producer.config import DEFAULT_TASK_BYTES
from tokenfeed.producer.dataset import SplitPlan
from tokenfeed.producer.elastic import Layout
from tokenfeed.producer.mixer import RECENT_BATCHES, Mixer
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.pool import Result, Task
from tokenfeed.producer.reader import WHOLE, Source, SourceReader, always
from tokenfeed.producer.slots import Attachment, SlotTable

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 20  # status lists the latest skipped row groups, and counts them all
__all__ = ["WHOLE", "Stream", "cursor_at", "mixture_cursor"]


def cursor_at(plan: SplitPlan, spec: StreamSpec, position: dict[str, Any],
              layout: Layout | None = None) -> dict[str, Any]:
    """A packer position with the epoch and row-group ordinal its unit falls on."""
    if layout is not None:
        epoch, ordinal = divmod(layout.item(int(position["unit"]))[1], len(plan))
    else:
        epoch, ordinal = plan.unit_position(spec.rank, spec.world_size, int(position["unit"]))
    if epoch >= MAX_POSITION:
        raise StateMismatchError(
            f"position unit {position['unit']} of rank {spec.rank}/{spec.world_size} lies in "
            f"epoch {epoch}, past the largest exact position {MAX_POSITION}; the state is "
            "corrupt or from another data set"
        )
    return {**position, "epoch": epoch, "row_group": ordinal}


def mixture_cursor(plans: dict[str, SplitPlan], spec: StreamSpec,
                   position: dict[str, Any]) -> dict[str, Any]:
    """A mixture position (its `mix` state included) with every source's epoch; `epoch`
    and `row_group` are those of the source furthest behind."""
    epochs: dict[str, list[int]] = {}
    layouts = position["mix"].get("layouts") or {}
    for name, cursor in position["mix"]["sources"].items():
        if name in layouts:
            layout = Layout.from_json(layouts[name], spec.rank, spec.world_size)
            e, ordinal = divmod(layout.item(cursor[0])[1], len(plans[name]))
        else:
            e, ordinal = plans[name].unit_position(spec.rank, spec.world_size, cursor[0])
        epochs[name] = [e, ordinal]
    behind = min(epochs.values())
    return {**position, "epoch": behind[0], "row_group": behind[1], "epochs": epochs}


class Stream:
    def __init__(
        self, sid: int, spec: StreamSpec, plan: SplitPlan, ring: Ring, column: str,
        start: dict[str, Any] | None, *, task_bytes: int = DEFAULT_TASK_BYTES,
        on_error: str = "fail", cache: TokenCache | None = None,
        sources: list[Source] | None = None,
    ) -> None:
        """A one-source stream of `plan`, or, when `start` holds a `mix` state, a mixture
        of `sources` (in the state's name order; the first one's plan is `plan`)."""
        self.sid = sid
        self.spec = spec
        self.plan = plan
        self.ring = ring
        self.packer = make_packer(spec, start)
        self.mixer = Mixer(start["mix"]) if start is not None and "mix" in start else None
        self.layout = (Layout.from_json(start["elastic"], spec.rank, spec.world_size)
                       if start is not None and "elastic" in start else None)
        if self.mixer is None:
            sources = [Source("", plan, column, cache)] if sources is None else sources[:1]
        assert sources is not None
        assert self.mixer is None or [s.name for s in sources] == list(self.mixer.names)
        self.sources = sources
        self.readers = [
            SourceReader(
                sid + i, src.plan, src.column, rank=spec.rank, world_size=spec.world_size,
                shuffle_seed=spec.shuffle_seed, task_bytes=task_bytes, on_error=on_error,
                cache=src.cache, itemsize=ring.layout.itemsize,
                first_unit=self.mixer.cursors[i][0] if self.mixer else self.packer.next_unit,
                needs_unit=self.packer.needs_unit if self.mixer is None else always,
                layout=self.layout if self.mixer is None else self._source_layout(src.name),
            )
            for i, src in enumerate(sources)
        ]
        self.table = SlotTable(ring)
        self.error: str | None = None
        self.told: set[bytes] = set()  # consumers already sent `error`
        self.idle_since: float | None = None
        self.batches = 0
        self.units_packed = 0
        self._cursor_memo: tuple[dict[str, Any], dict[str, Any]] | None = None
        # per-source tokens mixed at each of the last batches filled (status: recent shares)
        self._recent: deque[list[int]] = deque(maxlen=RECENT_BATCHES + 1)

    def _source_layout(self, name: str) -> Layout | None:
        """A mixture source's units after an elastic resume (None: its plain stride)."""
        layouts = (self.mixer.layouts if self.mixer is not None else None) or {}
        if name not in layouts:
            return None
        return Layout.from_json(layouts[name], self.spec.rank, self.spec.world_size)

    # -- positions ----------------------------------------------------------

    @property
    def mixture(self) -> bool:
        return self.mixer is not None

    def cursor(self, position: dict[str, Any]) -> dict[str, Any]:
        if self.mixer is None:
            return cursor_at(self.plan, self.spec, position, self.layout)
        plans = {src.name: src.plan for src in self.sources}
        return mixture_cursor(plans, self.spec, position)

    def next_position(self) -> dict[str, Any]:
        """Cursor of the next batch to be filled."""
        position = self.packer.position
        if self.layout is not None:
            position = {**position, "elastic": self.layout.to_json()}
        if self.mixer is not None:
            at = self.packer.first_unit()
            self.mixer.forget_before(at)
            mix = self.mixer.state(at)
            bestfit = self.spec.packing == "bestfit"
            mix["exact"] = self.mixer.exact(position, bestfit)
            if bestfit:
                mix["pieces"] = self.mixer.pieces(buffer_pieces(position))
            position = {**position, "mix": mix}
        return self.cursor(position)

    def _filled_cursor(self) -> dict[str, Any]:
        """next_position() once per packer position: a batch's start is the cursor its
        predecessor ended at (a mixture's costs a buffer decode, best fit)."""
        position = self.packer.position
        if self._cursor_memo is None or self._cursor_memo[0] is not position:
            self._cursor_memo = (position, self.next_position())
        return self._cursor_memo[1]

    def resume_key(self, cursor: dict[str, Any]) -> tuple[Any, ...]:
        key = (*self.packer.resume_key(cursor), repr(cursor.get("elastic")))
        if self.mixer is None:
            return key
        mix = cursor.get("mix")
        if not isinstance(mix, dict):
            return (*key, None)
        return (*key, mix.get("at"), repr(mix.get("sources")), repr(mix.get("weights")))

    def seq_at(self, cursor: dict[str, Any]) -> int | None:
        """Seq of a still-held batch that starts at `cursor`, or of the next one to fill."""
        next_fill = self.next_position() if self.mixer else self.packer.position
        return self.table.seq_at(self.resume_key, self.resume_key(cursor), next_fill)

    # -- scheduling ---------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.table.depth

    @property
    def consumers(self) -> dict[bytes, Attachment]:
        return self.table.consumers

    @property
    def inflight_count(self) -> int:
        return sum(len(r.inflight) for r in self.readers)

    def estimate(self, task: Task) -> int:
        """The staged bytes a task just handed out is expected to bring."""
        return self.readers[task.stream - self.sid].inflight[(task.unit, task.part)]

    def staged(self) -> int:
        """Bytes this stream holds or expects outside its ring: the staging budget's share."""
        itemsize = self.ring.layout.itemsize
        buffered = max(self.packer.buffered_tokens, 0) * itemsize
        if self.mixer is not None:
            buffered += sum(self.mixer.pending_tokens(i) for i in range(len(self.readers))
                            ) * itemsize
        return buffered + sum(r.pending_bytes() for r in self.readers)

    def _wanted_tokens(self, pool_capacity: int) -> float:
        task_tokens = max(r.task_bytes * r.tokens_per_text_byte for r in self.readers)
        return (len(self.table.free) + 1) * self.spec.window_tokens + pool_capacity * task_tokens

    def _blocked_reader(self) -> int | None:
        """The reader the packer (or the mixer) waits on for a task not yet out."""
        if self.mixer is None:
            # A packer that holds a window or more with nothing out is not waiting: without
            # that test every loop pass took one more unit, so cached units (served in the
            # loop itself) filled the whole staging budget (+1.2-1.9 MB a unit).
            reader = self.readers[0]
            waiting = reader.retry or reader.next_part > 0 or (
                self.packer.buffered_tokens < self.spec.window_tokens)
            return 0 if waiting and reader.head_unscheduled(self.packer.next_unit) else None
        if self.mixer.blocked is not None:
            source, unit = self.mixer.blocked
            if self.readers[source].head_unscheduled(unit):
                return source
        return None

    def _hungry_readers(self, pool_capacity: int) -> list[int]:
        """Readers that want another task, the hungriest (by weight) first."""
        wanted = self._wanted_tokens(pool_capacity)
        if self.mixer is None:
            reader = self.readers[0]
            pending = reader.pending_bytes() // self.ring.layout.itemsize
            return [0] if self.packer.buffered_tokens + pending < wanted else []
        weights = self.mixer.weights
        hungry: list[tuple[float, int]] = []
        for i, reader in enumerate(self.readers):
            w = weights[self.mixer.names[i]]
            if w <= 0 or reader.error is not None:
                continue
            have = (reader.pending_bytes() // self.ring.layout.itemsize
                    + self.mixer.pending_tokens(i))
            if have < w * wanted:
                hungry.append((have / w, i))
        return [i for _, i in sorted(hungry)]

    def wants_work(self, pool_capacity: int) -> bool:
        """More tasks would be used: the ring has room, or the pool would idle without them.

        Read-ahead covers the free slots plus one task per pool place (every worker busy
        with a second task queued), whatever the ring's size; the daemon's staging budget
        bounds it across streams.
        """
        if self.error is not None or self.inflight_count >= pool_capacity:
            return False
        return self._blocked_reader() is not None or bool(self._hungry_readers(pool_capacity))

    def head_unscheduled(self) -> bool:
        """Packing waits for a task not yet out: a lost part, the rest of the next unit,
        or the next unit while the packer holds less than a window (see _blocked_reader)."""
        return self._blocked_reader() is not None

    def starvation(self) -> float:
        """Lower is hungrier: fraction of the ring already filled."""
        return self.depth / self.ring.layout.slot_count

    def _next_reader(self, pool_capacity: int) -> int:
        blocked = self._blocked_reader()
        if blocked is not None:
            return blocked
        hungry = self._hungry_readers(pool_capacity)
        return hungry[0] if hungry else 0

    def next_task(self, pool_capacity: int = 1) -> Task:
        return self.readers[self._next_reader(pool_capacity)].next_task()

    def serve_cached(self, pool_capacity: int = 1) -> int:
        """Take the next unit of the reader most in need from the token cache, if it is
        there; returns the bytes it staged (0: not cached, the workers will tokenize it)."""
        if self.error is not None:
            return 0
        return self.readers[self._next_reader(pool_capacity)].serve_cached()

    @property
    def units_cached(self) -> int:
        return sum(r.units_cached for r in self.readers)

    def on_failure(self, task: Task, error: str) -> None:
        reader = self._reader_of(task)
        if reader is None:
            return
        reader.on_failure(task, error)
        if reader.error is not None and self.error is None:
            self.error = f"stream {self.sid}: {reader.error}"
            log.error(self.error)

    def on_result(self, result: Result) -> None:
        reader = self._reader_of(result.task)
        if reader is not None:
            reader.on_result(result)

    def _reader_of(self, task: Task) -> SourceReader | None:
        i = task.stream - self.sid
        return self.readers[i] if 0 <= i < len(self.readers) else None

    # -- packing and delivery -----------------------------------------------

    def _take_unit(self) -> Result | None:
        """The packer's next unit: the reader's next one, or the mixer's next virtual one."""
        if self.mixer is None:
            return self.readers[0].take(self.packer.next_unit)
        return self.mixer.mix(lambda source, unit: self.readers[source].take(unit),
                              lambda source: len(self.readers[source].plan))

    def pack(self) -> bool:
        """Move finished units into the packer in order and fill free slots; True if any.

        A mixture mixes only while a free slot waits for tokens (weight changes apply
        to the next batch not yet filled); one source pushes whatever is finished."""
        filled = False
        while True:
            lazy = self.mixer is not None
            while not (lazy and (not self.table.free or self.packer.ready())):
                try:
                    unit = self._take_unit()
                    if unit is None:
                        break
                    self.packer.push(self.packer.next_unit, unit.tokens, unit.doc_starts)
                except TokenfeedError as e:  # a resumed position the data cannot hold
                    self.error = f"stream {self.sid}: {e}"
                    log.error(self.error)
                    return filled
                self.units_packed += 1
            if not (self.table.free and self.packer.ready()):
                return filled
            index = self.table.begin_fill()
            before = self._filled_cursor()
            self.packer.fill(self.ring.slots[index])
            self.table.publish(index, before, self._filled_cursor())
            self.batches += 1
            if self.mixer is not None:
                self._recent.append(self.mixer.totals())
            filled = True

    def reweight(self, weights: dict[str, float]) -> None:
        """A mixture's new weights, from the next virtual unit not yet mixed."""
        if self.mixer is None:
            raise StateMismatchError(f"stream {self.sid} reads one source: it has no weights")
        self.mixer.reweight(weights)
        self._cursor_memo = None  # cursors carry the schedule

    def announcements(self) -> list[tuple[bytes, dict[str, Any]]]:
        """`ready` messages now due: each consumer gets each filled batch once, in order."""
        return [(identity, {"stream": self.sid, "slot": index, "seq": seq, "cursor": after})
                for identity, index, seq, after in self.table.announcements()]

    def reclaim(self) -> None:
        self.table.reclaim()

    # -- consumers ----------------------------------------------------------

    def attach(self, identity: bytes, first_seq: int, replicas: int = 1,
               replica_wait_s: float = 0.0) -> None:
        self.table.attach(identity, first_seq, replicas, replica_wait_s)
        self.idle_since = None

    def release(self, identity: bytes, seq: int) -> None:
        self.table.release(identity, seq)

    def detach(self, identity: bytes) -> None:
        self.table.detach(identity)
        if not self.consumers:
            self.idle_since = time.monotonic()

    def _sum(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.readers)

    @property
    def skipped(self) -> int:
        return self._sum("skipped")

    def describe(self) -> dict[str, Any]:
        skips = [g for r in self.readers for g in r.skipped_row_groups]
        position = self.next_position()
        return {
            "stream": self.sid,
            **self.spec.to_dict(),
            "depth": self.depth,
            "slots": self.ring.layout.slot_count,
            "token_bytes": self.ring.layout.itemsize,
            "consumers": len(self.consumers),
            "replicas": self.table.replicas(),
            "batches": self.batches,
            "tasks_inflight": self.inflight_count,
            "tasks_done": self._sum("tasks_done"),
            "units_cached": self.units_cached,
            "units_done": self._sum("units_done"),
            "staged_bytes": self.staged(),
            "documents": self._sum("documents"),
            "skipped_values": self.skipped,
            "skipped_row_groups": skips[-MAX_LISTED_SKIPS:],
            "skipped_row_group_count": len(skips),
            "position": {k: v for k, v in position.items() if k not in ("buffer", "mix")},
            "mix": self._mix_status(position),
            **self.packer.stats(),
            "error": self.error,
        }

    def _mix_status(self, position: dict[str, Any]) -> dict[str, Any] | None:
        """Per source: target weight, realized token share over the stream's life and
        over the last RECENT_BATCHES batches, and epoch (counted as mixed, which runs
        ahead of delivery by the packer's buffer)."""
        if self.mixer is None:
            return None
        totals = self.mixer.totals()
        first = self._recent[0] if self._recent else [0] * len(totals)
        recent = [t - f for t, f in zip(totals, first, strict=True)]

        def shares(counts: list[int]) -> list[float | None]:
            total = sum(counts)
            return [c / total if total else None for c in counts]

        weights = self.mixer.weights
        return {name: {"weight": weights[name], "share": whole, "share_recent": last,
                       "epoch": position["epochs"][name][0], "tokens": tokens}
                for name, whole, last, tokens in zip(
                    self.mixer.names, shares(totals), shares(recent), totals, strict=True)}
