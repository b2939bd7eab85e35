"""Settlement never loses money: exact sub-micro costs, lost reservations, Redis outages."""

from __future__ import annotations

import asyncio
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
from prometheus_client import REGISTRY

from proxy import journal, keyspace, reconcile
from proxy.embedded import EmbeddedRedis
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import entries, wait_for


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_thousand_tiny_embeddings_are_charged_their_exact_sum(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "1")
    upstream.fault.prompt_tokens = 10  # 10 x $0.02/1M = 0.2 micro-USD: rounded alone, it is free
    client = proxy.client(key)
    for _ in range(20):
        await asyncio.gather(*(client.embeddings.create(model="text-embedding-3-small", input="hi") for _ in range(50)))
    view = await proxy.balance("acme")
    assert view.balance == 1_000_000 - 200  # 1,000 x 0.2 micro-USD, exactly
    usage = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert len(usage) == 1000 and sum(-int(e["amount"]) for e in usage) == 200
    assert sum(1 for e in usage if e["amount"] == "-1") == 200  # every fifth request carries the sum over
    assert not await reconcile.check_account(proxy.state.redis, "acme")


async def test_a_reservation_lost_behind_the_proxys_back_is_still_charged(
    proxy: Running, upstream: DemoUpstream
) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.delay_before_headers_s = 0.5  # hold the request upstream while its reservation vanishes
    resv, acct = keyspace.account("acme", "resv"), keyspace.account("acme", "acct")
    before = metric("metering_proxy_settlements_unreserved_total")
    call = asyncio.ensure_future(
        proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    )
    redis = proxy.state.redis
    await wait_for(lambda: bool(upstream.requests), what="the request reached the upstream")
    (request_id, raw), *_ = (await redis.hgetall(resv)).items()
    # what a failover that lost the last second of writes leaves: no reservation, none reserved
    await redis.hdel(resv, request_id)
    await redis.hset(acct, "reserved", 0)
    await redis.hdel(keyspace.account("acme", "kuse"), f"r:{orjson.loads(raw)['key']}")  # nor by its key
    await call
    (entry,) = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert entry["request_id"] == request_id and entry["unreserved"] is True
    assert entry["amount"] == "-75"  # 10 x 2.50 + 5 x 10.00 micro-USD: charged as any other
    assert metric("metering_proxy_settlements_unreserved_total") == before + 1
    assert not await reconcile.check_account(redis, "acme")


async def test_usage_beyond_the_reservation_is_charged_flagged_and_counted(
    proxy: Running, upstream: DemoUpstream
) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens = 200_000  # the upstream bills a prompt far beyond what was sent
    before = metric("metering_proxy_reservation_exceeded_total", model="gpt-4o")
    await proxy.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10
    )
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert entry["amount"] == "-500050" and entry["reservation_exceeded"] is True
    assert int(entry["reserved"]) < 500_050
    assert metric("metering_proxy_reservation_exceeded_total", model="gpt-4o") == before + 1
    assert not await reconcile.check_account(proxy.state.redis, "acme")


async def test_streams_served_through_a_redis_outage_are_charged_once_it_returns(
    start_proxy: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis
) -> None:
    running = await start_proxy({"redis": {"url": own_redis.url}})
    await outage_scenario(running, upstream, own_redis)


async def outage_scenario(running: Running, upstream: DemoUpstream, server: EmbeddedRedis) -> None:
    key = await running.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.chunk_delay_s = 30, 0.05
    client = running.client(key)

    async def stream() -> str:
        chunks = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    streams = [asyncio.ensure_future(stream()) for _ in range(20)]
    refused = lambda: sum(1 for t in streams if t.done() and t.exception() is not None)  # noqa: E731
    # each has started upstream, or was refused at admission (a 503 if Redis stalled: fail closed)
    await wait_for(lambda: len(upstream.chunks_by_request) + refused() == 20, what="20 streams started or refused")
    started = len(upstream.chunks_by_request)
    assert started >= 15, f"only {started} of 20 streams were admitted with Redis healthy"
    assert server.process is not None
    server.process.kill()  # Redis dies mid-stream and stays down longer than every retry
    server.process.wait()
    texts = [t for t in await asyncio.gather(*streams, return_exceptions=True) if isinstance(t, str)]
    assert len(texts) == started and all(text.endswith("tok29") for text in texts)  # served in full
    journaled = running.state.journal
    assert journaled is not None
    await wait_for(lambda: len(journaled) == started, what="every served stream's settlement journaled")
    try:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("served while Redis was down")
    except openai.APIStatusError as err:
        assert err.status_code == 503  # fail closed: nothing new is forwarded unmetered
    await server.start()  # back from its AOF, on the same port
    await wait_for(lambda: len(journaled) == 0, timeout_s=20, what="the journal replayed")
    redis = running.state.redis
    usage = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert sorted(e["request_id"] for e in usage) == sorted(upstream.chunks_by_request)  # each once
    exact = started * (10 * Decimal("0.15") + 30 * Decimal("0.60"))  # 19.5 micro-USD each
    view = await running.balance("acme")
    charged = sum(-int(e["amount"]) for e in usage)
    assert view.reserved == 0 and 10_000_000 - view.balance == charged and abs(charged - exact) <= 1
    assert not await reconcile.check_account(redis, "acme")
    # the file is compacted just after the last replayed settlement leaves memory (journal.replay)
    on_disk = running.state.config.data_dir / "journal"
    await wait_for(lambda: journal.pending_on_disk(on_disk) == 0, what="the journal file compacted")


async def test_settlements_a_restarted_redis_lost_are_settled_again(
    start_proxy: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    server = own_redis
    running = await start_proxy({"redis": {"url": server.url}})
    key = await running.account("acme", "10")
    await wait_for(lambda: running.proxy.worker is not None and running.proxy.worker.server_id is not None)
    aof = tmp_path / "redis" / "appendonlydir"
    snapshot = tmp_path / "before-the-request"
    shutil.copytree(aof, snapshot)  # what a failover to a lagging replica, or a lost AOF tail, leaves
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-metering-cost-usd"] == "0.000075"  # settled, acknowledged by Redis
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    shutil.rmtree(aof)
    shutil.copytree(snapshot, aof)
    await server.start()  # a new server (new run id) without the request's admission and settlement
    redis = running.state.redis
    usage: list[dict[str, Any]] = []
    for _ in range(300):  # the worker notices the new server within a tick or two
        usage = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
        if usage:
            break
        await asyncio.sleep(0.05)  # polling the ledger, bounded
    assert [e["request_id"] for e in usage] == [raw.headers["x-request-id"]]
    assert usage[0]["amount"] == "-75" and usage[0]["unreserved"] is True  # its admission was lost too
    view = await running.balance("acme")
    assert view.balance == 10_000_000 - 75 and view.reserved == 0
    assert not await reconcile.check_account(redis, "acme")


async def test_a_journaled_settlement_keeps_its_price_source(
    start_proxy: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis
) -> None:
    """A catalog-priced charge settled through an outage: its line on disk and the entry
    replayed from it still name the catalog that priced it."""
    from proxy.prices import CATALOG

    running = await start_proxy({"redis": {"url": own_redis.url}, "models": {"gpt-4o": {"price": "catalog"}}})
    key = await running.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.hold_after_chunks = 5, 2
    stream = asyncio.ensure_future(running.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True))  # fmt: skip
    await wait_for(upstream.holding.is_set, what="the stream held upstream")
    assert own_redis.process is not None
    own_redis.process.kill()  # Redis is gone before the stream settles
    own_redis.process.wait()
    upstream.release.set()
    assert [c async for c in await stream]
    journaled = running.state.journal
    assert journaled is not None
    await wait_for(lambda: len(journaled) == 1, what="the settlement journaled")
    (line,) = journaled.path.read_bytes().splitlines()
    assert journal._parse(line, journaled.path) == next(iter(journaled.pending.values()))  # as written, read back
    assert journal._parse(line, journaled.path).entry["price_source"] == CATALOG  # type: ignore[union-attr]
    await own_redis.start()
    await wait_for(lambda: len(journaled) == 0, timeout_s=20, what="the journal replayed")
    (entry,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert entry["price_source"] == CATALOG and entry["amount"] == "-75"  # 10 x 2.50 + 5 x 10.00 micro-USD


async def test_a_settlement_a_full_redis_refuses_waits_in_the_journal_and_is_charged_once(
    start_proxy: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis
) -> None:
    """A Redis at its maxmemory (noeviction) refuses settle.lua's writes (OOM): it cannot
    take them now, as when it is down. The client gets the whole stream, the settlement
    waits in the journal, and once Redis has room it is charged once, exactly."""
    running = await start_proxy({"redis": {"url": own_redis.url}})
    key = await running.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.hold_after_chunks = 5, 2
    stream = asyncio.ensure_future(running.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True))  # fmt: skip
    await wait_for(upstream.holding.is_set, what="the stream held upstream")
    redis = running.state.redis
    await redis.config_set("maxmemory", 1)  # full: every write refused from now on
    upstream.release.set()
    chunks = [c async for c in await stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the answer, whole
    journaled = running.state.journal
    assert journaled is not None
    await wait_for(lambda: len(journaled) == 1, what="the settlement journaled")
    await redis.config_set("maxmemory", 0)
    await wait_for(lambda: len(journaled) == 0, timeout_s=20, what="the journal replayed")
    (entry,) = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert entry["amount"] == "-75" and entry["estimated"] is False  # 10 x 2.50 + 5 x 10.00 micro-USD
    view = await running.balance("acme")
    assert view.balance == 10_000_000 - 75 and view.reserved == 0
    assert not await reconcile.check_account(redis, "acme")
