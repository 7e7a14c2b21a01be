"""Provenance: which documents a stream's next batches are made of, from a saved state.

`explain` answers offline, without a daemon: from a feed state (what `state_dict()`
returned, or one rank's entry of a gathered job state) it builds the stream's start as
an attach does (admission.py: fingerprints, position, elastic layouts, mixtures), and
runs its supply and packer in this process over units of token addresses (replay.py),
so the windows they cut name, row by row, the segments of documents they hold
(`Segment`: source, file, row group, row and token range).

What the run dropped is dropped here by the daemon's own code, so an explained state
saved under it is exact: an exclusion list (`exclusion`, the run's file resolved by
exclude.resolve) is admitted at the state as an attach admits it (exclude.admit: the
state's list must be that one) and applied by the readers (keep_rule, exclude_unit);
the filters the state records (or given ones, which must be the state's) are the
readers' and the tasks', read by worker.read_filtered; a row group that fails to read
fails the reader or, with `on_error="skip"` as the run served, delivers nothing
(reader.py's rule, after the same MAX_ATTEMPTS reads). `Explanation.applied` says
which list, filters and skipped row groups were in force.

Failure behaviour: a state of other data or another tokenizer, a rank outside a job
state, a malformed state, a state saved under an exclusion list explained without it
or with another, a filter other than the state's: StateMismatchError naming the fix; a
row group that cannot be read under `on_error="fail"`: DataError naming the file, the
row group and the fix; a position the data cannot hold raises the packer's
StateMismatchError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenfeed.common.config import MAX_SKIP_BATCHES, StreamSpec
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer import exclude
from tokenfeed.producer.admission import Admission
from tokenfeed.producer.config import ON_ERROR
from tokenfeed.producer.dataset import Dataset, combined_fingerprint
from tokenfeed.producer.exclude import Exclusion
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.position import ExcludeMark, Position
from tokenfeed.producer.replay import Replay, Row, Segment
from tokenfeed.producer.tokenizer import Tokenizer

__all__ = ["Applied", "Explanation", "Row", "Segment", "explain", "select_state"]

STATE_VERSION = 1  # consumer/state.py's: the feed state format explain reads and writes


@dataclass(frozen=True)
class Applied:
    """What the explained batches were cut without, as the run cut them: the exclusion
    list in force at the state (its mark: sha256, and where it began) and how many
    documents it names, the filters by source, the run's --on-error, and the row groups
    that rule skipped, as (source, file, row_group)."""

    exclude: ExcludeMark | None = None
    excluded_documents: int = 0
    filters: Mapping[str, str] | None = None
    on_error: str = "fail"
    skipped_row_groups: tuple[tuple[str, str, int], ...] = ()

    def __bool__(self) -> bool:
        """Something could have been dropped (what `explain` shows a header for)."""
        return bool(self.exclude or self.filters or self.on_error != "fail")

    def to_json(self) -> dict[str, Any]:
        return {
            "exclude": ({**self.exclude.to_json(), "documents": self.excluded_documents}
                        if self.exclude else None),
            "filters": dict(self.filters) if self.filters else None,
            "on_error": self.on_error,
            "skipped_row_groups": [{"source": s, "file": f, "row_group": g}
                                   for s, f, g in self.skipped_row_groups]}


@dataclass
class Explanation:
    """Batches as rows of segments, and the feed state right after the last of them."""

    batches: list[list[Row]]
    state: dict[str, Any]
    documents: dict[tuple[str, str, int, int], np.ndarray]  # [BOS] + tokens, of each
    applied: Applied = dataclasses.field(default_factory=Applied)

    def tokens(self, segment: Segment) -> np.ndarray:
        return self.documents[segment.document][segment.start:segment.end]


def select_state(state: Any, rank: int | None, world_size: int | None = None
                 ) -> dict[str, Any]:
    """One rank's feed state: `state` itself, or entry `rank` of a gathered job state; with
    a `world_size` other than the job's, rank `rank` of a job of `world_size` ranks resuming
    that job state elastically (what `load_state_dict(job state)` sends on such a job)."""
    if isinstance(state, list):
        n = len(state)
        if world_size is not None and world_size != n:
            return _elastic_state(state, rank, world_size)
        if rank is None and n != 1:
            raise StateMismatchError(
                f"the state holds every rank's state of a job of {n} ranks; pass --rank R "
                f"(0..{n - 1}) to say whose batches to explain")
        rank = 0 if rank is None else rank
        if not 0 <= rank < n:
            raise StateMismatchError(
                f"--rank {rank} is out of range: the job state holds ranks 0..{n - 1}; pass "
                f"--rank between 0 and {n - 1}")
        found = [s for s in state if _spec(s).get("rank") == rank]
        if len(found) != 1:
            raise StateMismatchError(
                f"the job state holds {len(found)} entries of rank {rank}; pass the file "
                "gather_states() wrote, unchanged")
        return found[0]
    if not isinstance(state, dict):
        raise StateMismatchError(
            f"the state is a {type(state).__name__}, not a feed state; pass the JSON of "
            "feed.state_dict() or of gather_states(feed)")
    saved = _spec(state).get("rank", 0)
    if rank is not None and rank != saved:
        raise StateMismatchError(
            f"--rank {rank}: the state is rank {saved}'s alone; drop --rank, or pass the "
            "gathered state of every rank (gather_states)")
    if world_size is not None and world_size != _spec(state).get("world_size", 1):
        raise StateMismatchError(
            f"--world-size {world_size}: an elastic resume needs every rank's state; pass "
            "the gathered state (gather_states)")
    return state


def _elastic_state(job: list[Any], rank: int | None, world_size: int) -> dict[str, Any]:
    """The state rank `rank` of `world_size` attaches with to resume `job` elastically."""
    if rank is None or not 0 <= rank < world_size:
        raise StateMismatchError(
            f"--rank {rank} is out of range for --world-size {world_size}; pass --rank "
            f"between 0 and {world_size - 1}")
    entries = sorted(job, key=lambda s: _spec(s).get("rank", -1))
    if [_spec(s).get("rank") for s in entries] != list(range(len(job))) or not all(
            isinstance(s, dict) and isinstance(s.get("cursor"), dict) for s in entries):
        raise StateMismatchError(
            f"the job state does not hold ranks 0..{len(job) - 1} once each with a cursor; "
            "pass the file gather_states() wrote, unchanged")
    first = entries[0]
    return {**first, "spec": {**first["spec"], "rank": rank, "world_size": world_size},
            "cursor": {"elastic_from": [s["cursor"] for s in entries]}}


def _spec(state: Any) -> dict[str, Any]:
    spec = state.get("spec") if isinstance(state, dict) else None
    return spec if isinstance(spec, dict) else {}


def explain(datasets: Mapping[str, Dataset], tokenizer: Tokenizer, state: dict[str, Any],
            *, batches: int, skip: int = 0, weights: Mapping[str, float] | None = None,
            backend: str = "auto", exclusion: Exclusion | None = None,
            filters: Mapping[str, Filter] | None = None, on_error: str = "fail"
            ) -> Explanation:
    """The `batches` batches a feed resumed from `state` (one rank's) returns first,
    after `skip` more (with the state's own pending skip), as rows of segments; and the
    state after them. `datasets`: the sources by name (one: "data"); `weights`: a
    mixture's default, for a state saved before its first batch; `backend`: the
    tokenizer backend (backends.py; a faster one only once it equals tiktoken on the
    first documents read, else tiktoken); `exclusion`: the run's exclusion list
    (exclude.resolve; required when the state records one, and the same); `filters`:
    filters by source, each the one the state records (unset ones: the state's);
    `on_error`: the run's --on-error, for row groups that fail to read."""
    if not isinstance(batches, int) or not isinstance(skip, int) or batches < 0 or not (
            0 <= skip < MAX_SKIP_BATCHES):
        raise ConfigError(f"--batches {batches} and --skip {skip} must be counts (skip below "
                          f"{MAX_SKIP_BATCHES})")
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error {on_error!r} must be one of {', '.join(ON_ERROR)}: "
                          "the one the run served with")
    spec, position, admission = _start(datasets, tokenizer, state, weights,
                                       exclusion or exclude.NONE, filters)
    pending = state.get("skip_batches", 0)
    if not isinstance(pending, int) or isinstance(pending, bool) or pending < 0:
        raise StateMismatchError(f"the state's skip_batches {pending!r} is not a count; pass "
                                 "the state unchanged")
    replay = Replay(spec, admission, position, tokenizer, backend,
                    exclusion=exclusion or exclude.NONE, on_error=on_error)
    try:
        for _ in range(pending + skip):
            replay.next_window()
        replay.keep = True  # tokens of documents read from here on: the batches need most
        out = [replay.rows(replay.next_window()) for _ in range(batches)]
        replay.fetch({s.document for rows in out for row in rows for s in row})
    finally:
        replay.close()
    after = {"version": STATE_VERSION, "spec": spec.to_dict(), "cursor": replay.cursor(),
             "fingerprint": state.get("fingerprint") or combined_fingerprint(dict(datasets)),
             "tokenizer": tokenizer.identity}
    applied = Applied(position.exclude, len(exclusion or ()), position.filters, on_error,
                      replay.skipped_row_groups())
    return Explanation(out, after, replay.documents, applied)


def _start(datasets: Mapping[str, Dataset], tokenizer: Tokenizer, state: dict[str, Any],
           weights: Mapping[str, float] | None, exclusion: Exclusion,
           filters: Mapping[str, Filter] | None) -> tuple[StreamSpec, Position, Admission]:
    """The stream and position a feed resumed from `state` attaches with, checked as the
    daemon checks them (admission.py, exclude.admit), under the state's filters and
    `exclusion`; and the admission that gives its sources."""
    if state.get("version") != STATE_VERSION or "cursor" not in state:
        raise StateMismatchError(
            f"{str(state)[:80]} is not a feed state of version {STATE_VERSION} (with 'spec' "
            "and 'cursor'); pass the JSON of feed.state_dict() unchanged")
    try:
        spec = StreamSpec.from_dict(state["spec"])
    except (KeyError, ConfigError) as e:
        raise StateMismatchError(f"the state has no valid stream spec ({e})") from None
    saved = state.get("tokenizer")
    if saved and saved != tokenizer.identity:
        raise StateMismatchError(
            f"the state was saved with tokenizer identity {saved}, and --tokenizer "
            f"{tokenizer.name} is {tokenizer.identity}; pass the --tokenizer (and --bos) the "
            "state was saved with")
    cursor = state["cursor"]
    _check_exclusion(cursor, exclusion)
    admission = Admission(dict(datasets), tokenizer, {},
                          filters=_state_filters(cursor, filters or {}))
    try:
        admission.check_expectations({"fingerprint": state.get("fingerprint")})
        names = sorted(datasets)
        default = dict(weights) if weights else {n: 1 / len(names) for n in names}
        position = admission.start(spec, {"start": cursor}, default)
        position = exclude.admit(position, cursor, exclusion)
    except StateMismatchError as e:
        raise StateMismatchError(f"{e} (for explain: pass the --data or --mix the state was "
                                 "saved on)") from None
    return spec, position, admission


def _cursors(cursor: Any) -> list[dict[str, Any]]:
    """The saved cursors a state resumes from: its own, or every old rank's (elastic)."""
    if not isinstance(cursor, dict):
        return []
    old = cursor.get("elastic_from")
    return [c for c in old if isinstance(c, dict)] if isinstance(old, list) else [cursor]


def _check_exclusion(cursor: Any, exclusion: Exclusion) -> None:
    """A state saved under an exclusion list is explained under that list alone."""
    now = exclusion.sha256 if len(exclusion) else None
    for c in _cursors(cursor):
        saved = c.get("exclude")
        sha = saved.get("sha256") if isinstance(saved, dict) else None
        if saved is None or sha == now:
            continue
        given = ("explain was given no --exclude" if now is None else
                 f"--exclude names the list with sha256 {now} ({len(exclusion)} documents)")
        raise StateMismatchError(
            f"the state was saved under the exclusion list with sha256 {sha}, and {given}; "
            "pass --exclude with the exclusion file kept next to that checkpoint, unchanged "
            "(the run's TokenFeed(exclude=) and serve --exclude files: --exclude once each)")


def _state_filters(cursor: Any, given: Mapping[str, Filter]) -> dict[str, Filter]:
    """The filters the state was filtered by, per source: those it records, parsed again
    (a filter is recorded in full, normalized); a given one must be the recorded one. A
    state saved before its first batch records none: the given ones, as at an attach."""
    if not _cursors(cursor):
        return dict(given)
    recorded: dict[str, str] = {}
    for c in _cursors(cursor):
        filters = c.get("filters")
        if isinstance(filters, dict):  # Position.parse checks the form
            recorded.update({n: t for n, t in filters.items() if isinstance(t, str)})
    for name, kept in sorted(given.items()):
        saved = recorded.get(name)
        if saved != kept.text:
            shown = "no filter" if saved is None else f"the filter {saved!r}"
            raise StateMismatchError(
                f"source {name}'s filter is given as {kept.text!r}, and the state was saved "
                f"under {shown}; pass the filter the run used (--filter for --data, filter = "
                "in --mix), or leave it out: explain applies the filters the state records")
    return {n: given[n] if n in given else Filter.parse(t) for n, t in recorded.items()}
