"""Prometheus metrics with the contract's names, served on the admin listener."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("metering_proxy_requests", "Client requests.", ["route", "model", "status"])
REQUEST_SECONDS = Histogram(
    "metering_proxy_request_duration_seconds",
    "Whole request, as the client saw it.",
    ["route", "model"],
    buckets=_LATENCY,
)
UPSTREAM_SECONDS = Histogram(
    "metering_proxy_upstream_duration_seconds", "Upstream call until its last byte.", ["model"], buckets=_LATENCY
)
TTFT_SECONDS = Histogram(
    "metering_proxy_time_to_first_token_seconds",
    "Upstream call until its first streamed event.",
    ["model"],
    buckets=_LATENCY,
)
TOKENS = Counter("metering_proxy_tokens", "Metered tokens.", ["model", "kind"])
SPEND_USD = Counter("metering_proxy_spend_usd", "Metered spend in USD.", ["model"])
REJECTIONS = Counter("metering_proxy_rejections", "Requests refused before forwarding.", ["reason"])
RESERVATIONS_OPEN = Gauge("metering_proxy_reservations_open", "Reservations this instance holds open.")
REDIS_SCRIPT_SECONDS = Histogram(
    "metering_proxy_redis_script_duration_seconds",
    "One Lua script call, round trip included.",
    ["script"],
    buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
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
ACCOUNT_SPEND_USD = Counter(
    "metering_proxy_account_spend_usd", "Spend per account (only with metrics.per_account_labels).", ["account"]
)


@functools.lru_cache(maxsize=4096)
def child(metric: Any, *labels: str) -> Any:
    """A labelled series, looked up once: `labels()` takes a lock and builds a tuple on
    every call, which adds up on the hot path."""
    return metric.labels(*labels)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
