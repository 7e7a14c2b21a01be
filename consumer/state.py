"""Every rank's feed state in one object: gather them, check them; parse a state to resume.

    states = gather_states(feed)          # on every rank (a collective): [rank 0, rank 1, ...]
    states = gather_states(state)         # or the state with_state() gave with a batch
    if rank == 0:
        json.dump(states, f)              # one file holds the job's data position
    feed.load_state_dict(states)          # on a fresh feed: each rank takes its own entry

A job state is the list of `TokenFeed.state_dict()` of ranks 0..W-1, in rank order:
small JSON dicts (a few KB each), gathered with `torch.distributed.all_gather_object`.
It is checked whole before any rank uses it: one entry per rank, every entry of the
same stream but for its rank, the same data and tokenizer. `job_state` accepts the
entries in any order. Loaded on another number of ranks, such a list is an elastic
resume: the epoch's remaining work is divided among the new ranks (producer/elastic.py).

A state (one rank's, or a job state) is parsed here too (`parse_state`): what a
fresh feed must send with its first attach to continue at it (`Resume`).

Under NCCL, `all_gather_object` runs on the calling thread's current CUDA device;
`gather_states` makes the group's device current for the call (`init_process_group(
device_id=...)`, else the feed's, else `cuda:LOCAL_RANK`), so ranks that never called
`torch.cuda.set_device` do not all gather on cuda:0. A group larger than the stream's
world size (tensor- or pipeline-parallel peers in the default group) is fine: the
peers of one data-parallel rank share its stream and must hold the same state.

Failure behaviour: a malformed list raises `StateMismatchError` naming the entry and
what differs; `gather_states` on several ranks without an initialized process group
raises `ConfigError`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenfeed.common.config import MAX_SKIP_BATCHES, StreamSpec
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.consumer.topology import collective_device

if TYPE_CHECKING:
    from tokenfeed.consumer.feed import TokenFeed

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Fields of a rank's state that every rank of one job shares.
_SHARED = ("version", "fingerprint", "tokenizer")


def gather_states(source: TokenFeed | dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's state, indexed by rank; call it on every rank at once.

    `source` is the feed (its `state_dict()`: the position after the last batch
    returned) or a state that `feed.with_state()` gave with a batch (the position AT
    that batch: what a loop that prefetches must save). With world_size 1 it needs no
    process group. `group` is passed on to `all_gather_object` (None: the default
    group), which must hold every rank of the stream (and may hold their TP/PP peers).
    """
    state = source if isinstance(source, dict) else source.state_dict()
    spec = state.get("spec") if isinstance(state, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("world_size"), int):
        raise StateMismatchError(f"gather_states: {type(source).__name__} is not a feed state")
    world_size, rank = spec["world_size"], spec.get("rank")
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if world_size != 1:
            raise ConfigError(
                f"gather_states: the feed is rank {rank} of {world_size}, but "
                "torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() first (torchrun sets its variables)"
            )
        return check_states([state])
    group_size = dist.get_world_size(group)
    if group_size < world_size:
        raise ConfigError(
            f"gather_states: the process group has {group_size} ranks but the feed's "
            f"world_size is {world_size}; pass the group of the ranks that share this stream"
        )
    states: list[Any] = [None] * group_size
    feed_device = None if isinstance(source, dict) else source.device
    with _current(_object_device(group, feed_device)):
        dist.all_gather_object(states, state, group=group)
    return check_states(_one_per_rank(states, world_size))


def _object_device(group: Any, feed_device: torch.device | None) -> torch.device | None:
    from torch.distributed import distributed_c10d as c10d

    pg = group if group is not None else c10d._get_default_group()
    device_type = c10d._get_object_coll_device(pg)
    return collective_device(device_type, getattr(pg, "bound_device_id", None), feed_device)


def _current(device: torch.device | None) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


def _one_per_rank(states: list[Any], world_size: int) -> list[Any]:
    """One entry per stream rank of a gathered list: peers of one rank (replicas) must
    agree; with exactly world_size entries they are returned as they are."""
    if len(states) == world_size:
        return sorted(states, key=_rank_of)
    by_rank: dict[int, Any] = {}
    for state in states:
        rank = _rank_of(state)
        if rank in by_rank and by_rank[rank] != state:
            raise StateMismatchError(
                f"gather_states: two processes of rank {rank}'s stream hold different "
                "positions; the tensor- or pipeline-parallel peers of a data-parallel rank "
                "must read the same batches (replicas=, TokenFeed.from_mesh) and save together"
            )
        by_rank[rank] = state
    return [by_rank[r] for r in sorted(by_rank)]


def _rank_of(state: Any) -> int:
    try:
        return int(state["spec"]["rank"])
    except (TypeError, KeyError, ValueError):
        return -1  # sorts first; check_states names it


def check_states(states: Any) -> list[dict[str, Any]]:
    """`states` if it is a valid job state (one entry per rank, in rank order), else
    StateMismatchError naming the entry and what is wrong."""
    if not isinstance(states, list) or not states:
        raise StateMismatchError(
            f"a job state is a non-empty list of every rank's feed state, not "
            f"{type(states).__name__}; build it with gather_states(feed)"
        )
    first = states[0]
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or not isinstance(state.get("spec"), dict):
            raise StateMismatchError(
                f"entry {rank} of the job state is not a feed state (a dict with a 'spec')"
            )
        spec = state["spec"]
        if spec.get("rank") != rank or spec.get("world_size") != len(states):
            raise StateMismatchError(
                f"entry {rank} of the job state is rank {spec.get('rank')!r} of "
                f"{spec.get('world_size')!r}; a job state holds ranks 0..{len(states) - 1} "
                f"of {len(states)}, each once, in rank order"
            )
        others = {k: v for k, v in spec.items() if k != "rank"}
        want = {k: v for k, v in first["spec"].items() if k != "rank"}
        diffs = [f"{k}: {others.get(k)!r} vs {want.get(k)!r}"
                 for k in sorted(set(others) | set(want)) if others.get(k) != want.get(k)]
        diffs += [f"{k}: {state.get(k)!r} vs {first.get(k)!r}"
                  for k in _SHARED if state.get(k) != first.get(k)]
        if diffs:
            raise StateMismatchError(
                f"entry {rank} of the job state is of another stream than entry 0: "
                + "; ".join(diffs)
            )
    return states


def job_state(states: Any) -> list[dict[str, Any]]:
    """Every old rank's state, in any order, checked to form one complete job (each rank
    once, the same stream but for the rank, the same data and tokenizer): in rank order."""
    if not isinstance(states, list):
        return check_states(states)
    return check_states(sorted(states, key=_rank_of))


@dataclass(frozen=True)
class Resume:
    """What a fresh feed sends with its first attach to continue at a saved state."""

    start: dict[str, Any]  # the cursor, or {"elastic_from": [every old rank's cursor]}
    expect: dict[str, Any]  # the data fingerprint and tokenizer identity it was saved with
    reweight: bool  # the feed's mix differs from the state's: the mixture changes there
    skip: int = 0  # batches to drop from `start` (a state saved before a skip was served)


def parse_state(spec: StreamSpec, state: Any, skip_batches: int = 0) -> Resume:
    """A rank's state (`state_dict()`, or a `with_state()` state) or a job state (every
    rank's): checked against this feed's stream `spec`, `skip_batches` more to skip."""
    if not isinstance(skip_batches, int) or isinstance(skip_batches, bool) or not (
            0 <= skip_batches < MAX_SKIP_BATCHES):
        raise ConfigError(f"skip_batches={skip_batches!r} must be an integer in "
                          f"[0, {MAX_SKIP_BATCHES})")
    if isinstance(state, list) and skip_batches and len(state) != spec.world_size:
        raise ConfigError(
            "skip_batches with a job state of another number of ranks: resume elastically "
            "first, save each rank's state_dict() and skip from those")
    if isinstance(state, list):
        states = job_state(state)
        if len(states) != spec.world_size:
            return _parse_elastic(spec, states)
        state = states[spec.rank]
    missing = [k for k in ("version", "spec", "cursor") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise StateMismatchError(f"feed state {str(state)[:80]} has no {', '.join(missing)}; "
                                 "pass the dict feed.state_dict() returned, unchanged")
    if state.get("version") != STATE_VERSION:
        raise StateMismatchError(
            f"feed state version {state.get('version')} is not {STATE_VERSION}; it comes "
            "from another tokenfeed version"
        )
    try:
        saved = StreamSpec.from_dict(state["spec"])
    except (KeyError, ConfigError) as e:
        raise StateMismatchError(f"feed state has no valid stream spec ({e})") from None
    now = spec.to_dict()
    diffs = [f"{k}: saved {v!r}, now {now[k]!r}"
             for k, v in saved.to_dict().items() if v != now[k] and k != "mix"]
    if diffs:
        raise StateMismatchError("feed state is for another stream: " + "; ".join(diffs))
    # Other weights than the state's: the mixture changes to them where it resumes
    # (recorded in its schedule); the same weights keep the schedule, live changes too.
    skip = state.get("skip_batches", 0)
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise StateMismatchError(f"feed state's skip_batches {skip!r} is not a count; pass "
                                 "the dict feed.state_dict() returned, unchanged")
    return Resume(start=state["cursor"],
                  expect={"fingerprint": state.get("fingerprint"),
                          "tokenizer": state.get("tokenizer")},
                  reweight=saved.mix != spec.mix and spec.mix is not None,
                  skip=skip + skip_batches)


def _parse_elastic(spec: StreamSpec, states: list[dict[str, Any]]) -> Resume:
    """A job saved by another number of ranks: the daemon gives this rank its share of
    the epoch's remaining work (producer/elastic.py)."""
    saved = StreamSpec.from_dict(states[0]["spec"]).to_dict()
    now = spec.to_dict()
    diffs = [f"{k}: saved {v!r}, now {now[k]!r}" for k, v in saved.items()
             if k not in ("rank", "world_size") and v != now[k]]
    if diffs:
        raise StateMismatchError("the job state is of another stream: " + "; ".join(diffs))
    return Resume(start={"elastic_from": [s["cursor"] for s in states]},
                  expect={"fingerprint": states[0].get("fingerprint"),
                          "tokenizer": states[0].get("tokenizer")},
                  reweight=False)


def log_source_change(saved: Any, start: Any) -> None:
    """Say which sources a resumed mixture gained or lost (allow_source_changes)."""
    def names(cursor: Any) -> set[str]:
        mix = cursor.get("mix") if isinstance(cursor, dict) else None
        sources = mix.get("sources") if isinstance(mix, dict) else None
        return set(sources) if isinstance(sources, dict) else set()

    before, now = names(saved), names(start)
    if before and now and before != now:
        log.warning("resumed the mixture with sources changed: added %s, removed %s",
                    ", ".join(sorted(now - before)) or "none",
                    ", ".join(sorted(before - now)) or "none")
