"""Test helpers that synchronise on real state (Redis streams), never on sleeps."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from proxy import keyspace


async def last_entry_id(redis: Redis, account_id: str) -> str:
    rows = await redis.xrevrange(keyspace.account(account_id, "ledger"), count=1)
    return str(rows[0][0]) if rows else "0-0"


async def next_entry(redis: Redis, account_id: str, after: str, timeout_s: float = 10) -> dict[str, Any]:
    """Block until the account's ledger gets an entry after `after` (XREAD BLOCK)."""
    key = keyspace.account(account_id, "ledger")
    rows = None
    for _ in range(max(1, int(timeout_s / 1.5))):  # blocks of 1.5 s: the client's socket timeout is 2 s
        rows = await redis.xread({key: after}, count=1, block=1500)
        if rows:
            break
    assert rows, f"no ledger entry for {account_id} within {timeout_s}s"
    entry: dict[str, Any] = orjson.loads(rows[0][1][0][1]["e"])
    return entry


async def entries(redis: Redis, account_id: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(keyspace.account(account_id, "ledger"))
    return [orjson.loads(fields["e"]) for _, fields in rows]
