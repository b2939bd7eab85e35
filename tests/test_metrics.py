"""/metrics as a scraper sees it: no `_created` series unless asked, the build, bounded
model labels on refusals, the store-wide webhook and worker gauges read at scrape time,
Redis errors counted."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy import __version__, gauges, keyspace, metrics
from proxy.embedded import EmbeddedRedis, free_port
from proxy.testing.upstream import DemoUpstream
from proxy.webhooks import Webhooks
from proxy.worker import Worker

from .conftest import Running
from .helpers import CHAT, Receiver, hook_config, pause_background_worker, post, scrape, suite_server

StartProxy = Callable[..., Awaitable[Running]]


async def metrics_text(running: Running) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.admin_url}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


@pytest.fixture(autouse=True)
def _fresh_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gauges, "MIN_INTERVAL_S", 0.0)  # every scrape reads the store


async def test_no_created_series_unless_asked(start_proxy: StartProxy, upstream: DemoUpstream) -> None:
    running = await start_proxy()
    key = await running.account("acme", "10")
    await running.client(key).chat.completions.create(**CHAT)
    text = await metrics_text(running)
    assert "metering_proxy_requests_total{" in text and "_created" not in text

    asked = await start_proxy({"metrics": {"created_series": True}})
    assert "metering_proxy_requests_created{" in await metrics_text(asked)
    again = await start_proxy()  # a proxy started (or reloaded) without the option turns them off
    assert "_created" not in await metrics_text(again)


async def test_build_info(proxy: Running) -> None:
    samples = await scrape(proxy.admin_url)
    [(labels, one)] = samples["metering_proxy_build_info"]
    assert labels["version"] == __version__ and labels["python"] and one == 1.0


async def test_refusals_are_labelled_with_a_bounded_model(proxy: Running, upstream: DemoUpstream) -> None:
    broke = await proxy.account("broke", usd=None)
    before = await scrape(proxy.admin_url)
    assert (await post(proxy, broke, "chat/completions", CHAT))[0] == 402
    hostile = {**CHAT, "model": "gpt-9-" + "x" * 300}
    assert (await post(proxy, broke, "chat/completions", hostile))[0] == 400
    assert (await post(proxy, "sk-not-a-key", "chat/completions", CHAT))[0] == 401
    after = await scrape(proxy.admin_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    rejected = "metering_proxy_rejections_total"
    assert grew(rejected, reason="insufficient_quota", model="gpt-4o-mini") == 1
    assert grew(rejected, reason="model_not_found", model="other") == 1
    assert grew(rejected, reason="invalid_api_key", model="none") == 1
    requests = "metering_proxy_requests_total"
    assert grew(requests, route="/v1/chat/completions", model="gpt-4o-mini", status="402") == 1
    assert grew(requests, route="/v1/chat/completions", model="other", status="400") == 1
    models = {labels["model"] for labels, _ in after[rejected]} | {labels["model"] for labels, _ in after[requests]}
    assert not any(m.startswith("gpt-9") for m in models)  # a client cannot mint series


async def test_overhead_is_observed_for_forwarded_requests(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    before = await scrape(proxy.admin_url)
    await proxy.client(key).chat.completions.create(**CHAT)
    await proxy.client(key).embeddings.create(model="text-embedding-3-small", input="hi")
    after = await scrape(proxy.admin_url)
    name = "metering_proxy_overhead_seconds_count"
    assert value(after, name, route="/v1/chat/completions") - value(before, name, route="/v1/chat/completions") == 1
    assert value(after, name, route="/v1/embeddings") - value(before, name, route="/v1/embeddings") == 1


async def test_webhook_outbox_and_dead_letter_gauges(start_proxy: StartProxy) -> None:
    receiver = Receiver()  # never started: every delivery fails
    receiver.port = free_port()
    running = await start_proxy(hook_config(receiver, max_attempts=1))
    await pause_background_worker(running)
    await running.account("acme", "10")  # credits.granted
    await running.account("beta", "10")
    await running.fund("beta", "1")
    samples = await scrape(running.admin_url)
    assert value(samples, "metering_proxy_webhook_outbox_events") == 3
    assert value(samples, "metering_proxy_webhook_dead_letters") == 0

    hooks = Webhooks(running.state)
    try:
        await Worker(running.state.ledger, hooks.deliver).tick()  # one attempt each: all dead
    finally:
        await hooks.close()
    samples = await scrape(running.admin_url)
    assert value(samples, "metering_proxy_webhook_outbox_events") == 0
    assert value(samples, "metering_proxy_webhook_dead_letters") == 3


async def test_worker_overdue_gauge(proxy: Running) -> None:
    redis = proxy.state.redis
    await pause_background_worker(proxy)
    now_ms = int(time.time() * 1000)
    await redis.zadd(keyspace.watch_shard("acme"), {"acme": now_ms + 60_000})  # due later: not overdue
    await redis.zadd(keyspace.watch_shard("beta"), {"beta": 0})  # "visit at once": no date to be late by
    assert value(await scrape(proxy.admin_url), "metering_proxy_worker_overdue_seconds") == 0
    await redis.zadd(keyspace.watch_shard("gamma"), {"gamma": now_ms - 300_000})  # a lapse nobody reaped
    assert value(await scrape(proxy.admin_url), "metering_proxy_worker_overdue_seconds") >= 300


async def test_redis_errors_are_counted_and_metrics_still_answer(start_proxy: StartProxy, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", binary=suite_server(), appendfsync="no")
    await server.start()
    try:
        running = await start_proxy({"redis": {"url": server.url}})
        key = await running.account("acme", "10")
        await running.client(key).chat.completions.create(**CHAT)  # the key is cached now
        before = value(await scrape(running.admin_url), "metering_proxy_redis_errors_total", operation="admit")
    finally:
        server.stop()  # the outage
    with pytest.raises(openai.InternalServerError) as caught:
        await running.client(key).chat.completions.create(**CHAT)
    assert caught.value.status_code == 503
    after = await scrape(running.admin_url)  # the store gauges cannot be read: the scrape still answers
    assert value(after, "metering_proxy_redis_errors_total", operation="admit") == before + 1


@pytest.mark.parametrize("created", [False, True])
def test_loop_series_expose_what_prometheus_client_would(created: bool) -> None:
    """The hot path's lock-free series (metrics.LoopSeries) render byte for byte as
    prometheus_client's own Counter, Histogram and Gauge fed the same numbers, bucket
    edges (a value equal to a bound) and `_created` included."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (0.005, 0.01, 1, 2.5)
    counter = metrics.LoopSeries("counter", "t_requests", "Requests.", ["route"], registry=ours)
    histogram = metrics.LoopSeries("histogram", "t_seconds", "Seconds.", ["model"], bounds, registry=ours)
    gauge = metrics.LoopSeries("gauge", "t_open", "Open.", registry=ours)
    their_counter = Counter("t_requests", "Requests.", ["route"], registry=theirs)
    their_histogram = Histogram("t_seconds", "Seconds.", ["model"], buckets=bounds, registry=theirs)
    their_gauge = Gauge("t_open", "Open.", registry=theirs)
    for route, n in (("/a", 1), ("/b", 2.5), ("/a", 3)):
        counter.labels(route).inc(n)
        their_counter.labels(route).inc(n)
    for model, seconds in (("m", 0.005), ("m", 0.0051), ("n", 1.0), ("m", 7.0), ("n", 0.0)):
        histogram.labels(model).observe(seconds)
        their_histogram.labels(model).observe(seconds)
    for step in (gauge.inc, gauge.inc, gauge.dec):
        step()
    their_gauge.inc()
    their_gauge.inc()
    their_gauge.dec()
    previous = metrics._created_series
    try:
        metrics.configure(created, (), ())
        mine, expected = generate_latest(ours).decode(), generate_latest(theirs).decode()
    finally:
        metrics.configure(previous, (), ())

    def without_times(text: str) -> list[str]:  # each side stamps its own creation time
        return [line.rsplit(" ", 1)[0] if "_created" in line else line for line in text.splitlines()]

    assert without_times(mine) == without_times(expected)
    assert ("_created" in mine) is created
