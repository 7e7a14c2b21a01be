"""Every rank's feed state in one object: gather them, check them, pick one rank's entry.

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

Failure behaviour: a malformed list raises `StateMismatchError` naming the entry and
what differs; `gather_states` on several ranks without an initialized process group
raises `ConfigError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokenfeed.common.errors import ConfigError, StateMismatchError

if TYPE_CHECKING:
    from tokenfeed.consumer.feed import TokenFeed

# Fields of a rank's state that every rank of one job shares.
_SHARED = ("version", "fingerprint", "tokenizer")


def gather_states(source: TokenFeed | dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's state, indexed by rank; call it on every rank at once.

    `source` is the feed (its `state_dict()`: the position after the last batch
    returned) or a state that `feed.with_state()` gave with a batch (the position AT
    that batch: what a loop that prefetches must save). With world_size 1 it needs no
    process group. `group` is passed on to `all_gather_object` (None: the default
    group, which must hold exactly the stream's world_size ranks).
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
    if group_size != world_size:
        raise ConfigError(
            f"gather_states: the process group has {group_size} ranks but the feed's "
            f"world_size is {world_size}; pass the group of the ranks that share this stream"
        )
    states: list[Any] = [None] * group_size
    dist.all_gather_object(states, state, group=group)
    return check_states(sorted(states, key=_rank_of))


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


def select_state(states: Any, rank: int, world_size: int) -> dict[str, Any]:
    """Rank `rank`'s entry of a job state saved by `world_size` ranks."""
    states = check_states(states)
    if len(states) != world_size:
        raise StateMismatchError(
            f"the job state was saved by {len(states)} ranks and this job has {world_size}; "
            f"resuming on another world size is not supported yet: resume with "
            f"{len(states)} ranks (the state of each rank is in its entry)"
        )
    return states[rank]
