"""Redis connection pools under a burst, with Redis healthy: requests wait for a
connection (bounded, measured) instead of failing with 503 or 500."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis import exceptions as redis_errors

from proxy import errors
from proxy.app import connect
from proxy.embedded import EmbeddedRedis
from proxy.runner import LeanRunner, PoolRunner

from .conftest import Running

BURST = 400  # requests in flight at once: four times redis-py's default pool of 100
MODELS_BURST = 300
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def pool_waits() -> float:
    return REGISTRY.get_sample_value("metering_proxy_redis_pool_wait_seconds_count") or 0.0


def pool_exhausted() -> float:
    return REGISTRY.get_sample_value("metering_proxy_redis_pool_exhausted_total") or 0.0


async def fresh_keys(running: Running, count: int, account_id: str = "acme") -> list[str]:
    """One funded account with `count` keys that no proxy has cached yet."""
    keys = [await running.account(account_id, "100")]
    for _ in range(count - 1):
        _, key = await running.state.accounts.create_key(account_id, name="burst")
        keys.append(key)
    return keys


async def burst(url: str, method: str, path: str, keys: list[str], body: Any = None) -> Counter[int]:
    """Every key's request at once, each on its own connection: the statuses counted,
    and any 5xx shown whole."""
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the proxy sees them all

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(key: str) -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {key}"}
            async with session.request(method, f"{url}{path}", json=body, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        results = await asyncio.gather(*(one(key) for key in keys))
    statuses = Counter(status for status, _ in results)
    server_errors = [answer for status, answer in results if status >= 500]
    assert not server_errors, f"{statuses}; first: {server_errors[0]}"
    return statuses


async def test_first_requests_on_many_fresh_keys_all_pass(proxy: Running) -> None:
    keys = await fresh_keys(proxy, BURST)
    waits_before, exhausted_before = pool_waits(), pool_exhausted()
    statuses = await burst(proxy.url, "POST", "/v1/chat/completions", keys, CHAT)
    assert statuses == {200: BURST}
    assert pool_waits() >= waits_before + BURST  # every checkout is measured (a key lookup each)
    assert pool_exhausted() == exhausted_before


async def test_models_burst_never_500s(proxy: Running) -> None:
    keys = await fresh_keys(proxy, MODELS_BURST)
    statuses = await burst(proxy.url, "GET", "/v1/models", keys)
    assert statuses == {200: MODELS_BURST}


async def test_burst_on_the_redis_py_path_alone(proxy: Running) -> None:
    """The path Redis Cluster and rediss:// take: no lean client, every call on the pool."""
    ledger = proxy.state.ledger
    assert ledger.fast is not None and isinstance(ledger.runner, LeanRunner)
    await ledger.fast.aclose()
    ledger.fast, ledger.runner = None, PoolRunner(ledger.redis)
    keys = await fresh_keys(proxy, BURST)
    statuses = await burst(proxy.url, "POST", "/v1/chat/completions", keys, CHAT)
    assert statuses == {200: BURST}


async def test_a_pool_that_stays_full_fails_closed(redis: Any, redis_server: EmbeddedRedis) -> None:
    client = connect(redis_server.url, size=1, pool_timeout_s=0.2)
    try:
        held = await client.connection_pool.get_connection()  # the only connection, checked out
        exhausted_before = pool_exhausted()
        with pytest.raises(redis_errors.MaxConnectionsError) as caught:
            await client.get("k")
        assert isinstance(caught.value, errors.REDIS_DOWN)  # the 503 family
        assert pool_exhausted() == exhausted_before + 1
        await client.connection_pool.release(held)
        assert await client.get("k") is None  # the wait ends as soon as one is free
    finally:
        await client.aclose()
