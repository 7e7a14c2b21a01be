"""Hand tasks to workers: most-starved stream first, read-ahead bounded by a memory budget.

Each pass fills every free worker place (an idle worker first, then a worker's
second, queued task) with the next task of the hungriest stream that wants work
(`wants_work`: packing waits for a task not yet out, or a reader is under its share
of the read-ahead), hungriest = the least filled ring, then the fewest tasks in
flight. Read-ahead is decided here, from what each stream exposes (stream.py). A
task goes to a worker whose reader already decoded its row group when one of the
least loaded is such a worker, so the parts of a row group rarely decode its Parquet pages twice.

Units the token cache holds are served first, by the daemon itself (no worker), under
the same read-ahead rule and budget.

The staging budget (`--max-staging-mib`) bounds the bytes held outside the rings
by all streams together: finished parts not yet packed, tokens pushed into packers
and not yet cut, and the estimated size of every task in flight. Once it is spent
no new task starts, except the tasks packing waits for (a re-run of a lost task,
the rest of the next unit to pack: holding them back could deadlock) and the first
task of an idle pool (a document
larger than the budget must still get through). Memory therefore stays bounded by
the rings plus the budget plus one task, whatever the corpus size.

Failure behaviour: a stream whose next task cannot be built (a position the data
cannot hold) gets an error and is skipped; the others are still served.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenfeed.producer.pool import Task, Worker, WorkerPool
from tokenfeed.producer.stream import Stream

log = logging.getLogger(__name__)

def wants_work(stream: Stream, pool_capacity: int) -> bool:
    """More tasks would be used: packing waits for one, or a reader is under its share of
    the free slots plus one task per pool place (the staging budget bounds it overall)."""
    if stream.error is not None or stream.inflight_count >= pool_capacity:
        return False
    return stream.blocked_reader() is not None or bool(stream.hungry_readers(pool_capacity))


def next_reader(stream: Stream, pool_capacity: int) -> int:
    """The reader of `stream` to read next: the one packing waits on, else the hungriest."""
    blocked = stream.blocked_reader()
    if blocked is not None:
        return blocked
    hungry = stream.hungry_readers(pool_capacity)
    return hungry[0] if hungry else 0


def schedule(streams: Iterable[Stream], pool: WorkerPool, budget_bytes: int,
             full: bool = True) -> int:
    """Assign tasks while workers have room and the budget allows; returns how many.
    Unless `full`, a stream that did not change since it last wanted no work is not asked."""
    streams = list(streams)
    capacity = pool.capacity
    # Whether each stream wants work, asked once a pass and again only for the stream
    # that just got some: it depends on that stream alone (and the pool's capacity), and
    # asking every stream for every free worker place was a fifth of the daemon's CPU
    # serving 8 ranks from a warm cache. The staging sum is made only when one does.
    wanting = {s.sid: False for s in streams}
    for stream in streams:
        if full or stream.changed or stream.wants:
            wanting[stream.sid] = stream.wants = wants_work(stream, capacity)
    if not any(wanting.values()):
        return 0
    staged = sum(s.staged() for s in streams)
    for stream in streams:  # cached units first: no worker needed, memory speed
        while staged < budget_bytes and wanting[stream.sid]:
            served = stream.serve_cached(next_reader(stream, capacity))
            if not served:
                break
            staged += served
            wanting[stream.sid] = stream.wants = wants_work(stream, capacity)
    free = pool.free()
    assigned = 0
    while free:
        hungry = [s for s in streams if wanting[s.sid]]
        if not hungry:
            break
        stream = min(hungry, key=lambda s: (s.starvation(), s.inflight_count, s.sid))
        over_budget = staged >= budget_bytes and pool.inflight() > 0
        if over_budget and stream.blocked_reader() is None:
            break
        reader = next_reader(stream, capacity)
        served = stream.serve_cached(reader)  # a unit starts here: the cache before workers
        if served:
            staged += served
            wanting[stream.sid] = stream.wants = wants_work(stream, capacity)
            continue
        try:
            task = stream.next_task(reader)
        except Exception as e:  # one stream's bad position must not stop the node's feed
            log.exception("stream %d cannot be scheduled", stream.sid)
            stream.error = f"stream {stream.sid} cannot be scheduled: {type(e).__name__}: {e}"
            stream.changed = True
            wanting[stream.sid] = stream.wants = False
            continue
        worker = _pick(free, task)
        pool.assign(worker, task)
        staged += stream.estimate(task)
        assigned += 1
        wanting[stream.sid] = stream.wants = wants_work(stream, capacity)
        free = pool.free()
    return assigned


def _pick(free: list[Worker], task: Task) -> Worker:
    """Among the least loaded free workers, one that has the task's row group decoded."""
    least = [w for w in free if len(w.tasks) == len(free[0].tasks)]
    row_group = (task.path, task.row_group)
    return next((w for w in least if w.last_row_group == row_group), least[0])
