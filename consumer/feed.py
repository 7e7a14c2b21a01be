"""`TokenFeed`: the training rank's iterator over `(inputs, targets)` batches.

    feed = TokenFeed(batch_size=32, seq_len=2048)      # rank/world from torch.distributed or env
    x, y = next(feed)                                   # (B, T) int32, (B, T) int64 on the device
    ckpt["data"] = feed.state_dict()                    # position after the last batch returned
    for x, y, state in feed.with_state(): ...          # state resumes AT this batch (prefetch)
    val = TokenFeed(32, 2048, split="val", max_batches=20)
    for x, y in val: ...                                # each `for`: the same 20 batches

Construction resolves rank, world size and device (consumer/topology.py), checks
that a daemon answers (fail fast, clear error) and learns its tokenizer (`vocab_size`,
`bos_id`, `tokenizer`; `vocab_size=V` and `check_tokenizer(bos_id=, vocab_size=)` are
checked against it, consumer/tokenizer.py); the stream is attached on the first
`next()`, so `load_state_dict()` (parsed in consumer/state.py) can come in between.
Batch k is the k-th run of B*T+1 consecutive tokens of this rank's stream. A feed
still open at interpreter exit detaches then (atexit), so the daemon frees its
slots at once instead of waiting out its consumer timeout.

A fixed validation set (`max_batches=N`, or `tokens=` across all ranks) is a round of
this rank's first N batches of the val split, then `StopIteration`; every `iter(feed)`
(each `for` loop, as torchtitan's and nanochat's eval loops do) starts the round again
at its first batch, and the daemon serves rounds after the first from memory or its
token cache (producer/valstore.py).

Failure behaviour: a daemon that shuts down or goes silent makes `next()` raise
`DaemonGoneError` within DAEMON_SILENCE_S (after the batches already prepared), or,
with `reconnect_s > 0`, wait that long for a daemon on the run dir and re-attach after
the last batch returned (consumer/reconnect.py; the constructor waits as long for a
daemon still starting);
no batch for `stall_timeout_s` while the daemon is alive raises `TimeoutError`.
Tensors handed out are never written again by tokenfeed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenfeed.common.config import (
    PRESET,
    Preset,
    StreamSpec,
    check_feed_options,
    check_source_name,
    resolve_packing,
    resolve_run_dir,
    round_batches,
)
from tokenfeed.common.errors import (
    ConfigError,
    DaemonGoneError,
    DaemonUnavailableError,
    StateMismatchError,
    TokenfeedError,
)
from tokenfeed.common.exclude import exclude_fields
from tokenfeed.common.ring import Ring
from tokenfeed.consumer import lifetime, reconnect
from tokenfeed.consumer import provenance as records
from tokenfeed.consumer.attach import attach
from tokenfeed.consumer.docinfo import doc_info
from tokenfeed.consumer.link import Link, wait_for_daemon
from tokenfeed.consumer.state import STATE_VERSION, log_source_change, parse_state
from tokenfeed.consumer.tokenizer import check_bos, checked_facts, fact
from tokenfeed.consumer.topology import mesh_placement, resolve_topology

log = logging.getLogger(__name__)

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
        mix: dict[str, float] | None = None,
        buffer_docs: int | Preset = PRESET,
        min_tail: int | Preset | None = PRESET,
        vocab_size: int | None = None,
        replicas: int = 1,
        doc_info: bool = False,
        prefetch: int = 2,
        stall_timeout_s: float = 300.0,
        reconnect_s: float = 0.0,
        max_batches: int | None = None,
        tokens: int | None = None,
        source: str | None = None,
        allow_source_changes: bool = False,
        exclude: str | Path | None = None,
        provenance: bool = False,
    ) -> None:
        topo = resolve_topology(rank, world_size, device)
        if source is not None:  # one source of a mixture daemon: a mixture of that one
            if mix is not None:
                raise ConfigError(f"pass source={source!r} or mix={mix!r}, not both")
            mix = {check_source_name(source): 1.0}
        if tokens is not None:
            max_batches = round_batches(tokens, max_batches, batch_size, seq_len,
                                        topo.world_size)
        self.spec = StreamSpec(
            split=split, rank=topo.rank, world_size=topo.world_size, batch_size=batch_size,
            seq_len=seq_len, shuffle_seed=shuffle_seed, mix=mix, max_batches=max_batches,
            **resolve_packing(packing, buffer_docs, min_tail),
        )
        self.round_batches = 0  # batches returned in this validation round (max_batches)
        check_feed_options(vocab_size=vocab_size, prefetch=prefetch, replicas=replicas,
                           allow_source_changes=allow_source_changes)
        # A loaded mixture state may name other sources than the daemon serves: resume
        # anyway (kept sources exactly, added ones from their beginning; producer/changes.py)
        self.allow_source_changes = allow_source_changes
        self._reweight = False  # a resumed mixture changes to this feed's mix (see load)
        self.model_vocab_size = vocab_size
        # Sent with the first attach only: a replica that re-attaches later rejoins its
        # group's stream at its own position, it does not start a new group there.
        self.replicas = replicas
        self.doc_info = doc_info  # next() also yields the batch's DocInfo (docinfo.py)
        self.device = topo.device
        self.run_dir = resolve_run_dir(run_dir)
        self.prefetch = prefetch
        self.stall_timeout_s = stall_timeout_s
        self.reconnect_s = reconnect_s
        # Documents this stream never delivers: read here (a bad line fails at once), sent
        # as content with every attach (common/exclude.py), checked by the daemon.
        self._exclude = exclude_fields(exclude) if exclude is not None else {}
        # (attach fields, the batch next() returned last): consumer/provenance.py
        self._provenance = (records.attach_fields(provenance), None)
        self._start: dict[str, Any] | None = None
        self._skip = 0  # batches the daemon drops after _start, until the first one arrives
        self._expect: dict[str, Any] = {}
        self._cursor: dict[str, Any] | None = None
        self._info: dict[str, Any] = {}
        self._link: Link | None = None
        self._attached = False
        self._ring: Ring | None = None
        self._closed = False
        self._tokenizer: dict[str, Any] = {}
        self.batches_returned = 0
        # Fail fast if no daemon answers, or, with reconnect_s, wait for one that is starting.
        self._wait_for_daemon(self.reconnect_s)
        lifetime.track(self)

    @classmethod
    def from_mesh(
        cls, mesh: Any, batch_size: int, seq_len: int, *, dp_dim: str | Sequence[str] = "dp",
        **kwargs: Any,
    ) -> TokenFeed:
        """A feed placed by a `torch.distributed` DeviceMesh: rank and world size from its
        data-parallel dimension(s), `replicas` from the processes on this node that share
        this data-parallel rank (the TP/PP peers), so they all read one stream.

            mesh = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
            feed = TokenFeed.from_mesh(mesh, 32, 2048, dp_dim="dp")
        """
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE") or torch.cuda.device_count()
                               or 1)
        place = mesh_placement(np.asarray(mesh.mesh.tolist()), mesh.mesh_dim_names or (),
                               dp_dim, mesh.get_rank(), local_world_size)
        return cls(batch_size, seq_len, rank=place.rank, world_size=place.world_size,
                   replicas=place.replicas, **kwargs)

    # -- iteration ----------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """The feed itself; with `max_batches`, a new validation round from its first batch
        (a round left part-way is abandoned), as an iterator of its own: iterating that
        again (`it = iter(feed)`, then `for x in it`) continues the round."""
        if self.spec.max_batches is None:
            return self
        if self.round_batches or self._link:
            self._drop_link()  # the daemon drops an idle val stream at once
            self._start = self._cursor = None
            self._skip = 0
            self.round_batches = 0
        return self._round()

    def _round(self) -> Iterator[tuple[Any, ...]]:
        while True:
            try:
                batch = next(self)
            except StopIteration:  # the round's last batch was returned
                return
            yield batch

    def __next__(self) -> tuple[Any, ...]:
        """(inputs, targets), or (inputs, targets, DocInfo) with `doc_info=True`."""
        limit = self.spec.max_batches
        if limit is not None and self.round_batches >= limit:
            self._drop_link()  # the round is over: its ring goes back to the daemon
            raise StopIteration
        called = time.perf_counter()
        if self._link is not None:  # the step since the last return ends; a wait begins
            self._link.wait_begins(called)
        link = self._link if self._link is not None else self._attach()
        try:
            item = link.batches.get_nowait()
        except queue.Empty:
            try:
                item = link.next_batch(self.stall_timeout_s)
            except DaemonGoneError as gone:
                if self.reconnect_s <= 0:
                    raise
                link, item = reconnect.next_batch(gone, self.reconnect_s,
                                                  self.stall_timeout_s, self._reconnect)
        if item.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.event)
            item.inputs.record_stream(current)
            item.targets.record_stream(current)
        link.taken(item.seq)
        self._cursor = item.cursor
        if self._provenance[0]:  # which batch: its record is asked for only when wanted
            self._provenance = (self._provenance[0], records.Delivered(link, item.seq))
        self._skip = 0
        self.batches_returned += 1
        self.round_batches += 1
        # The wait ends, a step begins (a new link, after an attach, counts from zero).
        link.wait_ends(called, time.perf_counter())
        if self.doc_info:  # computed on the batch's device, on the caller's stream
            return item.inputs, item.targets, doc_info(item.inputs, self.bos_id)
        return item.inputs, item.targets

    def with_state(self) -> Iterator[tuple[Any, ...]]:
        """`(inputs, targets, state)` batches, where `state` resumes AT this batch: a feed
        that loads it returns this same batch first.

        This is the shape of nanochat's loader, for loops that fetch the next batch
        before the current step ends: a checkpoint taken between the prefetch and the
        step stores the state that came with the prefetched batch, and a resume trains on
        that batch next. (`state_dict()` after `next()` is the position AFTER the batch
        returned: saved there, the prefetched batch would be skipped on resume.)
        """
        while True:
            if self._link is None and not self._closed:
                self._attach()  # so that even the first state names the data and tokenizer
            state = self.state_dict()
            try:
                batch = next(self)
            except StopIteration:  # a validation round ended
                return
            yield (*batch, state)

    def last_provenance(self) -> list[list[dict[str, Any]]] | None:
        """The documents of the batch `next()` last returned (None before the first): B
        rows of segments, as `tokenfeed explain --json` lists them (consumer/provenance.py)."""
        return records.last_rows(bool(self._provenance[0]), self._provenance[1], self._link)

    def take(self, n: int) -> Iterator[tuple[Any, ...]]:
        """Exactly `n` batches, e.g. one evaluation pass: `for x, y in val.take(20): ...`."""
        if n < 0:
            raise ConfigError(f"take(n={n}): n must be >= 0")
        for _ in range(n):
            try:
                batch = next(self)
            except StopIteration:  # a validation round ended first
                return
            yield batch

    def _reconnect(self, gone: DaemonGoneError) -> Link:
        """Wait for a daemon on the run dir and re-attach after the last batch returned."""
        log.warning("%s; waiting up to %.0f s for a daemon to re-attach", gone, self.reconnect_s)
        if self._info.get("fingerprint") == "" and self._link is not None:
            self._info["fingerprint"] = self._link.fingerprint  # None: never learnt, unchecked
        self._drop_link()
        if self._cursor is not None:
            self._start = self._cursor
        self._expect = reconnect.expected(self._info)
        try:
            self._wait_for_daemon(self.reconnect_s)
        except DaemonUnavailableError:
            raise gone from None
        return self._attach()

    def _wait_for_daemon(self, timeout_s: float) -> None:
        pong = wait_for_daemon(self.run_dir, timeout_s)
        if isinstance(pong.get("tokenizer"), dict):
            self._learn_tokenizer(pong["tokenizer"])

    def _attach(self) -> Link:
        if self._closed:
            raise TokenfeedError("the feed is closed; create a new TokenFeed")
        done = attach(
            self.run_dir, self.spec, self.device, start=self._start, expect=self._expect,
            replicas=1 if self._attached else self.replicas,
            # A replica coming back must find its group's stream, not start a new one.
            rejoin=self._attached and self.replicas > 1, reweight=self._reweight,
            skip=self._skip, allow_source_changes=self.allow_source_changes,
            fields={**self._exclude, **self._provenance[0]})
        reply = done.reply
        try:
            self._learn_tokenizer(reply["tokenizer"])
            records.check_attached(bool(self._provenance[0]), reply)
        except BaseException:
            done.abort()
            raise
        if self.allow_source_changes:
            log_source_change(self._start, reply.get("start"))
        self._ring = done.ring
        self._info = {k: reply[k] for k in ("stream", "fingerprint", "tokenizer", "start")}
        self._cursor = reply["start"]
        self._attached = True
        self._reweight = False  # done: a re-attach resumes the cursor's schedule as it is
        self._link = Link(done.sock, done.ring, int(reply["stream"]), int(reply["start_seq"]),
                          done.transfer, self.prefetch, str(self.run_dir),
                          batch=reply.get("batch") is True)
        self._link.start()
        return self._link

    # -- tokenizer ----------------------------------------------------------

    def _learn_tokenizer(self, info: dict[str, Any]) -> None:
        """Record the daemon's tokenizer facts; refuse a model vocabulary they overflow."""
        self._tokenizer = checked_facts(info, self.model_vocab_size, self.run_dir)

    def _tokenizer_fact(self, key: str) -> Any:
        return fact(self._tokenizer, key, self.run_dir)

    def check_tokenizer(self, *, bos_id: int | None = None,
                        vocab_size: int | None = None) -> TokenFeed:
        """Refuse a daemon serving another tokenizer than the model's, naming both: its BOS
        id must be `bos_id`, its ids must fit `vocab_size` (VocabularyMismatchError).
        Returns the feed: `feed = TokenFeed(...).check_tokenizer(bos_id=..., vocab_size=...)`."""
        if vocab_size is not None:
            checked_facts(self._tokenizer, vocab_size, self.run_dir)
        if bos_id is not None:
            check_bos(self._tokenizer, bos_id, self.run_dir)
        return self

    @property
    def vocab_size(self) -> int:
        """Token ids of the daemon's tokenizer (special tokens included): every id < this."""
        return int(self._tokenizer_fact("n_vocab"))

    @property
    def bos_id(self) -> int:
        """The id that starts every document."""
        return int(self._tokenizer_fact("bos_id"))

    @property
    def tokenizer(self) -> dict[str, str]:
        """The daemon's tokenizer: `name` (encoding or directory name) and `identity`
        (a digest of its ranks, specials and BOS; a resumed state must match it)."""
        return {"name": str(self._tokenizer_fact("name")),
                "identity": str(self._tokenizer_fact("identity"))}

    # -- position -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned (not the read-ahead); JSON-serialisable."""
        if self._info.get("fingerprint") == "" and self._link is not None:
            # attached while the daemon read the rest of the footers: a state names the
            # data by every shard, so it waits for them (seconds after the daemon's start)
            self._info["fingerprint"] = self._link.wait_fingerprint()
        state = {
            "version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "cursor": self._cursor if self._cursor is not None else self._start,
            "fingerprint": self._info.get("fingerprint", self._expect.get("fingerprint")),
            "tokenizer": self._info.get("tokenizer", {}).get("identity",
                                                             self._expect.get("tokenizer")),
        }
        if self._skip:  # loaded with skip_batches, no batch returned yet: still to skip
            state["skip_batches"] = self._skip
        return state

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]],
                        skip_batches: int = 0) -> None:
        """Continue at `state`: this feed's `state_dict()` (or a `with_state()` state), or a
        job state of every rank (`gather_states`): its entry for this rank is taken, and
        one saved by another number of ranks is an elastic resume (consumer/state.py).

        `skip_batches=N` continues as if N more batches had been taken (after a loss
        spike: the same N on every rank); the daemon drops them before any ring slot."""
        if self._link is not None:
            raise StateMismatchError(
                "load_state_dict() after the first next(); call it on a fresh TokenFeed"
            )
        if self.spec.max_batches is not None:
            raise StateMismatchError(
                "a feed with max_batches (a fixed validation set) starts every round at its "
                "first batch and has no position to resume; do not load a state into it")
        resume = parse_state(self.spec, state, skip_batches)
        self._skip = resume.skip
        self._start = self._cursor = resume.start
        self._expect = resume.expect
        self._reweight = resume.reweight

    @property
    def epoch(self) -> int:
        """Epoch of the next token this feed will return."""
        return int((self._cursor or {}).get("epoch", 0))

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lifetime.forget(self)
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

