"""redis.durable_admin_writes: a grant, void or adjustment is answered 2xx only once Redis
confirms it on disk (WAITAOF, Redis >= 7.2 / Valkey); else 503 `write_not_durable`, and
a retry with the same idempotency key applies it once. On a Redis without WAITAOF (CI's
second pass, Redis 7.0) only a server that fsyncs every write can confirm one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from proxy import keyspace
from proxy.embedded import EmbeddedRedis

from .conftest import Running
from .helpers import suite_server

GRANT = {"amount_usd": "5", "kind": "paid", "idempotency_key": "pi_durable_1"}


async def has_waitaof(redis: Redis) -> bool:
    try:
        await redis.execute_command("WAITAOF", 0, 0, 1)
    except redis_errors.ResponseError:
        return False
    return True


async def durable_proxy(start_proxy: Any, tmp_path: Path, **redis_args: Any) -> tuple[Running, EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", binary=suite_server())  # everysec, the embedded default
    await server.start()
    running = await start_proxy({"redis": {"url": server.url, "durable_admin_writes": True, **redis_args}})
    await running.state.ledger.save_account("acme", {}, create=True)
    return running, server


async def test_grants_voids_and_adjustments_wait_for_the_disk(start_proxy: Any, tmp_path: Path) -> None:
    running, server = await durable_proxy(start_proxy, tmp_path)
    try:
        redis = running.state.redis
        status, body = await running.admin("POST", "/admin/v1/accounts/acme/credits", GRANT)
        if not await has_waitaof(redis):  # Redis 7.0, everysec: refused before anything is written
            assert status == 503 and body["error"]["code"] == "write_not_durable", body
            assert "no WAITAOF" in body["error"]["message"]
            assert not await redis.hlen(keyspace.account("acme", "grants"))
            return
        assert status == 201, body
        barriers = int(await redis.get(keyspace.DURABLE_BARRIER))  # the barrier ran with the write
        status, voided = await running.admin("POST", f"/admin/v1/accounts/acme/credits/{body['id']}/void",
                                             {"reason": "refund"})  # fmt: skip
        assert status == 200 and voided["status"] == "voided", voided
        assert int(await redis.get(keyspace.DURABLE_BARRIER)) > barriers
        assert (await running.balance("acme")).balance == 0
    finally:
        server.stop()


async def test_an_unconfirmed_write_is_a_503_and_its_retry_applies_once(start_proxy: Any, tmp_path: Path) -> None:
    running, server = await durable_proxy(start_proxy, tmp_path)
    try:
        redis = running.state.redis
        await redis.config_set("appendonly", "no")  # nothing can reach the disk now
        status, body = await running.admin("POST", "/admin/v1/accounts/acme/credits", GRANT)
        assert status == 503 and body["error"]["code"] == "write_not_durable", body
        await redis.config_set("appendfsync", "always")  # enough without WAITAOF
        await redis.config_set("appendonly", "yes")
        await aof_on(redis)
        status, body = await running.admin("POST", "/admin/v1/accounts/acme/credits", GRANT)
        assert status in (200, 201), body  # 200: the first attempt's grant, now confirmed
        assert await redis.hlen(keyspace.account("acme", "grants")) == 1
        assert (await running.balance("acme")).balance == 5_000_000
    finally:
        server.stop()


async def aof_on(redis: Redis, timeout_s: float = 20) -> None:
    """Until the AOF switched on has been written (its rewrite done): polled, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        info = await redis.info("persistence")
        if info["aof_enabled"] and not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        assert asyncio.get_running_loop().time() < deadline, f"AOF not on within {timeout_s}s"
        await asyncio.sleep(0.05)  # polling Redis, bounded
