"""`TokenFeedStateful`: a feed's position for `torch.distributed.checkpoint` (DCP).

    dcp.save({"dataloader": TokenFeedStateful(feed), ...}, checkpoint_id=DIR)   # every rank
    dcp.load({"dataloader": TokenFeedStateful(feed), ...}, checkpoint_id=DIR)   # fresh feeds

DCP calls `state_dict()` on every rank at a save (and, for the layout, at a load). It
returns the job state, every rank's feed state gathered with `gather_states` (a
collective over `group`, the default group if None), as one JSON string under one key
(`KEY`): every rank stores the same value, so the checkpoint holds it once, and a
load at another data-parallel size finds it under the same key and becomes
tokenfeed's elastic resume (each new rank takes its share of the epoch's remaining
work; every document once). A per-rank key, as `dp_rank_{i}`, would make a load at
another size miss keys. `load_state_dict()` hands the job state to the fresh feed
(before its first batch).

Failure behaviour: a missing key or a value that is not a job state raises
`StateMismatchError` naming it; whatever `gather_states` and `TokenFeed.load_state_dict`
refuse (another stream, data or tokenizer) they refuse here.
"""

from __future__ import annotations

import json
from typing import Any

from tokenfeed.common.errors import StateMismatchError
from tokenfeed.consumer.feed import TokenFeed
from tokenfeed.consumer.state import gather_states

KEY = "tokenfeed_job_state"


class TokenFeedStateful:
    """DCP `Stateful` for a `TokenFeed` (or anything with a `.feed`, as `TokenFeedDataset`)."""

    def __init__(self, feed: Any, group: Any = None) -> None:
        self._source = feed
        self.group = group

    @property
    def feed(self) -> TokenFeed:
        source = self._source
        return source if isinstance(source, TokenFeed) else source.feed

    def state_dict(self) -> dict[str, Any]:
        return {KEY: json.dumps(gather_states(self.feed, self.group), separators=(",", ":"))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._source.load_state_dict(job_state_of(state_dict))


def job_state_of(state_dict: Any) -> list[dict[str, Any]]:
    """The job state a `TokenFeedStateful.state_dict()` holds, parsed."""
    value = state_dict.get(KEY) if isinstance(state_dict, dict) else None
    if not isinstance(value, (str, bytes)):
        raise StateMismatchError(
            f"the checkpoint's data-loader entry has no {KEY!r} string (keys: "
            f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)}); "
            "it was not saved from a TokenFeedStateful"
        )
    try:
        states = json.loads(value)
    except ValueError as e:
        raise StateMismatchError(f"the checkpoint's {KEY!r} is not JSON ({e})") from None
    if not isinstance(states, list):
        raise StateMismatchError(f"the checkpoint's {KEY!r} is not a list of rank states")
    return states
