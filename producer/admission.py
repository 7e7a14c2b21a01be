"""Admission: what an attach may start from, decided before anything is created.

An attach names a stream (`spec`) and optionally where to resume (`start`: a saved
cursor, or `elastic_from`: every cursor of a job saved at another world size) and
what the state was saved on (`expect`: the data's fingerprint, the tokenizer). This
module checks all of it against the data this daemon serves and returns a typed
`Position` and the stream's `Source`s; the stream is built from those alone.

- A saved cursor is parsed by position/ (nothing is constructed to check it).
- A one-source daemon's stream starts plain; a mixture daemon's (or a consumer that
  names `mix`) starts with a mixture state: the saved one, or new weights.
- `elastic_from`: elastic.py divides the old ranks' work left among the new ranks.
- Fingerprints: a saved state refuses other data, naming the shards that changed.
- Filters (filters.py): checked against a source's columns at its first attach (a
  missing column or a type mismatch names the column and its type); a saved state
  recorded under other filters is refused unless the daemon allows filter changes.

Failure behaviour: every mismatch is a StateMismatchError or ConfigError whose
message names the problem and the fix; a malformed message is a ProtocolError.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import ConfigError, ProtocolError, StateMismatchError
from tokenfeed.producer import elastic
from tokenfeed.producer.cache import TokenCache
from tokenfeed.producer.changes import SourceChange, rebase, source_change
from tokenfeed.producer.dataset import Dataset, RowGroupRef, changed_shards, split_fingerprint
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.position import MixState, Position
from tokenfeed.producer.reader import Source, epoch_order
from tokenfeed.producer.recipe import Curve, Limits
from tokenfeed.producer.storage import open_parquet
from tokenfeed.producer.supply import REPEAT_SEED
from tokenfeed.producer.tokenizer import Tokenizer
from tokenfeed.producer.valstore import ValStore

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, datasets: dict[str, Dataset], tokenizer: Tokenizer,
                 caches: Mapping[str, TokenCache],
                 val_stores: Mapping[str, ValStore] | None = None, curve: Curve | None = None,
                 limits: Mapping[str, Limits] | None = None,
                 filters: Mapping[str, Filter] | None = None,
                 allow_filter_changes: bool = False) -> None:
        self.datasets = datasets
        # the mix file's declared recipe: a new train stream without weights of its own
        # follows `curve`; every mixture stream keeps `limits` (recipe.py)
        self.curve = curve
        self.follow_schedule = True  # False after `tokenfeed mix --set` (ops.py)
        self.limits = dict(limits or {})
        self.served = tuple(datasets)
        self.tokenizer = tokenizer
        self.caches = caches  # cache_key(text column, filter) -> its token cache
        self.val_stores = val_stores or {}  # text column -> val row groups, without a cache
        self.filters = dict(filters or {})  # source name -> its filter (filters.py)
        self.allow_filter_changes = allow_filter_changes
        self._filters_checked: set[str] = set()  # sources whose columns fit their filter

    # -- what the state was saved on ----------------------------------------

    def check_expectations(self, expect: Any) -> None:
        """A saved feed state must resume on the same data and tokenizer."""
        if not isinstance(expect, dict):
            raise ProtocolError("attach: 'expect' must be a map")
        saved = expect.get("fingerprint")
        if saved is not None and not isinstance(saved, str):
            raise ProtocolError("attach: expect.fingerprint must be a string")
        for name, fingerprint in split_fingerprint(saved or "").items():
            self._check_fingerprint(name, fingerprint)
        saved, now = expect.get("tokenizer"), self.tokenizer.identity
        if saved and saved != now:
            raise StateMismatchError(
                f"the saved state's tokenizer identity {saved} differs from this daemon's {now} "
                f"({self.tokenizer.name}); serve with the tokenizer the state was saved with"
            )

    def _check_fingerprint(self, name: str, saved: str) -> None:
        dataset = self.datasets.get(name)
        if dataset is None:
            return  # a source this daemon lacks: the mixture state names it (position/)
        now = dataset.fingerprint
        if saved.split(".")[0] != now.split(".")[0]:
            among = changed_shards(saved, dataset)
            which = (f"changed, added or removed among {', '.join(among[:20])}"
                     if among else "a shard was removed" if among == [] else
                     "file names, sizes or row groups changed")
            raise StateMismatchError(
                f"the saved state's data differs from this daemon's source {name} "
                f"({dataset.root}): "
                f"{which} (fingerprint {saved.split('.')[0]} saved, {now.split('.')[0]} now; "
                "objects also by modification time); resume on the same data, or start "
                "without load_state_dict()"
            )

    # -- where the stream starts --------------------------------------------

    def start(self, spec: StreamSpec, msg: protocol.Message,
              weights: Mapping[str, float]) -> Position:
        """The checked start of an attach; `weights`: the daemon's current mixture
        weights, for a new mixture stream whose consumer names none. It carries the
        filters in force, checked against those a resumed state recorded."""
        position = self._start(spec, msg, weights)
        names = position.mix.names if position.mix is not None else self.served
        now = {n: self.filters[n].text for n in names if n in self.filters} or None
        if msg.get("start") is not None and not (
                isinstance(msg["start"], dict) and "elastic_from" in msg["start"]):
            self.check_filters_unchanged(position.filters, now)
        return dataclasses.replace(position, filters=now)

    def check_filters_unchanged(self, saved: Mapping[str, str] | None,
                                now: Mapping[str, str] | None) -> None:
        """A state recorded under `saved` filters continues under `now`'s only if they
        are the same, or the daemon was started with --allow-filter-changes (logged)."""
        saved, now = dict(saved or {}), dict(now or {})
        changes = [f"source {n}: {_shown(saved.get(n))} -> {_shown(now.get(n))}"
                   for n in sorted(set(saved) | set(now)) if saved.get(n) != now.get(n)]
        if not changes:
            return
        if self.allow_filter_changes:
            log.warning("resuming a state saved under other filters (--allow-filter-changes): "
                        "%s", "; ".join(changes))
            return
        raise StateMismatchError(
            f"the saved state was filtered differently: {'; '.join(changes)}; serve the "
            "filters it was saved with, or start the daemon with --allow-filter-changes to "
            "continue its position under the new ones")

    def _start(self, spec: StreamSpec, msg: protocol.Message,
               weights: Mapping[str, float]) -> Position:
        start = msg.get("start")
        if start is not None and not isinstance(start, dict):
            raise ProtocolError(f"attach: start {start!r} is not a map")
        if start is None:
            position = Position.start(spec)
        elif "elastic_from" in start:
            position = self._elastic(spec, start["elastic_from"])
        else:
            change = source_change(start, spec, self.served,
                                   msg.get("allow_source_changes") is True)
            position = Position.parse(start, spec, self.served + change.removed)
            if change:
                return self._changed(position, spec, weights, change)
        if position.mix is None:
            if spec.mix is None and len(self.served) == 1 and not self.limits and (
                    self.curve is None):
                return position  # one source: no mixture
            if start is not None:
                raise StateMismatchError(
                    "the saved state is of a one-source stream, and this daemon serves a "
                    f"mixture of {', '.join(self.served)}; resume on a daemon serving --data, "
                    "or start without load_state_dict()")
            chosen = dict(spec.mix) if spec.mix is not None else dict(weights)
            unknown = set(chosen) - set(self.served)
            if unknown:
                raise ConfigError(f"mix names {', '.join(sorted(unknown))}; this daemon serves "
                                  f"{', '.join(self.served)}")
            train = spec.split == "train"  # a val stream reads its split as it is
            curve = self.curve if spec.mix is None and train and self.follow_schedule else None
            return dataclasses.replace(position, mix=MixState.initial(
                chosen, curve, self.limits if train else None))
        if msg.get("reweight") is True and spec.mix is not None:
            return dataclasses.replace(position, mix=position.mix.with_weights(dict(spec.mix)))
        self._check_recipe(position.mix, spec)
        return position

    def _changed(self, position: Position, spec: StreamSpec, weights: Mapping[str, float],
                 change: SourceChange) -> Position:
        """A resumed mixture whose sources changed (allowed): changes.py."""
        mix = position.mix
        assert mix is not None  # a change is found in the cursor's mixture
        chosen = dict(spec.mix) if spec.mix is not None else dict(weights)
        unknown = set(chosen) - set(self.served)
        if unknown:
            raise ConfigError(f"mix names {', '.join(sorted(unknown))}; this daemon serves "
                              f"{', '.join(self.served)}")
        log.warning("rank %d/%d resumes its mixture with sources changed: %s (weights now %s)",
                    spec.rank, spec.world_size, change.describe(), chosen)
        if not change.removed:  # added only: a weight change where it has not mixed yet
            return dataclasses.replace(position, mix=mix.with_weights(chosen))
        return rebase(position, spec, chosen, lambda name: self._refs(name, spec))
    def _check_recipe(self, mix: MixState, spec: StreamSpec) -> None:
        """A saved mixture resumes under the recipe it was saved with: another declared
        schedule or other limits are refused (docs/data-recipes.md)."""
        declared = self.curve if spec.mix is None and spec.split == "train" else None
        # weights set live since: the schedule no longer decides (an elastic resume's
        # new state then keeps only the weights, and its layouts: elastic.plan_mixture)
        live = len(mix.schedule) > 1 or (mix.curve is None and mix.layouts is not None)
        if mix.curve != declared and not (live and mix.curve is None):
            saved = mix.curve.describe() if mix.curve else "none"
            now = declared.describe() if declared else "none"
            raise StateMismatchError(
                f"the saved state follows the weight schedule [{saved}], this daemon's mix "
                f"file declares [{now}]; serve the mix file the state was saved with, or "
                "resume with TokenFeed(mix={...}) to fix the weights from here on")
        limits = {n: v for n, v in self.limits.items()
                  if v and n in mix.sources and spec.split == "train"}
        if dict(mix.limits or {}) != limits:
            def show(d: Mapping[str, Limits]) -> str:
                return "; ".join(f"{n}: {v.describe()}" for n, v in sorted(d.items())) or "none"
            raise StateMismatchError(
                f"the saved state's source limits ({show(mix.limits or {})}) differ from this "
                f"daemon's mix file ({show(limits)}); serve the mix file the state was saved "
                "with (repeat, max_tokens and max_documents count from the stream's start)")

    def sources(self, start: Position, split: str) -> list[Source]:
        """The sources a stream from `start` reads: its mixture's, in name order, or the
        daemon's one source. An empty split is a DataError naming it."""
        names = list(start.mix.names) if start.mix is not None else list(self.served)
        out = []
        for name in names:
            dataset = self.datasets[name]
            plan = dataset.split(split)
            kept = self.filters.get(name)
            if kept is not None:
                self._check_filter(name, plan.row_groups[0] if len(plan) else None)
            column = dataset.text_column
            cache = self.caches.get(cache_key(column, kept)) or (
                self.val_stores.get(column) if split == "val" and kept is None else None)
            out.append(Source(name, plan, column, cache, filter=kept))
        return out

    def _check_filter(self, name: str, ref: RowGroupRef | None) -> None:
        """The source's filter fits its columns (one footer read, at its first attach)."""
        if name in self._filters_checked or ref is None:
            return
        schema = open_parquet(ref.path, ref.shard_stamp).schema_arrow
        try:
            self.filters[name].check(schema, f"source {name} ({ref.path})")
        except ConfigError as e:  # as a ConfigError: the class an error reply carries
            raise ConfigError(str(e)) from None
        self._filters_checked.add(name)

    def _elastic(self, spec: StreamSpec, cursors: Any) -> Position:
        """The start of rank spec.rank of spec.world_size continuing a job that every
        cursor in `cursors` (rank order) is one rank of (elastic.py)."""
        if not isinstance(cursors, list) or not cursors or not all(
                isinstance(c, dict) for c in cursors):
            raise ProtocolError("attach: start.elastic_from must be a list of cursors")
        mixture = any("mix" in c for c in cursors)
        change = source_change(cursors[0], spec, self.served, allowed=True)
        if change:
            raise StateMismatchError(
                f"the saved job's mixture and this daemon's sources differ ({change.describe()})"
                "; an elastic resume cannot change sources too: resume at the new number of "
                "ranks on the same sources, save, then resume with allow_source_changes=True")
        saved: list[Position] = []
        for rank, cursor in enumerate(cursors):
            try:
                old = dataclasses.replace(spec, rank=rank, world_size=len(cursors))
                position = Position.parse(cursor, old, self.served)
                names = position.mix.names if position.mix is not None else self.served
                self.check_filters_unchanged(position.filters, {
                    n: self.filters[n].text for n in names if n in self.filters})
                if mixture and (position.mix is None or position.mix.exact is None):
                    raise StateMismatchError(
                        "its mixture state lacks 'exact' [unit, doc, token] for every "
                        "source; pass the feed state unchanged")
            except (StateMismatchError, ConfigError) as e:
                raise StateMismatchError(f"rank {rank} of the saved job: {e}") from None
            saved.append(position)
        begin = Position.start(spec).packed
        first_mix = saved[0].mix
        if mixture and first_mix is not None:
            for rank, position in enumerate(saved):  # the recipe it was saved under
                assert position.mix is not None  # checked above
                try:  # a consumer naming its weights follows no schedule: limits only
                    self._check_recipe(position.mix if spec.mix is None else
                                       dataclasses.replace(position.mix, curve=None), spec)
                except StateMismatchError as e:
                    raise StateMismatchError(f"rank {rank} of the saved job: {e}") from None
            limits = first_mix.limits or {}
            mix = elastic.plan_mixture(saved, spec.packing, {n: self._refs(n, dataclasses.replace(
                spec, shuffle_seed=REPEAT_SEED) if spec.shuffle_seed is None and n in limits
                and limits[n].repeat is not None else spec) for n in first_mix.names},
                spec.rank, spec.world_size)
            log.info("elastic resume of a mixture: rank %d of %d continues %d ranks",
                     spec.rank, spec.world_size, len(cursors))
            return Position(begin, mix=mix)
        if len(self.served) > 1:
            raise StateMismatchError("the saved job is of one source and this daemon serves a "
                                     f"mixture of {', '.join(self.served)}")
        n, ref_of = self._refs(self.served[0], spec)
        layout = elastic.plan(saved, n, ref_of, spec.rank, spec.world_size)
        log.info("elastic resume: rank %d of %d continues %d ranks with %d items, then its "
                 "stride from unit %d", spec.rank, spec.world_size, len(cursors), layout.items,
                 layout.stride_from)
        return Position(begin, elastic=layout)

    def _refs(self, name: str, spec: StreamSpec) -> tuple[int, Callable[[int], RowGroupRef]]:
        """A source's row groups an epoch, and global position g's row group."""
        split = self.datasets[name].split(spec.split)
        n = len(split)

        def ref_of(g: int) -> RowGroupRef:
            epoch, ordinal = divmod(g, n)
            return split.row_groups[int(epoch_order(n, spec.shuffle_seed, epoch)[ordinal])]

        return n, ref_of


def cache_key(column: str, kept: Filter | None) -> str:
    """The token cache of a text column under a filter: a filtered source's entries are
    keyed by its filter too, so no unit is ever served filtered another way (and an
    unfiltered source keeps the keys it always had)."""
    return column if kept is None else f"{column}\0filter {kept.text}"


def _shown(text: str | None) -> str:
    return "no filter" if text is None else repr(text)
