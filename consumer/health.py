"""`JobHealth`: one rank's failed or stalled feed becomes the same error on every rank.

    dist.init_process_group("nccl")
    feed = TokenFeed(32, 2048, stall_timeout_s=60)
    health = JobHealth(feed)              # on every rank (it makes a small gloo group)
    for x, y in health:                   # next(feed), then the job-wide check
        loss = model(x, y); loss.backward(); opt.step()

Without it, a rank whose feed raises (`DaemonGoneError` from a dead daemon on its
node, `StreamFailedError`, the `TimeoutError` of a stall) leaves the job, and every
other rank waits in the step's next collective until the NCCL timeout (10 to 30
minutes, torchtitan #3338), or is killed by the launcher without a word of why.

How it works: every rank checks after every `next()`, before the step's own
collectives. A check is one `all_reduce(MAX)` of three int64 (failed, ended, got
a batch) over a gloo group of its own, on CPU tensors: it
never syncs the GPU and never sits in the NCCL stream's order. A rank whose `next()`
raised reports it there instead of raising, so the check ends on every rank at
once; when a rank failed, a second collective gathers every rank's reason
(`REASON_BYTES` of UTF-8 each) and every rank raises the same `JobFeedError` naming
the lowest failing rank, the step and its error. Then the trainer's own
`except`/`finally` runs on every rank (a checkpoint, `destroy_process_group`).

Why every step and not every N seconds: a rank that fails between two checks has no
batch to carry it to the next one, while the others enter the step's collectives
with it; the check must sit between every `next()` and the collectives after it. A
side thread checking on a timer would see the failure in time but could not free
a main thread already blocked in an NCCL collective short of aborting the
communicator. What bounds the wait is `next()` itself: a dead daemon is
`DaemonGoneError` within DAEMON_SILENCE_S (5 s) after the batches already prepared, a
stall is the feed's `TimeoutError` after `stall_timeout_s`, so no rank reaches the
check later than that (plus `reconnect_s`, when set). A check costs one small
gloo all-reduce per step: a p50 of 0.9 ms with 3 ranks on a loaded 2-core machine
(`benchmarks/health_check.py`), against steps of hundreds of ms.

Failure behaviour: a rank's process that dies (or a check that outlasts the gloo
group's timeout, `timeout_s`) makes the collective fail: the others raise
`JobFeedError` with `rank=None`, naming the error gloo gave. Once failed, every
later call raises the same error again, without a collective. A feed that ends
(`take(n)`) on every rank at the same step ends the iteration everywhere; on some
ranks only, it is a `JobFeedError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from tokenfeed.common.errors import ConfigError, JobFeedError

log = logging.getLogger(__name__)

REASON_BYTES = 1024  # one rank's error message, UTF-8, cut to this
# The status a rank brings to a check, all_reduced with MAX: [failed, ended, got a batch]
# -> whether any rank failed, any rank's feed ended, any rank got a batch.
_FAILED, _ENDED, _GOT = range(3)


class JobHealth:
    """Wraps a feed (any iterator of batches, usually a `TokenFeed`) so that its failure
    on one rank is the same `JobFeedError` on every rank, at the same step.

    Create it on every rank of the default process group, at the same point (it makes
    a gloo group: a collective), after `init_process_group`; then take every batch
    through it (`next(health)`, `for batch in health`), at the same steps on every
    rank. `timeout_s` bounds one check: the longest a rank may spend between two
    checks (its step plus its `next()`) before the others give up on it (None: torch's
    default for gloo, 30 min).
    """

    def __init__(self, feed: Iterator[Any], *, timeout_s: float | None = None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"JobHealth: timeout_s={timeout_s!r} must be > 0 seconds")
        self.feed = feed
        self.step = 0  # checks passed: the batches every rank got
        self._failed: JobFeedError | None = None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            spec = getattr(feed, "spec", None)
            world = getattr(spec, "world_size", 1)
            if world != 1:
                raise ConfigError(
                    f"JobHealth: the feed is rank {getattr(spec, 'rank', '?')} of {world}, but "
                    "torch.distributed is not initialized; call "
                    "torch.distributed.init_process_group() first (torchrun sets its variables)")
            self.group, self.rank, self.world_size = None, 0, 1
            return
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        # Its own gloo group: CPU tensors (no GPU sync), and an order of its own, apart
        # from the training collectives on the default (NCCL) group.
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def __iter__(self) -> JobHealth:
        return self

    def __next__(self) -> Any:
        """The feed's next batch, once every rank got theirs; else `JobFeedError` on every
        rank (StopIteration on every rank when every feed ended)."""
        if self._failed is not None:
            raise self._failed
        try:
            batch = next(self.feed)
        except StopIteration:
            self.check(ended=True)  # returns only if every rank's feed ended here
            raise StopIteration from None
        except Exception as error:  # the check reports it, on every rank
            self.check(error)
            raise AssertionError("the check returned after a failure") from error
        self.check()
        return batch

    def check(self, error: BaseException | None = None, *, ended: bool = False) -> None:
        """One job-wide check: returns on every rank if every rank is healthy, else raises
        the same `JobFeedError` on every rank. `next()` calls it; a loop that takes its
        batches from the feed itself calls it after every batch, on every rank, with the
        error its `next(feed)` raised, if any. `ended=True` (the feed ran out) returns
        when every rank's feed ended at this step."""
        if self._failed is not None:
            raise self._failed
        step = self.step
        self.step += 1
        status = torch.tensor([error is not None, ended, error is None and not ended],
                              dtype=torch.int64)
        if self.group is not None:
            try:
                torch.distributed.all_reduce(status, torch.distributed.ReduceOp.MAX,
                                             group=self.group)
            except RuntimeError as e:  # a rank's process died, or the check timed out
                raise self._fail(None, step, f"{type(e).__name__}: {e}", error) from e
        if not status[_FAILED] and not (status[_ENDED] and status[_GOT]):
            return  # every rank got its batch, or every rank's feed ended
        mine = ""
        if error is not None:
            mine = f"{type(error).__name__}: {error}"
        elif ended:
            mine = "its feed ended (StopIteration) while other ranks' went on"
        reasons = self._gather(mine, step)
        failed = [r for r, reason in enumerate(reasons) if reason]
        others = f" (also failed: rank {', '.join(map(str, failed[1:]))})" if failed[1:] else ""
        raise self._fail(failed[0], step, reasons[failed[0]], error, others)

    def _gather(self, reason: str, step: int) -> list[str]:
        """Every rank's reason (empty: healthy), in rank order."""
        if self.group is None:
            return [reason]
        mine = torch.zeros(REASON_BYTES, dtype=torch.uint8)
        data = reason.encode()[:REASON_BYTES]
        mine[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            torch.distributed.all_gather(every, mine, group=self.group)
        except RuntimeError as e:
            raise self._fail(None, step, f"{type(e).__name__}: {e}", None) from e
        return [bytes(t.tolist()).rstrip(b"\0").decode(errors="ignore") for t in every]

    def _fail(self, rank: int | None, step: int, reason: str, error: BaseException | None,
              others: str = "") -> JobFeedError:
        what = (f"rank {rank} of {self.world_size}{others} could not deliver its batch"
                if rank is not None else "a rank left the job-wide feed check (its process "
                "exited, or it spent longer than timeout_s between two checks)")
        self._failed = JobFeedError(
            f"{what} at step {step}: {reason} -- every rank "
            "of the job stops at this step (tokenfeed JobHealth); fix that rank's feed (its "
            "daemon: `tokenfeed status`) and resume every rank from the last checkpoint",
            rank=rank, step=step, reason=reason)
        if error is not None and rank == self.rank:
            log.error("this rank's feed failed at step %d: %s", step, error)
        return self._failed
