"""The store-wide gauges, read from Redis when /metrics is scraped.

Webhook outboxes and dead letters are per account, and the worker's watch sets say
which accounts wait for a visit; no script keeps a global count (it would leave the
account's slot on a cluster). So a scrape reads them: the earliest dated visit of each
watch shard (how overdue the worker is), the outbox length of the accounts waiting in them (the lowest
`MAX_ACCOUNTS_PER_SHARD` of each shard, so past that the backlog is a lower bound) and
the dead-letter lists of the accounts in `keyspace.DEAD_LETTERS`. Every instance reports
the same values: aggregate them with `max`, not `sum`.

One refresh at a time, at most one per `MIN_INTERVAL_S` per process whoever scrapes
(/metrics needs no token), bounded by `TIMEOUT_S`; when Redis does not answer the last
values stay and the scrape still succeeds (the Redis error metrics say why).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from . import errors, keyspace, metrics
from .state import State

log = structlog.get_logger("proxy.gauges")
MIN_INTERVAL_S = 1.0
TIMEOUT_S = 2.0
MAX_ACCOUNTS_PER_SHARD = 1000


class StoreGauges:
    def __init__(self) -> None:
        self._last = float("-inf")
        self._running: asyncio.Task[None] | None = None

    async def refresh(self, state: State) -> None:
        """Bring the gauges up to date; concurrent scrapes share one read."""
        if self._running is None or self._running.done():
            if time.monotonic() - self._last < MIN_INTERVAL_S:
                return
            self._last = time.monotonic()
            self._running = asyncio.ensure_future(self._bounded(state))
        await asyncio.shield(self._running)

    async def _bounded(self, state: State) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await read(state)
        except errors.STORE_DOWN + (TimeoutError,) as exc:
            log.info("store_gauges_unread", error=type(exc).__name__)


async def read(state: State) -> None:
    redis, now_ms = state.redis, time.time() * 1000 + state.ledger.clock_offset_ms
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keyspace.WATCH_SHARDS):
            key = keyspace.watch_shard_n(shard)
            pipe.zrange(key, 0, MAX_ACCOUNTS_PER_SHARD - 1)
            # score 0 asks for a visit at once and says nothing of since when: the lag is
            # read from the earliest dated visit (a reservation's expiry, a retry's time)
            pipe.zrangebyscore(key, "(0", "+inf", start=0, num=1, withscores=True)
        pipe.smembers(keyspace.DEAD_LETTERS)
        *shards, dead = await pipe.execute()
    waiting = [str(account) for members in shards[0::2] for account in members]
    earliest = [rows[0][1] for rows in shards[1::2] if rows]
    overdue_ms = max([0.0, *(now_ms - due for due in earliest)])
    metrics.WEBHOOK_OUTBOX.set(await _lengths(state, [keyspace.outbox(a) for a in waiting]))
    metrics.WEBHOOK_DEAD_LETTERS.set(await _lengths(state, [keyspace.dead_letters(str(a)) for a in dead]))
    metrics.WORKER_OVERDUE_SECONDS.set(overdue_ms / 1000)


async def _lengths(state: State, lists: list[str]) -> int:
    """Sum of LLENs, pipelined (a cluster pipeline sends each to its node)."""
    if not lists:
        return 0
    async with state.redis.pipeline(transaction=False) as pipe:
        for key in lists:
            pipe.llen(key)
        return sum(int(n) for n in await pipe.execute())
