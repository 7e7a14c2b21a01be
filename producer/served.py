"""What a daemon serves: its sources' plans and what is checked against them at start.

`scan` reads every source of a `DaemonConfig` once (dataset.py: footers or a manifest)
and returns one frozen `ServedData`; `BackgroundScan` runs it on a thread of its own
and hands out first the plan of a one-source daemon's first files (`complete` False,
no fingerprint) while the rest of the footers are read. `ServedData` holds the
datasets by source name (sorted), a mixture's weights at start (the mix file's schedule
at its first row, else `--mix`'s weights, else equal), the `--exclude` list resolved
against the data, each source's parsed filter (checked against its columns later, at
its first attach: admission.py) and the fingerprint a saved state must match. The
daemon holds one until the whole plan replaces an early one; nothing in it changes
(live reweighting changes the daemon's own copy of the weights, ops.py).

Failure behaviour: a missing or empty source, two sources sharing a file, an exclusion
naming a document that is not there or a filter that does not parse raise the
DataError or ConfigError of the module that found it, naming the fix; the daemon exits
before serving anything (or, found after an early plan was served, stops: daemon.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tokenfeed.common.errors import DataError
from tokenfeed.common.exclude import read_exclude_file
from tokenfeed.producer import exclude
from tokenfeed.producer.admission import cache_key
from tokenfeed.producer.config import DaemonConfig
from tokenfeed.producer.dataset import Dataset, combined_fingerprint, scan_dataset
from tokenfeed.producer.exclude import Exclusion
from tokenfeed.producer.filters import Filter
from tokenfeed.producer.recipe import check_disjoint


@dataclass(frozen=True)
class ServedData:
    datasets: dict[str, Dataset]  # source name -> its splits' plans, sorted by name
    weights: dict[str, float]  # a mixture's, when a consumer names none
    exclusion: Exclusion  # serve --exclude: documents no stream delivers (exclude.NONE)
    filters: dict[str, Filter]  # source name -> its filter, for the sources that have one
    fingerprint: str  # dataset.combined_fingerprint ("" until `complete`)

    @property
    def complete(self) -> bool:
        """Every source's plan is whole (False: an early plan, `scan`)."""
        return all(d.complete for d in self.datasets.values())

    def sample_texts(self, total_bytes: int) -> list[str]:
        """About `total_bytes` of documents, shared equally among the sources: what a
        faster tokenizer backend must reproduce exactly (backends.py)."""
        share = total_bytes // len(self.datasets)
        return [t for d in self.datasets.values() for t in d.sample_texts(share)]

    def cache_keys(self) -> list[str]:
        """One token cache per (text column, filter) the sources use (admission.cache_key)."""
        return sorted({cache_key(d.text_column, self.filters.get(n))
                       for n, d in self.datasets.items()})

    def text_columns(self) -> list[str]:
        return sorted({d.text_column for d in self.datasets.values()})

    def describe(self, weights: dict[str, float]) -> dict[str, dict[str, Any]]:
        """Status's `sources`: each one's path, text column, current weight and filter."""
        return {n: {"path": str(d.root), "text_column": d.text_column,
                    "weight": weights.get(n),
                    **({"filter": self.filters[n].text} if n in self.filters else {})}
                for n, d in self.datasets.items()}

    def describe_exclusion(self) -> dict[str, Any] | None:
        """Status's `exclude`: the list's identity and size (None: nothing excluded)."""
        if not len(self.exclusion):
            return None
        return {"sha256": self.exclusion.sha256, "documents": len(self.exclusion)}


def scan(cfg: DaemonConfig, early: Callable[[ServedData], None] | None = None) -> ServedData:
    """Every source's plans, and what is checked against them (exclusions, filters).

    `early`: for a daemon of one source whose footers are all read (no manifest), with
    no exclusion list and no recipe, called with the plan of its first files as soon as
    they are known (dataset.scan_dataset), while the rest are read: a fresh stream can
    start on it (ops.py). Anything checked against the whole plan makes `early` wait."""
    sources = cfg.source_list()
    if len(sources) > 1 or cfg.exclude or cfg.schedule is not None or cfg.limits:
        early = None
    datasets = {src.name: scan_dataset(
        src.data, text_column=src.text_column or "", val_files=cfg.val_files,
        manifest=cfg.manifest, cache_dir=cfg.cache_dir,
        early=None if early is None else
        lambda first, name=src.name: early(_served(cfg, {name: first})))
        for src in sources}
    return _served(cfg, datasets)


def _served(cfg: DaemonConfig, datasets: dict[str, Dataset]) -> ServedData:
    weights = cfg.default_weights()
    if cfg.schedule is not None:  # the schedule's weights at its start
        weights = dict(zip(cfg.schedule.names, cfg.schedule.weights(0), strict=True))
    check_disjoint({n: [*d.splits["train"].files, *d.splits["val"].files]
                    for n, d in datasets.items()})
    exclusion = (exclude.resolve(read_exclude_file(cfg.exclude), datasets, str(cfg.exclude))
                 if cfg.exclude else exclude.NONE)
    filters = {src.name: Filter.parse(src.filter) for src in cfg.source_list()
               if src.filter is not None}  # checked against columns at attach
    complete = all(d.complete for d in datasets.values())
    return ServedData(datasets=datasets, weights=weights, exclusion=exclusion,
                      filters=filters,
                      fingerprint=combined_fingerprint(datasets) if complete else "")


SCAN_THREAD = "tokenfeed-scan"


class BackgroundScan:
    """`scan(cfg)` on a thread of its own: `first` resolves to the plan a daemon may start
    serving from (an early one, or the whole), `whole` to the whole one.

    The daemon waits on `first` in its main thread, so a signal handler runs (and may stop
    the start) at once, not when a blocking call in C++ (a slow object-storage request,
    retried for up to a minute) returns; the thread is a daemon one: a start stopped
    meanwhile leaves it behind, to end with the process."""

    def __init__(self, cfg: DaemonConfig, early: bool = True) -> None:
        self.first: Future[ServedData] = Future()
        self.whole: Future[ServedData] = Future()
        threading.Thread(target=self._run, args=(cfg, early), name=SCAN_THREAD,
                         daemon=True).start()

    def _run(self, cfg: DaemonConfig, early: bool) -> None:
        try:
            served = scan(cfg, self.first.set_result if early else None)
        except BaseException as e:  # raised where it is waited for
            if not self.first.done():
                self.first.set_exception(e)
            self.whole.set_exception(e)
            return
        if not self.first.done():
            self.first.set_result(served)
        self.whole.set_result(served)


def check_extends(early: ServedData, whole: ServedData) -> None:
    """The whole plan begins with the early one's row groups: a stream started on the
    early plan continues on the whole one unchanged (DataError if a shard changed while
    its footers were read)."""
    for name, d in early.datasets.items():
        known = d.splits["train"].row_groups
        if whole.datasets[name].splits["train"].row_groups[:len(known)] != known:
            raise DataError(
                f"the first shards of source {name} ({d.root}) changed while the daemon "
                "read the rest of its footers; stop writing to the data while it is served, "
                "then restart the daemon")


def data_description(cfg: DaemonConfig, served: ServedData | None) -> str:
    """`data_dir` in daemon.json and status: `--data`, else `name=path` of each source
    (as configured before the scan, as found after it)."""
    if cfg.data_dir is not None:
        return str(cfg.data_dir)
    if served is None:
        return " ".join(f"{s.name}={s.data}" for s in cfg.source_list())
    return " ".join(f"{n}={d.root}" for n, d in served.datasets.items())
