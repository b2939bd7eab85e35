"""Reconcile proves the ledger invariants on real traffic, and names every drift."""

from __future__ import annotations

import asyncio
import secrets
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy import keyspace
from proxy.cli import main
from proxy.ledger import Ledger, SettleCall
from proxy.reconcile import reconcile
from proxy.testing.upstream import DemoUpstream

from .conftest import BASE_CONFIG, Running, deep_merge

PLANS = {"plans": {"pro": {"overage": {"limit_usd": None}}}}


async def run_cli(running: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    assert running.state.config.redis is not None
    path = tmp_path / "config.yaml"
    redis = {"url": running.state.config.redis.url.get_secret_value()}
    path.write_text(yaml.safe_dump(deep_merge(BASE_CONFIG, {**PLANS, "redis": redis})))
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--config", str(path), *argv])
    return code, capsys.readouterr().out


async def admit(ledger: Ledger, account: str, micro: int) -> str:
    request_id = "req_" + secrets.token_hex(6)
    await ledger.admit(account, "key_test", "gpt-4o", request_id, prompt_cost=micro, output_cost=0, output_pico=0,
                       prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
    return request_id


async def settle(ledger: Ledger, account: str, request_id: str, micro: int) -> None:
    usage = {"input_tokens": 1, "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    await ledger.settle(
        SettleCall(account, "gpt-4o", request_id, Decimal(micro), 1, {"model": "gpt-4o", "usage": usage})
    )


async def busy_books(running: Running, upstream: DemoUpstream) -> None:
    """Two accounts with metered traffic, expiring and voided grants, and overage debt."""
    ledger = running.state.ledger
    key = await running.account("acme", "1")
    await running.fund("acme", "0.5", kind="promotional", expires_at=0, priority=-1)
    refund = await running.fund("acme", "2")
    await ledger.void("acme", refund["id"], "refund")
    client = running.client(key)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4o"):
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=20)
    await running.account("beta", None, plan="pro")
    await running.state.redis.hset(keyspace.account("beta", "keys"), "key_test", "active")
    await settle(ledger, "beta", await admit(ledger, "beta", 0), 300_000)  # into overage debt
    await running.fund("beta", "0.1")  # pays part of the debt at activation


async def test_healthy_books_reconcile(start_proxy: Any, upstream: DemoUpstream, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    running = await start_proxy(PLANS)
    await busy_books(running, upstream)
    assert await reconcile(running.state.redis, running.state.config) == []
    code, out = await run_cli(running, tmp_path, capsys, "reconcile")
    assert code == 0 and out.strip() == "ok: 2 accounts"


async def test_corrupted_balance_names_the_account(start_proxy: Any, upstream: DemoUpstream, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    running = await start_proxy(PLANS)
    await busy_books(running, upstream)
    await running.state.redis.hincrby(keyspace.account("beta", "acct"), "balance", 1)
    code, out = await run_cli(running, tmp_path, capsys, "reconcile")
    assert code == 1
    assert "drift: beta: balance == sum(ledger amounts): expected -0.200000, found -0.199999" in out
    assert "acme" not in out


async def test_each_invariant_is_checked(proxy: Running) -> None:
    redis, ledger = proxy.state.redis, proxy.state.ledger
    await proxy.account("acme", "5")
    await redis.hset(keyspace.account("acme", "keys"), "key_test", "active")
    request_id = await admit(ledger, "acme", 1_000_000)
    assert await reconcile(redis, proxy.state.config) == []  # an open reservation is fine

    await redis.hincrby(keyspace.account("acme", "acct"), "reserved", -1)
    await redis.hset(keyspace.account("acme", "acct"), "held", "3")
    (grant,) = await redis.hvals(keyspace.account("acme", "grants"))
    broken = {**orjson.loads(grant), "remaining": "4000000"}
    await redis.hset(keyspace.account("acme", "grants"), broken["id"], orjson.dumps(broken))
    await redis.srem(keyspace.account("acme", "live"), broken["id"])
    await redis.sadd(keyspace.ACCOUNTS, "ghost")
    await redis.hincrby(keyspace.account("acme", "kuse"), "r:key_test", 1)
    await redis.hset(keyspace.account("acme", "kuse"), "u:key_test", orjson.dumps({"t": "5"}))
    drifts = await reconcile(redis, proxy.state.config)
    assert {d.check for d in drifts if d.check.startswith("key ")} == {
        "key key_test: reserved == sum(its open reservations)",
        "key key_test: spent == sum(its ledger charges)",
    }
    checks = {(d.account_id, d.check.split(":")[0]) for d in drifts if not d.check.startswith("key ")}
    assert checks == {
        ("acme", "reserved == sum(open reservations)"),
        ("acme", "held == sum(expiring grant remaining)"),
        ("acme", "balance == sum(live grant remaining) - debt"),
        ("acme", f"grant {broken['id']}"),
        ("acme", "live set == pending/active/expiring grants"),
        ("ghost", "account"),
    }
    await settle(ledger, "acme", request_id, 1)


async def test_expiring_grant_and_reaped_reservation_stay_balanced(proxy: Running) -> None:
    redis, ledger = proxy.state.redis, proxy.state.ledger
    await proxy.account("acme", "1")
    await redis.hset(keyspace.account("acme", "keys"), "key_test", "active")
    await proxy.fund("acme", "2", kind="promotional", expires_at=_ms_from_now(60_000))
    request_id = await admit(ledger, "acme", 1_500_000)
    ledger.clock_offset_ms = 120_000  # the promotion lapses while the request is open
    view = await ledger.touch("acme")
    assert {g["status"] for g in view.grants} == {"active", "expiring"} and view.num("held") > 0
    assert await reconcile(redis, proxy.state.config) == []
    ledger.clock_offset_ms = 2_000_000  # past the reservation TTL: the reaper releases it
    released = (await ledger.reap("acme")).closed
    assert released == 1 and await reconcile(redis, proxy.state.config) == []
    await settle(ledger, "acme", request_id, 1_200_000)  # the late settlement still charges once
    await ledger.touch("acme")
    assert await reconcile(redis, proxy.state.config) == []


def _ms_from_now(delta: int) -> int:
    return int(time.time() * 1000) + delta
