"""Redis clients whose connection pools wait for a free connection instead of failing.

redis-py's default pool raises `MaxConnectionsError` the moment all its connections are
busy, so a burst of requests got 503s with Redis healthy. Here a caller waits up to
`timeout_s` for a connection. Every checkout is observed in
`metering_proxy_redis_pool_wait_seconds`; one that finds none in time is counted in
`metering_proxy_redis_pool_exhausted_total` and raised as `MaxConnectionsError` (a
redis `ConnectionError`, so the store-unavailable 503 of `errors.REDIS_DOWN`).

redis-py's cluster client has no blocking pool (each node raises at its cap): a gate of
`size` slots bounds the commands and pipelines in flight instead. Each holds at most one
connection per node, so a node's cap of twice the gate leaves room for what passes
beside it (topology queries, a WATCH held across a transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline

from . import metrics

SIZE = 128  # connections per process (per node on a cluster); Redis allows 10,000 clients
TIMEOUT_S = 2.0  # the longest wait for a connection: a 503 still comes within ~2 s


def _exhausted(size: int, timeout_s: float) -> redis_errors.MaxConnectionsError:
    metrics.REDIS_POOL_EXHAUSTED.inc()
    return redis_errors.MaxConnectionsError(f"all {size} Redis connections stayed busy for {timeout_s} s")


class WaitingPool(BlockingConnectionPool):
    """`BlockingConnectionPool` with its waits measured and its timeout named."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis_errors.ConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # waited `timeout` for a free one
                raise _exhausted(self.max_connections, self.timeout or 0) from exc
            raise  # connecting failed: Redis itself is down
        finally:
            metrics.REDIS_POOL_WAIT_SECONDS.observe(time.perf_counter() - started)


_holding: contextvars.ContextVar[bool] = contextvars.ContextVar("holding_gate_slot", default=False)


class Gate:
    """At most `size` cluster operations in flight; the rest wait up to `timeout_s`.

    Re-entrant per task: a pipeline that retries a redirected command through the
    client (and the tasks it spawns per node) already holds its slot."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s = size, timeout_s
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if _holding.get():
            yield
            return
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise _exhausted(self.size, self.timeout_s) from None
        finally:
            metrics.REDIS_POOL_WAIT_SECONDS.observe(time.perf_counter() - started)
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)
            self._slots.release()


class GatedCluster(RedisCluster):
    """`RedisCluster` whose commands and pipelines pass through a `Gate`."""

    gate: Gate

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused by redis-py, as it should be
        return GatedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own


class GatedPipeline(ClusterPipeline):
    cluster_client: GatedCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.gate.slot():
            return await super().execute(raise_on_error, allow_redirections)


def connect(url: str, cluster: bool, size: int, timeout_s: float, **options: Any) -> Redis:
    if cluster:
        client = cast(GatedCluster, GatedCluster.from_url(url, max_connections=2 * size, **options))
        client.gate = Gate(size, timeout_s)
        return client  # type: ignore[return-value]
    return Redis.from_pool(WaitingPool.from_url(url, max_connections=size, timeout=timeout_s, **options))
