"""Documents excluded from a stream: the list checked against the data, and the rows dropped.

An `Exclusion` is a set of documents `(source, file, row_group, row)` resolved against
the sources this daemon serves (common/exclude.py reads the files): `file` is the
shard's file name, as the dataset scan lists it. It is indexed once by
`(source, shard path, row_group)`, so a reader finds a unit's excluded rows with one
lookup, and it is named by `sha256`: a hash of its sorted entries, what a position
records (`ExcludeMark`, position/), so that a state saved under one list never
resumes under another.

Dropping: a reader's unit keeps all its rows, tokenized (the token cache stores them
whole, so one cached unit serves every list); `drop_rows` then removes an excluded
row's tokens and gives it 0 tokens, exactly as a null text value is read (worker.py),
so packers, positions and elastic layouts need nothing new. Where a list began at a
resumed position (`ExcludeMark.unit`, `keep`), the rows before that position in its
unit stay as they were read: `keep_rows` counts them.

Failure behaviour: an entry naming a source, shard, row group or row that this daemon
does not serve is a ConfigError naming the file, the line and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.common.exclude import MAX_NAME_CHARS, Entry, from_wire, wire_digest
from tokenfeed.producer.dataset import Dataset
from tokenfeed.producer.position import WHOLE, BestFitPosition, ExcludeMark, MixState, Position

Key = tuple[str, str, int, int]  # (source, file name, row_group, row)
SourceRows = Mapping[tuple[str, int], np.ndarray]  # (shard path, row_group) -> sorted rows


@dataclass(frozen=True)
class Exclusion:
    keys: frozenset[Key]
    paths: Mapping[tuple[str, str], str] = field(default_factory=dict, compare=False)

    @cached_property
    def sha256(self) -> str:
        """The list's identity: sha256 of its sorted entries, one `source\\tfile\\trow_group
        \\trow\\n` line each."""
        digest = hashlib.sha256()
        for source, file, row_group, row in sorted(self.keys):
            digest.update(f"{source}\t{file}\t{row_group}\t{row}\n".encode())
        return digest.hexdigest()

    @cached_property
    def _index(self) -> dict[str, dict[tuple[str, int], np.ndarray]]:
        groups: dict[str, dict[tuple[str, int], list[int]]] = {}
        for source, file, row_group, row in self.keys:
            path = self.paths[(source, file)]
            groups.setdefault(source, {}).setdefault((path, row_group), []).append(row)
        return {source: {k: np.array(sorted(rows), dtype=np.int64) for k, rows in g.items()}
                for source, g in groups.items()}

    def rows(self, source: str) -> SourceRows:
        """The excluded rows of each of `source`'s row groups that has any."""
        return self._index.get(source, {})

    def __or__(self, other: Exclusion) -> Exclusion:
        return Exclusion(self.keys | other.keys, {**self.paths, **other.paths})

    def __len__(self) -> int:
        return len(self.keys)


NONE = Exclusion(frozenset())


def resolve(entries: Iterable[Entry], datasets: Mapping[str, Dataset], where: str
            ) -> Exclusion:
    """`entries` checked against the sources this daemon serves."""
    shards = {name: _shards(d) for name, d in datasets.items()}
    keys: set[Key] = set()
    paths: dict[tuple[str, str], str] = {}
    for e in entries:
        at = f"exclude file {where} line {e.line}"
        source = _source(e, shards, datasets, at)
        name = _file_name(e.file, datasets[source])
        found = shards[source].get(name) if name is not None else None
        if name is None or found is None:
            listed = sorted(shards[source])
            some = ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "")
            raise ConfigError(
                f"{at}: {e.file!r} is not a shard of source {source!r} "
                f"({datasets[source].root}, {len(listed)} shards: {some}); name a shard this "
                "daemon serves, by its file name as `tokenfeed explain` prints it, or remove "
                "the line")
        path, row_counts = found
        if e.row_group >= len(row_counts):
            raise ConfigError(f"{at}: shard {name} has {len(row_counts)} row groups, so "
                              f"row_group {e.row_group} does not exist; fix or remove the line")
        if e.row >= row_counts[e.row_group]:
            raise ConfigError(f"{at}: row group {e.row_group} of shard {name} has "
                              f"{row_counts[e.row_group]} rows, so row {e.row} does not exist; "
                              "fix or remove the line")
        keys.add((source, name, e.row_group, e.row))
        paths[(source, name)] = path
    return Exclusion(frozenset(keys), paths)


_SHARDS: dict[int, tuple[Dataset, dict[str, tuple[str, list[int]]]]] = {}


def _shards(dataset: Dataset) -> dict[str, tuple[str, list[int]]]:
    """File name -> (path, rows of each row group), over both splits; made once per
    dataset (a daemon's are fixed), not at every attach that sends a list."""
    known = _SHARDS.get(id(dataset))
    if known is not None and known[0] is dataset:
        return known[1]
    out: dict[str, tuple[str, list[int]]] = {}
    for plan in dataset.splits.values():
        for ref in plan.row_groups:
            name = ref.path.rsplit("/", 1)[-1]
            out.setdefault(name, (ref.path, []))[1].append(ref.num_rows)
    _SHARDS[id(dataset)] = (dataset, out)
    return out


def _source(e: Entry, shards: Mapping[str, Mapping[str, object]],
            datasets: Mapping[str, Dataset], at: str) -> str:
    if len(datasets) == 1:
        return next(iter(datasets))  # one source: whatever the line calls it
    if e.source is not None:
        if e.source not in datasets:
            raise ConfigError(f"{at}: source {e.source!r} is not served here (sources: "
                              f"{', '.join(datasets)}); name one of them, or remove the line")
        return e.source
    name = e.file.rsplit("/", 1)[-1]
    holders = [s for s in datasets if name in shards[s]]
    if len(holders) != 1:
        raise ConfigError(f"{at}: {e.file!r} does not name its source, and "
                          f"{'no source' if not holders else ', '.join(holders)} serve(s) a "
                          "shard of that name; write source,file,row_group,row")
    return holders[0]


def _file_name(file: str, dataset: Dataset) -> str | None:
    """A shard's file name from `file`: a file name, or a path or URL right under the root."""
    if "/" not in file:
        return file
    root = str(dataset.root).rstrip("/") + "/"
    rest = file[len(root):] if file.startswith(root) else ""
    return rest if rest and "/" not in rest else None


# -- dropping -----------------------------------------------------------------

def excluded_mask(rows: np.ndarray, order: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Which of a unit's `n_rows` rows, in read order (`order[i]`: the file row read i-th;
    None: file order), are among the excluded file `rows`."""
    if order is None:
        mask = np.zeros(n_rows, dtype=bool)
        mask[rows] = True
        return mask
    return np.isin(order, rows)


def keep_rows(row_tokens: np.ndarray, keep: int, by_documents: bool) -> int:
    """How many leading rows lie before a position `keep` tokens (concat) or `keep`
    documents (best fit) into a unit: the row the position is inside is counted, so a
    document already partly delivered is finished."""
    if keep <= 0:
        return 0
    if by_documents:
        documents = np.flatnonzero(row_tokens > 0)
        return int(documents[keep - 1]) + 1 if keep <= len(documents) else len(row_tokens)
    starts = np.cumsum(row_tokens) - row_tokens
    return int(np.searchsorted(starts, keep, side="left"))


def exclude_unit(tokens: np.ndarray, row_tokens: np.ndarray, rows: np.ndarray,
                 order: np.ndarray | None, unit: int, rule: tuple[int, int, bool]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A stream's whole unit `unit` (its rows in read order: `order`, None for file order)
    without the excluded file `rows` of its row group, under `rule` (`keep_rule`: before
    the point where the list began, rows stay). What a reader delivers, and what an
    offline tool must apply to reproduce it."""
    first, keep, by_documents = rule
    if unit < first:
        return tokens, row_tokens
    drop = excluded_mask(rows, order, len(row_tokens))
    if unit == first:
        drop[:keep_rows(row_tokens, keep, by_documents)] = False
    return drop_rows(tokens, row_tokens, drop)


def drop_rows(tokens: np.ndarray, row_tokens: np.ndarray, drop: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The unit without the rows marked in `drop`: their tokens removed, their lengths 0
    (what a null text value gives)."""
    drop = drop & (row_tokens > 0)
    if not drop.any():
        return tokens, row_tokens
    return tokens[np.repeat(~drop, row_tokens)], np.where(drop, 0, row_tokens)


# -- admission ----------------------------------------------------------------

ATTACH_LISTS = 4  # lists kept resolved: every rank of a job sends the same one


def for_attach(msg: Mapping[str, Any], datasets: Mapping[str, Dataset], served: Exclusion
               ) -> Exclusion:
    """The list a stream of this attach excludes: the daemon's own (`served`) and the one
    the attach sends (its `exclude` field; `exclude_name` names it in errors). Checking
    65,536 entries takes the daemon's loop ~1 s (benchmarks/exclude.py), so the last few
    lists are kept by a digest of what was sent: the other ranks' attaches cost a hash."""
    if msg.get("exclude") is None:
        return served
    digest = wire_digest(msg["exclude"])
    hit = _ATTACHED.get(digest)
    if hit is not None and hit[0] is served:
        return hit[1]
    name = msg.get("exclude_name")
    where = name[:MAX_NAME_CHARS] if isinstance(name, str) else "sent with the attach"
    listed = served | resolve(from_wire(msg["exclude"]), datasets, where)
    _ATTACHED[digest] = (served, listed)
    while len(_ATTACHED) > ATTACH_LISTS:
        del _ATTACHED[next(iter(_ATTACHED))]
    return listed


_ATTACHED: dict[str, tuple[Exclusion, Exclusion]] = {}


def admit(start: Position, saved_start: Any, exclusion: Exclusion) -> Position:
    """`start` with `exclusion` in force (NONE: no list): a fresh stream excludes from its
    beginning; a saved position resumes only under the list it was saved with, or, saved
    under none, begins the list where it stands."""
    now = exclusion.sha256 if len(exclusion) else None
    if saved_start is None:
        return dataclasses.replace(start, exclude=ExcludeMark(now)) if now else start
    if isinstance(saved_start, dict) and "elastic_from" in saved_start:
        marks = [ExcludeMark.parse(c["exclude"]) if c.get("exclude") is not None else None
                 for c in saved_start["elastic_from"]]
        for mark in marks:
            _same_list(mark, now)
        if now is None:
            return start
        if any(m is None or (m.unit, m.keep, m.sources) != (0, 0, ()) for m in marks):
            raise StateMismatchError(
                "an exclusion list cannot begin at an elastic resume, nor while a rank is "
                "still in the row group where it began; resume at the saved number of ranks "
                "with the list, save once each rank's stream has moved past that row group, "
                "and resume elastically from that state")
        return dataclasses.replace(start, exclude=ExcludeMark(now))
    _same_list(start.exclude, now)
    if now is None or start.exclude is not None:
        return start
    if start.mix is not None:
        return dataclasses.replace(start, exclude=_mixture_mark(start.mix, now))
    packed = start.packed
    if start.elastic is not None and start.elastic.item(packed.unit)[0] != WHOLE:
        raise StateMismatchError(
            "an exclusion list cannot begin inside a partial row group of an elastic "
            "resume; resume without it, and add it from a state saved a row group later")
    keep = packed.doc if isinstance(packed, BestFitPosition) else packed.offset
    return dataclasses.replace(start, exclude=ExcludeMark(now, packed.unit, keep))


def _mixture_mark(mix: MixState, sha256: str) -> ExcludeMark:
    """Where a list begins in each source of a mixture resumed at `mix`: after the
    documents delivered, in part or whole (concat), or read (best fit), by its cursor's
    `exact` (source unit, document, token)."""
    if mix.exact is None or mix.layouts is not None:
        raise StateMismatchError(
            "an exclusion list can begin at a mixture's saved position only from a feed "
            "state (state_dict()) of a stream that was not resumed elastically; resume "
            "without exclude=, save, and add the list from that state")
    return ExcludeMark(sha256, sources=tuple(
        (name, unit, doc + (1 if token else 0))
        for name, (unit, doc, token) in sorted(mix.exact.items())))


def _same_list(saved: ExcludeMark | None, now: str | None) -> None:
    if saved is None or saved.sha256 == now:
        return
    raise StateMismatchError(
        f"the saved state was taken under the exclusion list with sha256 {saved.sha256}, "
        f"and this attach excludes {'nothing' if now is None else f'the list {now}'}; resume "
        "with the exclusion file kept next to that checkpoint (TokenFeed(exclude=PATH), or "
        "the daemon's serve --exclude), unchanged, so that the stream continues exactly")


def mark_at(mark: ExcludeMark, position: Position) -> ExcludeMark:
    """`mark` as `position` needs it: once every source reads past the unit where the
    list began, it applies to every row (0, 0), so later states carry no history."""
    if mark.sources and position.mix is not None:
        cursors = position.mix.sources
        past = all(n not in cursors or cursors[n].unit > unit for n, unit, _ in mark.sources)
    else:
        past = position.first_unit > mark.unit
    return ExcludeMark(mark.sha256) if past else mark


def keep_rule(mark: ExcludeMark | None, by_documents: bool, source: str = ""
              ) -> tuple[int, int, bool]:
    """(unit, keep, by_documents) for a reader: where its rows start being dropped."""
    if mark is None:
        return (0, 0, by_documents)
    for name, unit, keep in mark.sources:
        if name == source:
            return (unit, keep, True)  # a mixture's: counted in documents
    return (mark.unit, mark.keep, by_documents)
