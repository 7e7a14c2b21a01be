"""`TokenFeed`: the training rank's iterator over `(inputs, targets)` batches.

    feed = TokenFeed(batch_size=32, seq_len=2048)      # rank/world from torch.distributed or env
    x, y = next(feed)                                   # (B, T) int32, (B, T) int64 on the device
    ckpt["data"] = feed.state_dict()                    # position after the last batch returned

Construction checks that a daemon answers (fail fast, clear error); the stream is
attached on the first `next()`, so `load_state_dict()` can come in between.
Batch k is the k-th run of B*T+1 consecutive tokens of this rank's stream.

Failure behaviour: a daemon that shuts down or goes silent makes `next()` raise
`DaemonGoneError` within DAEMON_SILENCE_S (after the batches already prepared),
or, with `reconnect_s > 0`, wait that long for a daemon to answer on the run dir
again (a systemd restart, say; the constructor waits as long for a daemon that is
still starting) and re-attach at the position after the last
batch returned, so the trainer continues as if nothing happened; no batch for
`stall_timeout_s` while the daemon is alive raises `TimeoutError`.
Tensors handed out are never written again by tokenfeed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec, resolve_run_dir
from tokenfeed.common.control import connect, receive, request
from tokenfeed.common.errors import (
    ConfigError,
    DaemonGoneError,
    DaemonUnavailableError,
    StateMismatchError,
    TokenfeedError,
)
from tokenfeed.common.ring import Ring
from tokenfeed.consumer.link import Link
from tokenfeed.consumer.topology import resolve_topology
from tokenfeed.consumer.transfer import make_transfer

log = logging.getLogger(__name__)

STATE_VERSION = 1
ATTACH_TIMEOUT_S = 30.0


class TokenFeed:
    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        run_dir: str | Path | None = None,
        packing: str = "concat",
        shuffle_seed: int | None = None,
        buffer_docs: int = 1000,
        min_tail: int | None = 32,
        prefetch: int = 2,
        stall_timeout_s: float = 300.0,
        reconnect_s: float = 0.0,
    ) -> None:
        topo = resolve_topology(rank, world_size, device)
        self.spec = StreamSpec(
            split=split, rank=topo.rank, world_size=topo.world_size, batch_size=batch_size,
            seq_len=seq_len, packing=packing, shuffle_seed=shuffle_seed,
            buffer_docs=buffer_docs, min_tail=min_tail,
        )
        if prefetch < 1:
            raise ConfigError(f"prefetch={prefetch} must be >= 1")
        self.device = topo.device
        self.run_dir = resolve_run_dir(run_dir)
        self.prefetch = prefetch
        self.stall_timeout_s = stall_timeout_s
        self.reconnect_s = reconnect_s
        self._start: dict[str, Any] | None = None
        self._expect: dict[str, Any] = {}
        self._cursor: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._link: Link | None = None
        self._ring: Ring | None = None
        self._closed = False
        self.batches_returned = 0
        # Fail fast if no daemon answers, or, with reconnect_s, wait for one that is starting.
        self._wait_for_daemon(self.reconnect_s)

    # -- iteration ----------------------------------------------------------

    def __iter__(self) -> TokenFeed:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        link = self._link if self._link is not None else self._attach()
        try:
            item = link.batches.get_nowait()
        except queue.Empty:
            try:
                item = self._wait(link)
            except DaemonGoneError as gone:
                if self.reconnect_s <= 0:
                    raise
                link = self._reconnect(gone)
                item = self._wait(link)
        if item.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.event)
            item.inputs.record_stream(current)
            item.targets.record_stream(current)
        link.taken(item.seq)
        self._cursor = item.cursor
        self.batches_returned += 1
        return item.inputs, item.targets

    def take(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly `n` batches, e.g. one evaluation pass: `for x, y in val.take(20): ...`."""
        if n < 0:
            raise ConfigError(f"take(n={n}): n must be >= 0")
        for _ in range(n):
            yield next(self)

    def _wait(self, link: Link) -> Any:
        deadline = time.monotonic() + self.stall_timeout_s
        while True:
            try:
                return link.batches.get(timeout=0.05)
            except queue.Empty:
                pass
            if link.error is not None:
                raise link.error
            if not link.is_alive():
                raise TokenfeedError("the feed is closed")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no batch for {self.stall_timeout_s:.0f} s although the daemon is alive; "
                    "check `tokenfeed status` (workers, stream errors)"
                )

    def _reconnect(self, gone: DaemonGoneError) -> Link:
        """Wait for a daemon on the run dir and re-attach after the last batch returned."""
        log.warning("%s; waiting up to %.0f s for a daemon to re-attach", gone, self.reconnect_s)
        self._drop_link()
        if self._cursor is not None:
            self._start = self._cursor
        self._expect = {"fingerprint": self._info.get("fingerprint"),
                        "tokenizer": self._info.get("tokenizer", {}).get("identity")}
        try:
            self._wait_for_daemon(self.reconnect_s)
        except DaemonUnavailableError:
            raise gone from None
        return self._attach()

    def _wait_for_daemon(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                request(self.run_dir, "ping", timeout_s=max(1.0, min(5.0, timeout_s)),
                        expect="pong")
                return
            except DaemonUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _attach(self) -> Link:
        if self._closed:
            raise TokenfeedError("the feed is closed; create a new TokenFeed")
        ctx: zmq.Context[Any] = zmq.Context.instance()
        sock = connect(ctx, self.run_dir)
        try:
            sock.send(protocol.encode(
                "attach", spec=self.spec.to_dict(), start=self._start, expect=self._expect,
            ))
            reply = receive(sock, ATTACH_TIMEOUT_S, {"attached"})
        except BaseException:
            sock.close(linger=0)
            raise
        ring = None
        try:
            ring = Ring.attach(protocol.field(reply, "ring", str))
            transfer = make_transfer(ring, self.spec.batch_size, self.spec.seq_len,
                                     self.spec.packing, self.device)
        except BaseException:  # e.g. pinning refused: give the slots back before raising
            with contextlib.suppress(zmq.ZMQError):
                sock.send(protocol.encode("detach"), zmq.NOBLOCK)
            sock.close(linger=100)
            if ring is not None:
                ring.close()
            raise
        self._ring = ring
        self._info = {k: reply[k] for k in ("stream", "fingerprint", "tokenizer", "start")}
        self._cursor = reply["start"]
        self._link = Link(sock, ring, int(reply["stream"]), int(reply["start_seq"]), transfer,
                          self.prefetch, str(self.run_dir))
        self._link.start()
        return self._link

    # -- position -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (not the read-ahead); JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "cursor": self._cursor if self._cursor is not None else self._start,
            "fingerprint": self._info.get("fingerprint", self._expect.get("fingerprint")),
            "tokenizer": self._info.get("tokenizer", {}).get("identity",
                                                             self._expect.get("tokenizer")),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._link is not None:
            raise StateMismatchError(
                "load_state_dict() after the first next(); call it on a fresh TokenFeed"
            )
        missing = [k for k in ("version", "spec", "cursor") if not isinstance(state, dict)
                   or k not in state]
        if missing:
            raise StateMismatchError(f"feed state {str(state)[:80]} has no {', '.join(missing)}; "
                                     "pass the dict feed.state_dict() returned, unchanged")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise StateMismatchError(
                f"feed state version {state.get('version') if isinstance(state, dict) else None}"
                f" is not {STATE_VERSION}; it comes from another tokenfeed version"
            )
        try:
            saved = StreamSpec.from_dict(state["spec"])
        except (KeyError, ConfigError) as e:
            raise StateMismatchError(f"feed state has no valid stream spec ({e})") from None
        diffs = [
            f"{k}: saved {v!r}, now {getattr(self.spec, k)!r}"
            for k, v in saved.to_dict().items()
            if v != getattr(self.spec, k)
        ]
        if diffs:
            raise StateMismatchError("feed state is for another stream: " + "; ".join(diffs))
        self._start = state["cursor"]
        self._cursor = state["cursor"]
        self._expect = {"fingerprint": state.get("fingerprint"),
                        "tokenizer": state.get("tokenizer")}

    @property
    def epoch(self) -> int:
        """Epoch of the next token this feed will return."""
        return int((self._cursor or {}).get("epoch", 0))

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_link()

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.stop()
            link.join(timeout=5.0)
            if link.is_alive():  # stuck in a call: leave its socket and ring alone, not race
                log.warning("tokenfeed link thread did not stop within 5 s; leaking it")
                self._ring = None
                return
            link.sock.close(linger=100)
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def __enter__(self) -> TokenFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self, _finalizing: Any = sys.is_finalizing) -> None:
        # Bound at definition: late in interpreter shutdown module globals are None.
        if _finalizing():  # modules are being torn down; the OS reclaims everything
            return
        with contextlib.suppress(Exception):
            self.close()
