"""Background work any instance may do: reap lapsed reservations, drain webhook outboxes.

Accounts that need a visit sit in sharded watch sets (keyspace.watch_shard), scored by
when: admission registers every reservation's expiry there in the same round trip, and
scripts that raise events ask for an immediate visit. Visiting twice is harmless: the
reap script is atomic and idempotent, and moving a pointer is a compare-and-set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from . import errors, keyspace
from .ledger import Ledger

log = structlog.get_logger("proxy.worker")
Deliver = Callable[[str], Awaitable[int]]  # account id -> ms until its next retry (0: none)


class Worker:
    def __init__(self, ledger: Ledger, deliver: Deliver | None = None, interval_s: float = 1.0) -> None:
        self.ledger = ledger
        self.deliver = deliver
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except (errors.StoreUnavailable, RedisError) as exc:
                log.warning("worker_store_unavailable", error=type(exc).__name__)
            except Exception:
                log.exception("worker_tick_failed")
            await asyncio.sleep(self.interval_s)  # a poll period, not a synchronisation

    async def tick(self) -> int:
        """Visit every due account once; returns how many were visited."""
        visited = 0
        for shard in range(keyspace.WATCH_SHARDS):
            for account_id, seen in await self.ledger.due_accounts(shard):
                await self.visit(account_id, seen)
                visited += 1
        return visited

    async def visit(self, account_id: str, seen: float) -> None:
        released, next_expiry, outbox = await self.ledger.reap(account_id)
        if released:
            log.warning("reservations_released", account_id=account_id, count=released)
        retry_at = 0
        if outbox and self.deliver is not None:
            retry_at = await self.deliver(account_id)
        candidates = [t for t in (next_expiry, retry_at) if t]
        await self.ledger.reschedule(account_id, seen, min(candidates) if candidates else 0)
