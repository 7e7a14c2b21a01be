"""Prometheus `/metrics` for `tokenfeed serve --metrics-port P [--metrics-host H]`.

The daemon's loop publishes its status (a plain dict) at every heartbeat; an HTTP
server thread (prometheus_client's `start_http_server`) answers scrapes from the
last published dict through a custom collector. The thread never touches the
loop's objects and the loop never waits for a scrape: publishing is one reference
assignment (atomic under the GIL).

Metrics (units in names, counters end in `_total`). Per stream, labelled by `split`,
`rank` and `world_size` (bounded by the ranks a node serves; streams that share the
labels are summed, and counters of dropped streams stay in the sum, so no counter
ever goes down):

    tokenfeed_ring_depth_batches          gauge    filled ring slots
    tokenfeed_ring_capacity_batches       gauge    ring slots
    tokenfeed_consumers                   gauge    attached consumers
    tokenfeed_tokens_produced_total       counter  tokens packed into ring slots
    tokenfeed_tokens_consumed_total       counter  tokens released by consumers
    tokenfeed_consumer_stall_seconds_total counter seconds trainers waited in next()
    tokenfeed_consumer_step_seconds_total counter  seconds trainers spent between calls
    tokenfeed_tokens_cropped_total        counter  tokens best-fit packing discarded
    tokenfeed_skipped_documents_total     counter  null / non-string text values skipped
    tokenfeed_skipped_row_groups_total    counter  row groups skipped (--on-error skip)

Filtered sources add, labelled by `source` too (live streams): `tokenfeed_filter_kept_
documents_total` and `tokenfeed_filter_dropped_documents_total` (filters.py).

Without --cache-dir, the val split's in-memory store (valstore.py) adds
`tokenfeed_val_store_bytes`, `tokenfeed_val_store_budget_bytes` and
`tokenfeed_val_store_row_groups` (held), `tokenfeed_val_store_lookups_total{result="hit|
miss"}` (a later round's row groups are hits) and `tokenfeed_val_store_refused_total`
(row groups past the bound, tokenized again every round).

Per daemon: `tokenfeed_workers{state="target|alive|busy"}`,
`tokenfeed_worker_restarts_total`, `tokenfeed_worker_busy_seconds_total{phase="read|
tokenize"}`, `tokenfeed_storage_retries_total`, `tokenfeed_storage_failed_requests_total`
(object-storage requests retried / given up on), `tokenfeed_staging_bytes`,
`tokenfeed_staging_budget_bytes`,
`tokenfeed_start_time_seconds` and `tokenfeed_info{daemon_id, tokenizer, backend}`.
The stall share over a window is
`rate(tokenfeed_consumer_stall_seconds_total[1m]) / (rate(..stall..) + rate(..step..))`.

Failure behaviour: a port that cannot be bound is a ConfigError naming host, port and
the fix, raised at start; before the first publish a scrape returns no tokenfeed
metrics. A missing prometheus-client is a ConfigError saying what to install.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from tokenfeed.common.errors import ConfigError

log = logging.getLogger(__name__)

STREAM_LABELS = ("split", "rank", "world_size")
# (metric, status key of a stream, help); gauges are summed over streams sharing labels.
STREAM_GAUGES = (
    ("tokenfeed_ring_depth_batches", "depth", "Filled ring slots (batches ready or held)."),
    ("tokenfeed_ring_capacity_batches", "capacity", "Ring slots of the stream."),
    ("tokenfeed_consumers", "consumers", "Consumers attached to the stream."),
)
STREAM_COUNTERS = (
    ("tokenfeed_tokens_produced_total", "tokens_produced", "Tokens packed into ring slots."),
    ("tokenfeed_tokens_consumed_total", "tokens_consumed", "Tokens released by consumers."),
    ("tokenfeed_consumer_stall_seconds_total", "stall_s",
     "Seconds the stream's trainers waited inside next() for data."),
    ("tokenfeed_consumer_step_seconds_total", "step_s",
     "Seconds the stream's trainers spent between next() calls."),
    ("tokenfeed_tokens_cropped_total", "tokens_cropped",
     "Tokens best-fit packing cropped and discarded."),
    ("tokenfeed_skipped_documents_total", "skipped_values",
     "Documents skipped: null or non-string text values."),
    ("tokenfeed_skipped_row_groups_total", "skipped_row_group_count",
     "Row groups skipped after failing (--on-error skip)."),
)


# Mixtures only (absent without one): per stream labels and source.
MIX_METRICS = ("tokenfeed_mix_weight_ratio", "tokenfeed_mixed_tokens_total",
               "tokenfeed_mix_share_ratio", "tokenfeed_mix_source_done")
# Filtered sources only (absent without a filter): per stream labels and source.
FILTER_METRICS = ("tokenfeed_filter_kept_documents_total",
                  "tokenfeed_filter_dropped_documents_total")

# The val store only (absent with --cache-dir, whose token cache keeps the val split).
VAL_STORE_METRICS = ("tokenfeed_val_store_bytes", "tokenfeed_val_store_budget_bytes",
                     "tokenfeed_val_store_row_groups", "tokenfeed_val_store_lookups_total",
                     "tokenfeed_val_store_refused_total")


def metric_names() -> list[str]:
    """Every metric family this exporter serves (as named in /metrics, counters with
    `_total`), e.g. to check a dashboard against."""
    return [*(m for m, _, _ in STREAM_GAUGES), *(m for m, _, _ in STREAM_COUNTERS),
            "tokenfeed_workers", "tokenfeed_worker_restarts_total",
            "tokenfeed_worker_busy_seconds_total", "tokenfeed_storage_retries_total",
            "tokenfeed_storage_failed_requests_total", "tokenfeed_staging_bytes",
            "tokenfeed_staging_budget_bytes", "tokenfeed_start_time_seconds", "tokenfeed_info"]


def _by_labels(status: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Stream figures summed by (split, rank, world_size), dropped streams' counters in."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for s in [*status.get("streams", []), *status.get("retired_streams", [])]:
        key = (str(s["split"]), str(s["rank"]), str(s["world_size"]))
        into = out.setdefault(key, {})
        for _, field, _ in (*STREAM_GAUGES, *STREAM_COUNTERS):
            into[field] = into.get(field, 0.0) + float(s.get(field) or 0)
    return out


def _mixture_families(status: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
    """Mixture weights and tokens mixed per source (realized share: a ratio of rates)."""
    weights: dict[tuple[str, ...], float] = {}
    mixed: dict[tuple[str, ...], float] = {}
    share: dict[tuple[str, ...], float] = {}
    done: dict[tuple[str, ...], float] = {}
    for s in status.get("streams", []):
        for source, m in (s.get("mix") or {}).items():
            key = (str(s["split"]), str(s["rank"]), str(s["world_size"]), str(source))
            weights[key] = float(m["weight"])
            mixed[key] = mixed.get(key, 0.0) + float(m["tokens"])
            if m.get("share_recent") is not None:
                share[key] = float(m["share_recent"])
            done[key] = float(bool(m.get("done")))
    if not weights:
        return
    labels = (*STREAM_LABELS, "source")
    g = gauge(MIX_METRICS[0], "Target token share of a source in a mixture stream.",
              labels=labels)
    for labelled, value in weights.items():
        g.add_metric(labelled, value)
    yield g
    c = counter(MIX_METRICS[1].removesuffix("_total"),
                "Tokens a mixture stream took from each source (its realized share: "
                "rate over the sum of rates).", labels=labels)
    for labelled, value in mixed.items():
        c.add_metric(labelled, value)
    yield c
    g = gauge(MIX_METRICS[2], "Realized token share of a source over the stream's last "
              "batches (tokenfeed_mix_weight_ratio is its target).", labels=labels)
    for labelled, value in share.items():
        g.add_metric(labelled, value)
    yield g
    g = gauge(MIX_METRICS[3], "1 once a source of a mixture is done (its repeat passes or "
              "budget reached), else 0.", labels=labels)
    for labelled, value in done.items():
        g.add_metric(labelled, value)
    yield g


def _filter_families(status: dict[str, Any], counter: Any) -> Iterator[Any]:
    """Documents each filtered source kept and dropped (filters.py), per stream labels."""
    counts: dict[str, dict[tuple[str, ...], float]] = {"kept": {}, "dropped": {}}
    for s in status.get("streams", []):
        for source, f in (s.get("filters") or {}).items():
            key = (str(s["split"]), str(s["rank"]), str(s["world_size"]), str(source))
            for what, into in counts.items():
                into[key] = into.get(key, 0.0) + float(f[what])
    if not counts["kept"]:
        return
    for name, (what, values) in zip(FILTER_METRICS, counts.items(), strict=True):
        c = counter(name.removesuffix("_total"),
                    f"Documents of a filtered source its filter {what} (dropped: the filter "
                    "false or null, or no text).", labels=(*STREAM_LABELS, "source"))
        for labelled, value in values.items():
            c.add_metric(labelled, value)
        yield c


def _val_store_families(status: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
    """What the val store holds and how its lookups went (status `val_store`)."""
    vs = status.get("val_store")
    if not vs:
        return
    yield gauge(VAL_STORE_METRICS[0], "Bytes of tokens the val store holds.",
                value=float(vs.get("bytes", 0)))
    yield gauge(VAL_STORE_METRICS[1], "--val-memory-mib, in bytes.",
                value=float(vs.get("max_bytes", 0)))
    yield gauge(VAL_STORE_METRICS[2], "Tokenized val row groups the val store holds.",
                value=float(vs.get("row_groups", 0)))
    c = counter(VAL_STORE_METRICS[3].removesuffix("_total"),
                "Val row groups asked of the val store: found (hit, not tokenized again) "
                "or not (miss).", labels=("result",))
    c.add_metric(("hit",), float(vs.get("hits", 0)))
    c.add_metric(("miss",), float(vs.get("misses", 0)))
    yield c
    yield counter(VAL_STORE_METRICS[4].removesuffix("_total"),
                  "Val row groups not kept because the store was full (tokenized again "
                  "every round).", value=float(vs.get("refused", 0)))


class StatusCollector:
    """A prometheus_client collector over the last status the daemon published."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        status = self.status  # one read: the loop may publish a new dict meanwhile
        if status is None:
            return
        groups = _by_labels(status)
        for name, field, doc in STREAM_GAUGES:
            g = GaugeMetricFamily(name, doc, labels=STREAM_LABELS)
            for key, values in groups.items():
                g.add_metric(key, values[field])
            yield g
        for name, field, doc in STREAM_COUNTERS:
            c = CounterMetricFamily(name, doc, labels=STREAM_LABELS)
            for key, values in groups.items():
                c.add_metric(key, values[field])
            yield c
        yield from _mixture_families(status, GaugeMetricFamily, CounterMetricFamily)
        yield from _filter_families(status, CounterMetricFamily)
        yield from _val_store_families(status, GaugeMetricFamily, CounterMetricFamily)
        w = status["workers"]
        g = GaugeMetricFamily("tokenfeed_workers", "Tokenizer worker processes.",
                              labels=("state",))
        for state in ("target", "alive", "busy"):
            g.add_metric((state,), float(w.get(state, 0)))
        yield g
        yield CounterMetricFamily("tokenfeed_worker_restarts",
                                  "Workers that died and were replaced.",
                                  value=float(w.get("restarts", 0)))
        c = CounterMetricFamily("tokenfeed_worker_busy_seconds",
                                "Seconds workers spent reading Parquet and tokenizing.",
                                labels=("phase",))
        c.add_metric(("read",), float(w.get("read_s", 0.0)))
        c.add_metric(("tokenize",), float(w.get("tokenize_s", 0.0)))
        yield c
        storage = status.get("storage") or {}
        yield CounterMetricFamily("tokenfeed_storage_retries",
                                  "Object-storage requests retried (daemon and workers).",
                                  value=float(storage.get("retries", 0)))
        yield CounterMetricFamily("tokenfeed_storage_failed_requests",
                                  "Object-storage requests given up on after every attempt.",
                                  value=float(storage.get("failed_requests", 0)))
        staging = status.get("staging", {})
        yield GaugeMetricFamily("tokenfeed_staging_bytes",
                                "Tokens read ahead outside the rings, in bytes.",
                                value=float(staging.get("bytes", 0)))
        yield GaugeMetricFamily("tokenfeed_staging_budget_bytes", "--max-staging-mib, in bytes.",
                                value=float(staging.get("budget_bytes", 0)))
        yield GaugeMetricFamily("tokenfeed_start_time_seconds",
                                "Unix time the daemon started.",
                                value=float(status.get("started", 0.0)))
        yield InfoMetricFamily("tokenfeed", "The daemon's identity and tokenizer.",
                               value={"daemon_id": str(status.get("daemon_id", "")),
                                      "tokenizer": str(status.get("tokenizer", "")),
                                      "backend": str(status.get("tokenizer_backend", ""))})


def check_available() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics-port needs prometheus-client, which is not installed; "
            "pip install 'tokenfeed[metrics]', or serve without --metrics-port"
        ) from None


class MetricsServer:
    """/metrics on `host:port` (port 0: any free port, see `port`) from a thread."""

    def __init__(self, host: str, port: int) -> None:
        check_available()
        from prometheus_client import CollectorRegistry, start_http_server

        self.collector = StatusCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ConfigError(
                f"--metrics-host {host} --metrics-port {port}: cannot serve /metrics there "
                f"({e.strerror or e}); choose a free port (or 0 for any) or another host"
            ) from None
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def publish(self, status: dict[str, Any]) -> None:
        self.collector.status = status

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
