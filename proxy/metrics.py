"""Prometheus metrics with the contract's names, served on the admin listener.

No `_created` series unless `metrics.created_series` asks for them (they double the
series count and dashboards never read them). Label values a client chooses are
bounded: a model label is a configured model's name, `other` or `none` (`model_label`).
The store-wide gauges (outbox, dead letters, worker lag) are read from Redis at scrape
time by `gauges.py`.
"""

from __future__ import annotations

import bisect
import functools
import platform
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from . import __version__

disable_created_metrics()  # type: ignore[no-untyped-call]  # until configure() says otherwise
_created_series = False  # the same switch, for the loop's series below


class _Tally:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def samples(self, family: Metric, labels: dict[str, str]) -> None:
        if family.type == "gauge":
            family.add_sample(family.name, labels, self.value)
            return
        family.add_sample(family.name + "_total", labels, self.value)
        if _created_series:
            family.add_sample(family.name + "_created", labels, self.created)


class _Spread:
    __slots__ = ("bounds", "counts", "created", "les", "sum")

    def __init__(self, bounds: tuple[float, ...], les: tuple[str, ...]) -> None:
        self.bounds, self.les = bounds, les  # shared by the metric's series
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # the first bucket with amount <= le

    def samples(self, family: Metric, labels: dict[str, str]) -> None:
        total = 0
        for le, count in zip(self.les, self.counts, strict=True):
            total += count
            family.add_sample(family.name + "_bucket", {**labels, "le": le}, total)
        family.add_sample(family.name + "_count", labels, total)
        family.add_sample(family.name + "_sum", labels, self.sum)
        if _created_series:
            family.add_sample(family.name + "_created", labels, self.created)


class LoopSeries:
    """A metric updated only from the event loop's thread, per request: its series are
    plain numbers, with no lock per update as prometheus_client takes (a counter's inc
    costs 0.37 us there, a histogram's observe 0.75, here 0.1 and 0.2), read at scrape.
    The exposition is prometheus_client's own, names and suffixes alike."""

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self.bounds = (*buckets, float("inf"))
        self.les = tuple(floatToGoString(bound) for bound in self.bounds)  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:  # an unlabelled metric is its own one series
            self._one = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> Any:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {self.labelnames}")
            series = self._series[values] = _Spread(self.bounds, self.les) if self.kind == "histogram" else _Tally()
        return series

    def inc(self, amount: float = 1) -> None:
        self._one.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._one.dec(amount)

    def observe(self, amount: float) -> None:
        self._one.observe(amount)

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, self.kind)
        for values, series in list(self._series.items()):
            series.samples(family, dict(zip(self.labelnames, values, strict=True)))
        yield family


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = LoopSeries("counter", "metering_proxy_requests", "Client requests.", ["route", "model", "status"])
REQUEST_SECONDS = LoopSeries(
    "histogram",
    "metering_proxy_request_duration_seconds",
    "Whole request, as the client saw it.",
    ["route", "model"],
    _LATENCY,
)
UPSTREAM_SECONDS = LoopSeries(
    "histogram", "metering_proxy_upstream_duration_seconds", "Upstream call until its last byte.", ["model"], _LATENCY
)
TTFT_SECONDS = LoopSeries(
    "histogram",
    "metering_proxy_time_to_first_token_seconds",
    "Upstream call until its first streamed event.",
    ["model"],
    _LATENCY,
)
TOKENS = LoopSeries("counter", "metering_proxy_tokens", "Metered tokens.", ["model", "kind"])
SPEND_USD = LoopSeries("counter", "metering_proxy_spend_usd", "Metered spend in USD.", ["model"])
OVERHEAD_SECONDS = LoopSeries(
    "histogram",
    "metering_proxy_overhead_seconds",
    "What the proxy added to a forwarded request: its whole duration minus the upstream call's.",
    ["route"],
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REJECTIONS = Counter(
    "metering_proxy_rejections", "Requests refused before forwarding (model: see model_label).", ["reason", "model"]
)
RESERVATIONS_OPEN = LoopSeries("gauge", "metering_proxy_reservations_open", "Reservations this instance holds open.")
REDIS_SCRIPT_SECONDS = LoopSeries(
    "histogram",
    "metering_proxy_redis_script_duration_seconds",
    "One Lua script call, round trip included.",
    ["script"],
    (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
)
REDIS_ERRORS = Counter(
    "metering_proxy_redis_errors",
    "Redis calls that failed (down, timed out, loading, read-only, no free connection): "
    "a script's name, key_lookup or other.",
    ["operation"],
)
REDIS_POOL_WAIT_SECONDS = Histogram(
    "metering_proxy_redis_pool_wait_seconds",
    "Checking out a Redis connection: waiting for a free one (and connecting a new one).",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
)
REDIS_POOL_EXHAUSTED = Counter(
    "metering_proxy_redis_pool_exhausted", "Redis calls that found no free connection in time (503)."
)
WEBHOOK_DELIVERIES = Counter("metering_proxy_webhook_deliveries", "Webhook delivery attempts.", ["event", "outcome"])
CONFIG_RELOADS = Counter("metering_proxy_config_reloads", "Config reloads.", ["outcome"])
USAGE_ESTIMATED = Counter(
    "metering_proxy_usage_estimated", "Requests whose usage was counted by the proxy, not the upstream.", ["model"]
)
RESERVATION_EXCEEDED = Counter(
    "metering_proxy_reservation_exceeded",
    "Settlements that charged more than their reservation (an upstream past its cap).",
    ["model"],
)
SETTLEMENTS_UNRESERVED = Counter(
    "metering_proxy_settlements_unreserved",
    "Settlements whose reservation Redis did not know (lost in a failover); charged all the same.",
)
SETTLEMENTS_JOURNALED = Counter(
    "metering_proxy_settlements_journaled", "Settlements kept in the local journal while Redis was unavailable."
)
JOURNAL_PENDING = Gauge("metering_proxy_journal_pending", "Settlements in this instance's journal, not yet in Redis.")
ACCOUNT_SPEND_USD = LoopSeries(
    "counter",
    "metering_proxy_account_spend_usd",
    "Spend per account (only with metrics.per_account_labels).",
    ["account_id"],
)
# store-wide, the same on every instance (read from Redis at scrape time: gauges.py)
WEBHOOK_OUTBOX = Gauge(
    "metering_proxy_webhook_outbox_events", "Webhook events waiting for delivery, all accounts (store-wide)."
)
WEBHOOK_DEAD_LETTERS = Gauge(
    "metering_proxy_webhook_dead_letters",
    "Webhook events that failed every attempt, all accounts (store-wide; `webhooks dead list|replay`).",
)
WORKER_OVERDUE_SECONDS = Gauge(
    "metering_proxy_worker_overdue_seconds",
    "How long past due the most overdue account waits for a worker visit "
    "(a lapsed reservation to release, events to deliver); store-wide.",
)
BUILD = Info("metering_proxy_build", "The running build.")
BUILD.info({"version": __version__, "python": platform.python_version()})
NO_MODEL, OTHER_MODEL = "none", "other"


def model_label(model: str | None, configured: Collection[str]) -> str:
    """A model as a label value: a configured name, else `other` (asked for, unknown
    here), or `none` (not read: the request was refused before its body was)."""
    if model is None:
        return NO_MODEL
    return model if model in configured else OTHER_MODEL


def configure(created_series: bool, models: Iterable[str], scripts: Iterable[str]) -> None:
    """At start and on reload: `_created` series on or off, and the series an alert
    reads with `increase()` created at zero (a counter born at 1 shows no increase)."""
    global _created_series
    (enable_created_metrics if created_series else disable_created_metrics)()  # type: ignore[no-untyped-call]
    _created_series = created_series
    for outcome in ("success", "error"):
        CONFIG_RELOADS.labels(outcome)
    for name in (*scripts, "key_lookup", "other"):
        REDIS_ERRORS.labels(name)
    for model in models:
        RESERVATION_EXCEEDED.labels(model)
        USAGE_ESTIMATED.labels(model)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """A labelled series, looked up once: `labels()` takes a lock and builds a tuple on
    every call, which adds up on the hot path."""
    return metric.labels(*labels)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
