"""Redis connection pools under a burst, with Redis healthy: requests wait for a
connection (bounded, measured) instead of failing with 503 or 500."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis import exceptions as redis_errors

from proxy import errors
from proxy.app import connect
from proxy.embedded import EmbeddedRedis
from proxy.runner import LeanRunner, PoolRunner

from .conftest import Running
from .helpers import BURST, CHAT, MODELS_BURST, burst, fresh_keys


def pool_waits() -> float:
    return REGISTRY.get_sample_value("metering_proxy_redis_pool_wait_seconds_count") or 0.0


def pool_exhausted() -> float:
    return REGISTRY.get_sample_value("metering_proxy_redis_pool_exhausted_total") or 0.0


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
