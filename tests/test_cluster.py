"""The proxy unchanged on a real 3-master Redis Cluster (`redis.cluster: true`).

Three accounts whose hash tags land on three different masters go through the metered
path (openai SDK -> proxy -> fake upstream), the admin API, the reaper, webhook
delivery, reconcile and the CLI. Watch shards and global keys land where they hash.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import openai
import orjson
import pytest
import yaml
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from proxy import gauges, keyspace
from proxy.app import Proxy, connect
from proxy.cli import main as cli_main
from proxy.configfile import parse_config
from proxy.ledger import GrantSpec
from proxy.pool import GatedCluster
from proxy.reconcile import reconcile
from proxy.scripts import SCRIPTS
from proxy.testing.upstream import DemoUpstream
from proxy.webhooks import Webhooks, list_dead, replay_dead
from proxy.worker import Worker

from .cluster import LocalCluster, redis_cluster  # noqa: F401  (the session fixture)
from .conftest import BASE_CONFIG, Running, deep_merge
from .helpers import BURST, CHAT, Receiver, burst, entries, fresh_keys, hook_config, pause_background_worker, scrape

# slots of {gamma}, {delta}, {acme}: 2469, 9053, 11304 -> one account on each master
ACCOUNTS = ("gamma", "delta", "acme")
MESSAGES = [{"role": "user", "content": "hello"}]
PLANS = {"pro": {"overage": {"limit_usd": None}}}
StartProxy = Callable[..., Awaitable[Running]]


@pytest.fixture
async def cluster_redis(redis_cluster: LocalCluster) -> AsyncIterator[Redis]:  # noqa: F811
    client = connect(redis_cluster.url, cluster=True)
    await client.flushall()  # every primary
    await client.script_flush()  # every primary: the first call of each script meets NOSCRIPT
    yield client
    await client.aclose()


def cluster_config(cluster: LocalCluster, upstream: DemoUpstream, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data = deep_merge(BASE_CONFIG, {"redis": {"url": cluster.url, "cluster": True},
                                    "data_dir": str(tmp_path / "data"),
                                    "upstreams": {"openai": {"base_url": upstream.base_url}}})  # fmt: skip
    return deep_merge(data, extra)


@pytest.fixture
async def start_cluster_proxy(
    redis_cluster: LocalCluster,  # noqa: F811
    cluster_redis: Redis,
    upstream: DemoUpstream,
    tmp_path: Path,
) -> AsyncIterator[StartProxy]:
    started: list[Proxy] = []

    async def start(extra: dict[str, Any] | None = None, cluster: LocalCluster | None = None) -> Running:
        data = cluster_config(cluster or redis_cluster, upstream, tmp_path, **(extra or {}))
        config = parse_config(yaml.safe_dump(data))
        proxy = Proxy(config)
        started.append(proxy)
        state = await proxy.start()
        assert state.ledger.fast is None  # the lean client is for a single Redis only
        return Running(proxy, state, f"http://127.0.0.1:{proxy.ports['client']}",
                       f"http://127.0.0.1:{proxy.ports['admin']}")  # fmt: skip

    yield start
    for proxy in started:
        await asyncio.wait_for(proxy.stop(), 30)


async def open_accounts(running: Running, usd: str = "10") -> dict[str, str]:
    return {account_id: await running.account(account_id, usd) for account_id in ACCOUNTS}


async def test_cluster_has_three_masters_and_the_accounts_one_each(
    redis_cluster: LocalCluster,  # noqa: F811
    cluster_redis: Redis,
) -> None:
    cluster = cast(RedisCluster, cluster_redis)
    await cluster.initialize()
    assert len(cluster.get_primaries()) == 3
    homes = {cluster.get_node_from_key(keyspace.account(a, "acct")).port for a in ACCOUNTS}
    assert homes == set(redis_cluster.ports)
    for account_id in ACCOUNTS:  # every key of an account in one slot
        slots = {cluster.keyslot(key) for key in keyspace.account_keys(account_id, "gpt-4o", SCRIPTS["admit"].keys)}
        assert len(slots) == 1


async def test_admin_api_accounts_keys_and_idempotent_grants(
    start_cluster_proxy: StartProxy, upstream: DemoUpstream
) -> None:
    running = await start_cluster_proxy()
    for account_id in ACCOUNTS:
        status, _ = await running.admin("POST", "/admin/v1/accounts", {"id": account_id})
        assert status == 201
        status, key = await running.admin("POST", f"/admin/v1/accounts/{account_id}/keys", {"name": "ci"})
        assert status == 201
        credits = {"amount_usd": "10", "kind": "paid", "idempotency_key": f"order-{account_id}"}
        path = f"/admin/v1/accounts/{account_id}/credits"
        status, first = await running.admin("POST", path, credits)
        assert status == 201 and first["amount_usd"] == "10.000000"
        status, again = await running.admin("POST", path, credits)  # the retry grants nothing
        assert status == 200 and again == first
        created, grant = await running.state.ledger.grant(  # and the same through the ledger
            account_id, GrantSpec("paid", 10_000_000, idem=f"order-{account_id}")
        )
        assert not created and grant["id"] == first["id"]
        await running.client(key["key"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        status, balance = await running.admin("GET", f"/admin/v1/accounts/{account_id}/balance")
        assert status == 200 and len(balance["grants"]) == 1 and balance["reserved_usd"] == "0.000000"
    status, listed = await running.admin("GET", "/admin/v1/accounts?limit=200")
    assert status == 200 and sorted(a["id"] for a in listed["data"]) == sorted(ACCOUNTS)


async def test_metered_chat_exact_cost_on_every_master(start_cluster_proxy: StartProxy, upstream: DemoUpstream) -> None:
    running = await start_cluster_proxy()
    keys = await open_accounts(running)
    for account_id, key in keys.items():
        upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 1000, 400, 7
        raw = await running.client(key).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=50
        )
        # (1000 - 400) * 2.50 + 400 * 1.25 + 7 * 10.00 micro-USD
        assert raw.headers["x-metering-cost-usd"] == "0.002070"
        assert raw.headers["x-metering-balance-usd"] == "9.997930"
        upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 100, 0, 6
        stream = await running.client(key).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert [c.usage.completion_tokens for c in chunks if c.usage is not None] == [6]
        assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["cost_usd"] == "0.000310"
        usage = [e for e in await entries(running.state.redis, account_id) if e["type"] == "usage"]
        assert [e["amount"] for e in usage] == ["-2070", "-310"]  # 100 * 2.50 + 6 * 10.00
        found = await running.client(key).get(  # the settled marker and its entry, in the account's slot
            "/generation", cast_to=object, options={"params": {"id": raw.headers["x-request-id"]}}
        )
        assert (found["status"], found["cost_usd"]) == ("settled", "0.002070")
        view = await running.balance(account_id)
        assert view.balance == 10_000_000 - 2070 - 310 and view.reserved == 0
    assert await reconcile(running.state.redis, running.state.config) == []


async def test_a_burst_of_fresh_keys_waits_for_connections(start_cluster_proxy: StartProxy) -> None:
    """Their key lookups and admissions queue at the client's gate: redis-py's cluster
    nodes raise MaxConnectionsError at 100 busy connections."""
    running = await start_cluster_proxy()
    keys = await fresh_keys(running, BURST)
    assert await burst(running.url, "POST", "/v1/chat/completions", keys, CHAT) == {200: BURST}


async def test_the_cluster_gate_waits_then_fails_closed(redis_cluster: LocalCluster) -> None:  # noqa: F811
    client = connect(redis_cluster.url, cluster=True, size=1, pool_timeout_s=0.2)
    gate = cast(GatedCluster, client).gate
    held, done = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with gate.slot():
            held.set()
            await done.wait()

    holder = asyncio.create_task(hold())
    try:
        await held.wait()
        with pytest.raises(redis_errors.MaxConnectionsError):
            await client.get("k")
        done.set()
        await holder
        pipe = client.pipeline(transaction=False)
        for account_id in ACCOUNTS:  # three nodes, one pipeline: one slot of the gate
            pipe.exists(keyspace.account(account_id, "nothing"))
        assert await pipe.execute() == [0, 0, 0]
    finally:
        done.set()
        await client.aclose()


async def test_402_and_rate_limit_429(start_cluster_proxy: StartProxy, upstream: DemoUpstream) -> None:
    tiers = {"basis": "paid", "tiers": [{"name": "free", "min_usd": "0", "rpm": 1, "tpm": 1_000_000}]}
    running = await start_cluster_proxy({"rate_tiers": tiers})
    poor = await running.account("gamma", "0.001")
    with pytest.raises(openai.APIStatusError) as broke:  # reserves 1000 output tokens * $10/1M = $0.01
        await running.client(poor).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert broke.value.status_code == 402 and broke.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    for account_id in ("delta", "acme"):
        client = running.client(await running.account(account_id, "10"))
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
        assert limited.value.body["type"] == "requests"  # type: ignore[index]
        assert int(limited.value.response.headers["retry-after-ms"]) > 0
    assert len(upstream.requests) == 2
    assert (await running.balance("gamma")).reserved == 0


async def test_a_keys_limit_rate_and_figures_on_every_master(start_cluster_proxy: StartProxy) -> None:
    running = await start_cluster_proxy()
    for account_id in ACCOUNTS:
        await running.account(account_id, "10")
        settings = {"limit_usd": "0.000100", "limit_reset": "daily", "rate_limits": {"rpm": 5}}
        status, key = await running.admin("POST", f"/admin/v1/accounts/{account_id}/keys", settings)
        assert status == 201, key
        client = running.client(key["key"])  # gpt-4o, 5 tokens: reserves ~$0.00009, charges $0.000075
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
        with pytest.raises(openai.APIStatusError) as capped:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
        assert capped.value.body["code"] == "key_limit_exceeded"  # type: ignore[index]
        info = cast(dict[str, Any], await client.get("/key", cast_to=object))
        assert info["usage_usd"]["daily"] == "0.000075" and info["limit_remaining_usd"] == "0.000025"
        status, patched = await running.admin("PATCH", f"/admin/v1/keys/{key['id']}", {"limit_usd": None})
        assert status == 200 and patched["limit_usd"] is None
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert await reconcile(running.state.redis, running.state.config) == []


async def test_reaper_releases_lapsed_reservations(start_cluster_proxy: StartProxy) -> None:
    running = await start_cluster_proxy()
    await pause_background_worker(running)
    ledger = running.state.ledger
    for account_id in ACCOUNTS:
        await running.account(account_id, "10")
        key, _ = await running.state.key_store.create_key(account_id)
        admission = await ledger.admit(account_id, key.key_id, "gpt-4o", "req_" + secrets.token_hex(6),
                                       prompt_cost=1_000_000, output_cost=0, output_pico=0, prompt_tokens=1,
                                       max_output_tokens=0, choices=1)  # fmt: skip
        assert admission.reserved == 1_000_000
    assert await Worker(ledger).tick() == 0  # not lapsed yet
    ledger.clock_offset_ms = (running.state.config.billing.reservation_ttl_s + 1) * 1000
    assert await Worker(ledger).tick() == len(ACCOUNTS)
    for account_id in ACCOUNTS:
        view = await ledger.touch(account_id)
        assert view.reserved == 0 and view.balance == 10_000_000
        assert (await entries(running.state.redis, account_id))[-1]["type"] == "release"
        assert await running.state.redis.zscore(keyspace.watch_shard(account_id), account_id) is None
    assert await reconcile(running.state.redis, running.state.config) == []


async def test_webhooks_retry_dead_letter_and_replay(
    start_cluster_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gauges, "MIN_INTERVAL_S", 0.0)  # every scrape reads the cluster
    receiver = Receiver()
    await receiver.start()
    webhooks: Webhooks | None = None
    try:
        running = await start_cluster_proxy(hook_config(receiver, max_attempts=2))
        await pause_background_worker(running)
        webhooks = Webhooks(running.state, backoff=lambda tries: 0)
        worker = Worker(running.state.ledger, webhooks.deliver)
        redis = running.state.redis
        receiver.fail_next = 1  # one retry (a WATCH/MULTI head swap) for one of the accounts
        await open_accounts(running)
        samples = await scrape(running.admin_url)  # the store-wide gauges, read across the masters
        assert samples["metering_proxy_webhook_outbox_events"] == [({}, len(ACCOUNTS))]
        await drain_all(worker, redis)
        granted = receiver.delivered("credits.granted")
        assert sorted(b["data"]["account_id"] for b in granted) == sorted(ACCOUNTS)
        assert receiver.bad_signatures == 0 and len(receiver.attempts) == len(ACCOUNTS) + 1

        receiver.fail_next = 2  # both attempts fail: the event goes to the dead letters
        await running.fund("delta", "1")
        await drain_all(worker, redis)
        [dead] = await list_dead(redis)
        assert dead["account_id"] == "delta" and dead["tries"] == 2
        samples = await scrape(running.admin_url)
        assert samples["metering_proxy_webhook_dead_letters"] == [({}, 1)]
        assert samples["metering_proxy_webhook_outbox_events"] == [({}, 0)]
        assert await replay_dead(running.state.ledger) == 1
        await drain_all(worker, redis)
        assert await list_dead(redis) == []
        assert len(receiver.delivered("credits.granted")) == len(ACCOUNTS) + 1
        for account_id in ACCOUNTS:
            assert not await redis.exists(keyspace.delivery_lease(account_id))
            assert await redis.zscore(keyspace.watch_shard(account_id), account_id) is None
    finally:
        if webhooks is not None:
            await webhooks.close()
        await receiver.stop()


async def drain_all(worker: Worker, redis: Redis, max_ticks: int = 10) -> None:
    for _ in range(max_ticks):
        await worker.tick()
        if not any([await redis.llen(keyspace.outbox(a)) for a in ACCOUNTS]):
            return
    raise AssertionError("outboxes not drained")


async def test_reconcile_and_cli_on_busy_books(
    start_cluster_proxy: StartProxy,
    upstream: DemoUpstream,
    redis_cluster: LocalCluster,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = await start_cluster_proxy({"plans": PLANS})
    keys = await open_accounts(running, "1")
    ledger = running.state.ledger
    refund = await running.fund("gamma", "2")
    await ledger.void("gamma", refund["id"], "refund")
    await running.fund("delta", "0.5", kind="promotional", priority=-1)
    await ledger.save_account("acme", {"plan": "pro"}, create=False)
    for key in keys.values():
        client = running.client(key)
        await asyncio.gather(*(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
                               for _ in range(3)))  # fmt: skip
    assert await reconcile(running.state.redis, running.state.config) == []

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cluster_config(redis_cluster, upstream, tmp_path, plans=PLANS)))
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--config", str(path), "reconcile"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {len(ACCOUNTS)} accounts"
    assert await asyncio.to_thread(cli_main, ["--config", str(path), "ledger", "list", "acme", "--json"]) == 0
    page = orjson.loads(capsys.readouterr().out)
    assert [e["type"] for e in page["entries"]] == ["grant", "usage", "usage", "usage"]

    await running.state.redis.hincrby(keyspace.account("delta", "acct"), "balance", 1)
    assert await asyncio.to_thread(cli_main, ["--config", str(path), "reconcile"]) == 1
    assert "drift: delta: balance == sum(ledger amounts)" in capsys.readouterr().out


async def test_a_failed_master_fails_closed(
    start_cluster_proxy: StartProxy, upstream: DemoUpstream, tmp_path: Path
) -> None:
    cluster = LocalCluster(tmp_path / "failing", node_timeout_ms=500)  # a cluster of its own, to break
    await cluster.start()
    try:
        running = await start_cluster_proxy(cluster=cluster)
        keys = await open_accounts(running)
        for key in keys.values():
            await running.client(key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        forwarded = len(upstream.requests)
        cluster.kill_node(2)  # the master of {acme}: at once, its requests cannot be metered
        with pytest.raises(openai.APIStatusError) as down:
            await running.client(keys["acme"]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert down.value.status_code == 503
        await cluster.wait_state(0, "fail")  # failure detected: CLUSTERDOWN from the live masters too
        for account_id in ("gamma", "delta"):
            with pytest.raises(openai.APIStatusError) as down:
                await running.client(keys[account_id]).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert down.value.status_code == 503
            assert down.value.body["code"] == "metering_unavailable"  # type: ignore[index]
        status, _ = await running.admin("GET", "/admin/v1/accounts/gamma/balance")
        assert status == 503
        status, body = await running.admin("GET", "/readyz")
        assert status == 503 and body["redis"] == "cluster_down"
        assert len(upstream.requests) == forwarded  # nothing forwarded that could not be metered
    finally:
        cluster.stop()
