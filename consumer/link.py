"""The consumer's background thread: the only user of its control socket.

It turns `ready(slot, seq, cursor)` announcements into tensors ahead of the caller
(up to `prefetch` batches), checking the slot's seq before the copy and again once
it completed (the ring's seqlock: a rewritten slot means the daemon dropped this
consumer, and the copy is discarded with `DetachedError`), and releases each slot
once its copy is done (at once on CPU, when the copy's CUDA event completes on GPU)
AND the caller has taken the batch: until then the daemon keeps the slot, so a
consumer that stops and re-attaches at its `state_dict()` finds its next batch still
in the ring (warm re-attach, no re-tokenization). With a daemon that batches control
traffic (the attach answered `batch: true`, common/protocol.py), several announcements
arrive in one `readies` frame and the releases of one pass of this thread go in one
RELEASES frame. A release is never held back to make frames fuller: holding half a ring
cost a single fast consumer from the token cache 30-50% of its tokens/s (the daemon
refilled later), more than the fewer frames saved it. It also sends heartbeats and
watches the daemon's (a consumer's heartbeat carries `stall_s` and `step_s`, the
seconds its caller waited inside next() and spent between calls): silence longer
than DAEMON_SILENCE_S, a `shutdown` or an `error` is stored in `self.error` and ends
the thread, so the caller raises instead of waiting forever. Preparing batches here
keeps `next()` a queue pop (a sleeping caller's wake-up costs tens of µs on a 2-core
node).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.control import error_from_reply, request
from tokenfeed.common.errors import (
    DaemonGoneError,
    DaemonUnavailableError,
    DetachedError,
    ProtocolError,
    TokenfeedError,
)
from tokenfeed.common.ring import WRITING_SEQ, Ring
from tokenfeed.consumer.transfer import CpuTransfer, CudaTransfer

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    inputs: torch.Tensor
    targets: torch.Tensor
    seq: int
    cursor: dict[str, Any]
    event: Any  # CUDA event the caller's stream must wait on, or None


class Link(threading.Thread):
    def __init__(
        self,
        sock: zmq.Socket[Any],
        ring: Ring,
        stream_id: int,
        first_seq: int,
        transfer: CpuTransfer | CudaTransfer,
        prefetch: int,
        run_dir: str,
        batch: bool = False,
    ) -> None:
        super().__init__(name=f"tokenfeed-link-{stream_id}", daemon=True)
        self.sock, self.ring, self.stream_id, self.transfer = sock, ring, stream_id, transfer
        self.batches: queue.Queue[Prepared] = queue.Queue()
        self.prefetch = prefetch
        self.expected_seq = first_seq
        self.run_dir = run_dir
        self.error: TokenfeedError | None = None
        # the data's fingerprint, from a `plan` message: sent to a stream attached while the
        # daemon still read footers (its reply's fingerprint was ""), once it has them all
        self.fingerprint: str | None = None
        self.planned = threading.Event()
        self._stop_event = threading.Event()
        self._pending: deque[protocol.Message] = deque()
        # (event, slot, batch) whose copy is in flight: handed out once done and re-checked
        self._copying: deque[tuple[Any, int, Prepared]] = deque()
        self._copied: set[int] = set()
        self._returned: deque[int] = deque()  # seqs the caller took (appended by next())
        self._taken: set[int] = set()
        self.batch = batch  # the daemon takes readies and releases frames
        self._done: list[int] = []  # seqs copied and taken, not yet released (batch only)
        # (stall_s, step_s, mark, inside): seconds the caller waited inside next() and spent
        # between calls up to `mark` (perf_counter), and whether it is inside next() since.
        # next() replaces the whole tuple (atomic); heartbeats add the open interval, so a
        # trainer blocked in next(), or busy with a long step, is seen while it lasts.
        self.timing: tuple[float, float, float | None, bool] = (0.0, 0.0, None, False)

    def stop(self) -> None:
        self._stop_event.set()

    def wait_fingerprint(self) -> str:
        """The data's fingerprint once the daemon sends it (`plan`), waiting while this link
        runs: a daemon gone silent ends it (DAEMON_SILENCE_S), and then its error is raised."""
        while not self.planned.wait(0.1):
            if not self.is_alive():
                raise self.error or DaemonGoneError(
                    f"the tokenfeed link to {self.run_dir} ended before the daemon had read "
                    "every shard's footer; restart the feed")
        assert self.fingerprint is not None  # set before `planned`
        return self.fingerprint

    def taken(self, seq: int) -> None:
        """Called by next() on the caller's thread: the batch left the read-ahead."""
        self._returned.append(seq)  # deque.append is atomic; the link thread drains it

    def next_batch(self, stall_timeout_s: float) -> Prepared:
        """The next prepared batch; the link's error if it failed, TimeoutError after
        `stall_timeout_s` without one while the daemon is alive."""
        deadline = time.monotonic() + stall_timeout_s
        while True:
            try:
                return self.batches.get(timeout=0.05)
            except queue.Empty:
                pass
            if self.error is not None:
                raise self.error
            if not self.is_alive():
                raise TokenfeedError("the feed is closed")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no batch for {stall_timeout_s:.0f} s although the daemon is alive; "
                    "check `tokenfeed status` (workers, stream errors)"
                )

    def wait_begins(self, now: float) -> None:
        """next() was called at `now` (perf_counter): the caller's step since the last
        return ends, its wait begins."""
        stall_s, step_s, mark, _ = self.timing
        step_s += now - mark if mark is not None else 0.0
        self.timing = (stall_s, step_s, now, True)

    def wait_ends(self, called: float, now: float) -> None:
        """next(), called at `called`, returns at `now`: its wait ends, a step begins."""
        stall_s, step_s, _, _ = self.timing
        self.timing = (stall_s + now - called, step_s, now, False)

    def seconds(self) -> tuple[float, float]:
        """The caller's stall and step seconds so far, the interval now open included."""
        stall_s, step_s, mark, inside = self.timing
        if mark is not None:
            if inside:
                stall_s += time.perf_counter() - mark
            else:
                step_s += time.perf_counter() - mark
        return stall_s, step_s

    def run(self) -> None:
        try:
            self.transfer.bind_thread()
            self._loop()
        except TokenfeedError as e:
            self.error = e
        except Exception as e:  # surfaced to the caller by next()
            log.exception("tokenfeed link thread failed")
            self.error = TokenfeedError(f"consumer link thread failed: {type(e).__name__}: {e}")
        finally:
            # Copies in flight read the ring: finish them before the daemon may reuse slots.
            self.transfer.close()
            if self._stop_event.is_set():
                with contextlib.suppress(zmq.ZMQError):
                    self.sock.send(protocol.encode("detach", stream=self.stream_id), zmq.NOBLOCK)

    def _loop(self) -> None:
        last_heard = last_beat = time.monotonic()
        while not self._stop_event.is_set():
            can_prepare = self._pending and self._ahead() < self.prefetch
            # Short waits while slots await release, so the daemon can refill them soon;
            # 5 ms while only waiting for the caller: 200 wake-ups/s cost well under 1% CPU.
            if can_prepare:
                timeout_ms = 0
            elif self._copying:
                timeout_ms = 1
            else:
                timeout_ms = 5 if self._copied else 50
            if self.sock.poll(timeout_ms):
                while self.sock.poll(0):
                    self._on_message(protocol.decode(self.sock.recv()))
                last_heard = time.monotonic()
            while self._pending and self._ahead() < self.prefetch:
                self._prepare(self._pending.popleft())
            while self._copying and self.transfer.done(self._copying[0][0]):
                _, slot, batch = self._copying.popleft()
                self._hand_out(slot, batch)
            while self._returned:
                self._taken.add(self._returned.popleft())
            for seq in sorted(self._copied & self._taken):
                self._copied.discard(seq)
                self._taken.discard(seq)
                if self.batch:
                    self._done.append(seq)
                else:
                    self._release(seq)
            now = time.monotonic()
            beat_due = now - last_beat >= protocol.HEARTBEAT_INTERVAL_S
            if self._done:  # this pass's releases, one frame: never held for more
                self.sock.send(protocol.encode_releases(self.stream_id, self._done))
                self._done.clear()
            if beat_due:
                stall_s, step_s = self.seconds()
                self.sock.send(protocol.encode("heartbeat", stall_s=stall_s, step_s=step_s))
                last_beat = now
            if now - last_heard > protocol.DAEMON_SILENCE_S:
                raise DaemonGoneError(
                    f"the tokenfeed daemon at {self.run_dir} has been silent for "
                    f"{now - last_heard:.1f} s (dead or hung); restart it and resume from "
                    "feed.state_dict()"
                )

    def _on_message(self, msg: protocol.Message) -> None:
        op = msg["op"]
        if op == "ready":
            self._pending.append(msg)
        elif op == "readies":
            batches = msg.get("batches")
            if not isinstance(batches, list) or not 0 < len(batches) <= protocol.MAX_RELEASES:
                raise ProtocolError(f"readies frame whose batches are {str(batches)[:80]}, "
                                    f"not a list of 1 to {protocol.MAX_RELEASES}")
            for entry in batches:  # each field is checked by _prepare, like a ready's
                if not isinstance(entry, list) or len(entry) != 3:
                    raise ProtocolError(f"readies entry {str(entry)[:80]} is not "
                                        "[slot, seq, cursor]")
                self._pending.append({"op": "ready", "slot": entry[0], "seq": entry[1],
                                      "cursor": entry[2]})
        elif op == "plan":
            self.fingerprint = protocol.field(msg, "fingerprint", str)
            self.planned.set()
        elif op == "shutdown":
            raise DaemonGoneError(
                f"the tokenfeed daemon at {self.run_dir} shut down ({msg.get('reason')}); "
                "restart it and resume from feed.state_dict()"
            )
        elif op == "error":
            raise error_from_reply(msg)

    def _ahead(self) -> int:
        """Batches prepared or being copied, not yet taken by the caller."""
        return self.batches.qsize() + len(self._copying)

    def _prepare(self, msg: protocol.Message) -> None:
        slot, seq = protocol.field(msg, "slot", int), protocol.field(msg, "seq", int)
        cursor = protocol.field(msg, "cursor", dict)
        if seq != self.expected_seq:
            raise ProtocolError(f"batch {seq} announced while {self.expected_seq} was due")
        if not 0 <= slot < self.ring.layout.slot_count:
            raise ProtocolError(f"slot {slot} announced in a ring of "
                                f"{self.ring.layout.slot_count}")
        self.expected_seq += 1
        self._check_slot(slot, seq)
        (x, y), token = self.transfer.copy(slot)
        batch = Prepared(x, y, seq, cursor, token)
        if token is None:
            self._hand_out(slot, batch)
        else:
            self._copying.append((token, slot, batch))

    def _hand_out(self, slot: int, batch: Prepared) -> None:
        """The copy is complete: hand it out if the slot still holds its batch (seqlock)."""
        self._check_slot(slot, batch.seq)
        self.batches.put(batch)
        self._copied.add(batch.seq)

    def _check_slot(self, slot: int, seq: int) -> None:
        now = self.ring.seq_of(slot)
        if now != seq:
            raise DetachedError(
                f"ring slot {slot} was rewritten while batch {seq} was read from it (it now "
                f"reads {'being written' if now == WRITING_SEQ else now}): the daemon dropped "
                "this consumer (silent past its timeout: a stopped or overloaded process?) and "
                "gave the slot to another; the copy is discarded. Resume from "
                "feed.state_dict(), or pass reconnect_s to re-attach by itself"
            )

    def _release(self, seq: int) -> None:
        self.sock.send(protocol.encode("release", stream=self.stream_id, seq=seq))


PING_TIMEOUT_S = 5.0  # a daemon busy on a loaded node may take seconds to answer


def wait_for_daemon(run_dir: str | Any, timeout_s: float) -> protocol.Message:
    """The `pong` of a daemon on `run_dir`, waiting up to `timeout_s` for one to answer.

    No socket file fails at once; a socket whose daemon does not answer (busy, or gone
    without cleaning up) gets PING_TIMEOUT_S, so that a CPU-starved daemon is not taken
    for a dead one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return request(run_dir, "ping", timeout_s=PING_TIMEOUT_S, expect="pong")
        except DaemonUnavailableError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
