"""Background work any instance may do: reap lapsed reservations, drain webhook outboxes.

Accounts that need a visit sit in sharded watch sets (keyspace.watch_shard), scored by
when: admission registers every reservation's expiry there in the same round trip, and
scripts that raise events ask for an immediate visit. Visiting twice is harmless: the
reap script is atomic and idempotent, and moving a pointer is a compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import cast

import structlog
from redis import exceptions as redis_errors
from redis.exceptions import RedisError

from . import errors, keyspace
from .journal import Journal
from .ledger import Ledger
from .scripts import SCRIPTS

log = structlog.get_logger("proxy.worker")
Deliver = Callable[[str], Awaitable[int]]  # account id -> ms until its next retry (0: none)
# After Redis comes back, nothing is reaped for this long: every proxy that journaled
# settlements during the outage replays them first (a journaled settlement is charged
# in full, not left to the reaper's checkpoint estimate).
REAP_GRACE_S = 10.0


class Worker:
    def __init__(
        self, ledger: Ledger, deliver: Deliver | None = None, interval_s: float = 1.0, journal: Journal | None = None
    ) -> None:
        self.ledger = ledger
        self.deliver = deliver
        self.interval_s = interval_s
        self.journal = journal
        self.stopping = asyncio.Event()
        self.store_down = False
        self.server_id: str | None = None  # the Redis run id last seen
        self.reap_after = 0.0  # monotonic s: no reaping before (REAP_GRACE_S after an outage)

    async def run(self) -> None:
        """Tick until `stop()`. Stopping is an event, not a cancellation: a client library
        that turns a cancellation into its own error would otherwise keep us looping."""
        while not self.stopping.is_set():
            try:
                await self.tick()
                if self.store_down:
                    self.store_down = False
                    self.reap_after = time.monotonic() + REAP_GRACE_S
            except (errors.StoreUnavailable, RedisError) as exc:
                self.store_down = True
                log.warning("worker_store_unavailable", error=type(exc).__name__)
            except Exception:
                log.exception("worker_tick_failed")
            with contextlib.suppress(TimeoutError):  # the poll period, cut short by stop()
                await asyncio.wait_for(self.stopping.wait(), self.interval_s)

    def stop(self) -> None:
        self.stopping.set()

    async def tick(self) -> int:
        """Replay the journal, then visit every due account once; returns how many were visited."""
        if self.ledger.tier_generation == 0:  # Redis was away when the config was loaded
            await self.ledger.claim_tier_generation()
        await self._notice_new_server()
        if self.journal is not None and not await self.journal.replay(self.ledger.settle):
            raise errors.StoreUnavailable("journaled settlements still wait for Redis")
        visited = 0
        for shard in range(keyspace.WATCH_SHARDS):
            due = await self.due_accounts(shard)
            # accounts in parallel: one slow webhook receiver must not hold up the rest
            await asyncio.gather(*(self.visit(account_id, seen) for account_id, seen in due))
            visited += len(due)
        return visited

    async def visit(self, account_id: str, seen: float) -> None:
        spared = self.journal.holds(account_id) if self.journal is not None else ()
        reaping = time.monotonic() >= self.reap_after
        reaped = await self.ledger.reap(account_id, reaping=reaping, spared=spared)
        released, next_expiry, outbox = reaped.closed, reaped.next_expiry_ms, reaped.outbox
        if not reaping and next_expiry:  # come back once the grace is over
            next_expiry = min(next_expiry, self._now_ms() + int(REAP_GRACE_S * 1000))
        if released:
            log.warning("reservations_released", account_id=account_id, count=released)
        retry_at = 0
        if outbox and self.deliver is not None:
            retry_at = await self.deliver(account_id)
        candidates = [t for t in (next_expiry, retry_at) if t]
        next_visit = min(candidates) if candidates else 0
        removed = await self.reschedule(account_id, seen, next_visit) and next_visit == 0
        if removed and await self.ledger.outbox_length(account_id):
            await self.ledger.watch(account_id, 0)  # an event landed after our look: come back

    # -- the watch sets: which account is due a visit, and when next --------------------

    async def due_accounts(self, shard: int, limit: int = 100) -> list[tuple[str, float]]:
        now = int(time.time() * 1000) + self.ledger.clock_offset_ms
        shard_key = keyspace.watch_shard_n(shard)
        rows = cast(
            list[tuple[str, float]], await self.ledger.redis.zrangebyscore(shard_key, "-inf", now, 0, limit, True)
        )
        return [(str(account), float(score)) for account, score in rows]

    async def reschedule(self, account_id: str, seen: float, next_ms: int) -> bool:
        """Move the account's watch pointer unless it changed since `seen` was read."""
        key = keyspace.watch_shard(account_id)
        args = (account_id, repr(seen), next_ms)
        watch = SCRIPTS["watch"]
        try:
            changed = await self.ledger.redis.evalsha(watch.sha, 1, key, *args)
        except redis_errors.NoScriptError:
            await self.ledger.redis.script_load(watch.source)
            changed = await self.ledger.redis.evalsha(watch.sha, 1, key, *args)
        return bool(changed)

    async def _notice_new_server(self) -> None:
        """A Redis that restarted from its AOF, or a replica promoted in a failover, may have
        lost the last seconds of writes: settle what it acknowledged lately again."""
        server_id = await self.ledger.server_id()
        if server_id is None:
            return
        if self.server_id is not None and server_id != self.server_id and self.journal is not None:
            count = await self.journal.requeue_recent()
            log.warning("redis_server_changed", resettling=count, note="recent settlements are settled again")
        self.server_id = server_id

    def _now_ms(self) -> int:
        return int(time.time() * 1000) + self.ledger.clock_offset_ms
