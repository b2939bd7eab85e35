"""The credit ledger's worked examples, on a real Redis through the Lua scripts."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import openai
import pytest

from proxy import keyspace, reconcile
from proxy.ledger import Ledger, SettleCall
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import entries

DAY_MS = 86_400_000
PLANS = {
    "plans": {
        "free": {"allocation": {"amount_usd": "5", "every": "month"}},
        "pro": {"allocation": {"amount_usd": "100", "every": "month"},
                "overage": {"limit_usd": None, "invoice_every_usd": "50"}},
        "plus": {"allocation": {"amount_usd": "20", "every": "month"},
                 "on_exhausted": {"downgrade_to": "gpt-4o-mini"}},
    }
}  # fmt: skip


async def spend(ledger: Ledger, account: str, micro: int, *, reserve: int | None = None) -> str:
    """Admit and settle one request that costs `micro` (reserving `reserve`)."""
    request_id = "req_" + secrets.token_hex(6)
    await ledger.admit(account, "key_test", "gpt-4o", request_id, prompt_cost=reserve if reserve is not None else micro,
                       output_cost=0, output_pico=0, prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
    usage = {"input_tokens": 1, "cached_input_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    await ledger.settle(
        SettleCall(account, "gpt-4o", request_id, Decimal(micro), 1, {"model": "gpt-4o", "usage": usage})
    )
    return request_id


async def new_account(running: Running, account: str = "acme", **fields: Any) -> Ledger:
    await running.state.ledger.save_account(account, fields, create=True)
    await running.state.redis.hset(keyspace.account(account, "keys"), "key_test", "active")
    return running.state.ledger


def ms_of(year: int, month: int, day: int = 1) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp() * 1000)


async def test_free_plan_monthly_allocation_expires_at_period_end(start_proxy: Any) -> None:
    running = await start_proxy(PLANS)
    ledger = await new_account(running, plan="free")
    view = await ledger.touch("acme")
    (grant,) = view.grants
    assert grant["kind"] == "promotional" and grant["amount"] == "5000000"
    now = datetime.now(UTC)
    next_month = ms_of(now.year + (now.month == 12), now.month % 12 + 1)
    assert grant["expires_at"] == next_month
    await spend(ledger, "acme", 1_000_000)
    assert (await ledger.touch("acme")).balance == 4_000_000  # a second touch grants nothing more
    ledger.clock_offset_ms = next_month - int(now.timestamp() * 1000) + 1000
    view = await ledger.touch("acme")
    assert view.balance == 5_000_000 and len(view.grants) == 1 and view.grants[0]["id"] != grant["id"]
    kinds = [(e["type"], e["amount"]) for e in await entries(running.state.redis, "acme")]
    assert kinds == [("allocation", "5000000"), ("usage", "-1000000"), ("expiration", "-4000000"),
                     ("allocation", "5000000")]  # fmt: skip


async def test_pro_plan_unlimited_overage_goes_negative(start_proxy: Any) -> None:
    running = await start_proxy(PLANS)
    ledger = await new_account(running, plan="pro")
    for _ in range(4):
        await spend(ledger, "acme", 50_000_000)  # $200 of use against a $100 allocation
    view = await ledger.touch("acme")
    assert view.balance == -100_000_000 and view.num("debt") == 100_000_000
    await running.fund("acme", "30")  # a payment pays overage debt first
    view = await ledger.touch("acme")
    assert view.balance == -70_000_000 and view.num("debt") == 70_000_000


async def test_promotional_expiring_grant_is_drawn_before_paid(proxy: Running) -> None:
    ledger = await new_account(proxy)
    paid = await proxy.fund("acme", "10")
    promo = await proxy.fund("acme", "5", kind="promotional", expires_at=int(datetime.now(UTC).timestamp() * 1000)
                             + 30 * DAY_MS)  # fmt: skip
    await spend(ledger, "acme", 3_000_000)
    remaining = {g["id"]: g["remaining"] for g in (await ledger.touch("acme")).grants}
    assert remaining == {promo["id"]: "2000000", paid["id"]: "10000000"}
    await spend(ledger, "acme", 4_000_000)  # one charge spanning two grants
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"][-1:]
    assert entry["draws"] == [{"grant_id": promo["id"], "amount": "2000000"},
                              {"grant_id": paid["id"], "amount": "2000000"}]  # fmt: skip


async def test_priority_orders_draw_down(proxy: Running) -> None:
    ledger = await new_account(proxy)
    low = await proxy.fund("acme", "1", priority=5)
    high = await proxy.fund("acme", "1", priority=1)
    await spend(ledger, "acme", 500_000)
    remaining = {g["id"]: g["remaining"] for g in (await ledger.touch("acme")).grants}
    assert remaining == {high["id"]: "500000", low["id"]: "1000000"}


async def test_refunded_pack_and_void_twice(proxy: Running) -> None:
    ledger = await new_account(proxy)
    pack = await proxy.fund("acme", "20")
    await spend(ledger, "acme", 5_000_000)
    voided, grant = await ledger.void("acme", pack["id"], "customer refund")
    assert voided and grant["voided"] == "15000000" and grant["void_reason"] == "customer refund"
    again, _ = await ledger.void("acme", pack["id"], "again")
    assert not again
    view = await ledger.touch("acme")
    assert view.balance == 0 and view.num("lifetime_paid") == 5_000_000
    assert [e["type"] for e in await entries(proxy.state.redis, "acme")] == ["grant", "usage", "void"]


async def test_pending_grant_counts_only_once_effective(proxy: Running) -> None:
    ledger = await new_account(proxy)
    now = int(datetime.now(UTC).timestamp() * 1000)
    await proxy.fund("acme", "7", effective_at=now + DAY_MS)
    assert (await ledger.touch("acme")).balance == 0
    ledger.clock_offset_ms = DAY_MS + 1000
    view = await ledger.touch("acme")
    assert view.balance == 7_000_000 and view.grants[0]["status"] == "active"


async def test_late_settlement_draws_from_grant_live_at_admission(proxy: Running) -> None:
    ledger = await new_account(proxy)
    now = int(datetime.now(UTC).timestamp() * 1000)
    expiring = await proxy.fund("acme", "1", kind="promotional", expires_at=now + 60_000)
    request_id = "req_long_stream"
    await ledger.admit("acme", "key_test", "gpt-4o", request_id, prompt_cost=400_000, output_cost=0, output_pico=0,
                       prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
    ledger.clock_offset_ms = 120_000  # the grant expires while the stream runs
    view = await ledger.touch("acme")
    assert view.available <= 0  # an expiring grant is no longer available to new requests
    await ledger.settle(SettleCall("acme", "gpt-4o", request_id, Decimal(300_000), 1, {"model": "gpt-4o"}))
    view = await ledger.touch("acme")
    assert view.balance == 0 and view.grants == []
    kinds = [(e["type"], e["amount"], e.get("grant_id")) for e in await entries(proxy.state.redis, "acme")]
    assert kinds[-2:] == [("usage", "-300000", expiring["id"]), ("expiration", "-700000", expiring["id"])]


async def test_idempotent_grant_under_concurrency(proxy: Running) -> None:
    ledger = await new_account(proxy)
    results = await asyncio.gather(*(proxy.fund("acme", "5", idem="pay_123") for _ in range(20)))
    assert len({g["id"] for g in results}) == 1
    assert (await ledger.touch("acme")).balance == 5_000_000


async def test_concurrent_admissions_never_overrun_the_balance(proxy: Running) -> None:
    ledger = await new_account(proxy)
    await proxy.fund("acme", "1")

    async def attempt(i: int) -> bool:
        try:
            await ledger.admit("acme", "key_test", "gpt-4o", f"req_{i}", prompt_cost=100_000, output_cost=0,
                               output_pico=0, prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
        except Exception:
            return False
        return True

    admitted = await asyncio.gather(*(attempt(i) for i in range(50)))
    assert sum(admitted) == 10  # exactly $1 / $0.10 (LiteLLM #34732)
    assert (await ledger.touch("acme")).reserved == 1_000_000


async def test_soft_capped_plan_downgrades_instead_of_402(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy(PLANS)
    key = await running.account("acme", None, plan="plus")
    await running.state.redis.hset(keyspace.account("acme", "keys"), "key_test", "active")
    await spend(running.state.ledger, "acme", 20_000_000)  # the allocation is used up
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-metering-downgraded-from"] == "gpt-4o"
    assert raw.headers["x-metering-cost-usd"] == "0.000000"
    assert upstream.requests[-1].body["model"] == "gpt-4o-mini"
    entry = (await entries(running.state.redis, "acme"))[-1]
    assert entry["model"] == "gpt-4o-mini" and entry["downgraded_from"] == "gpt-4o" and entry["amount"] == "0"


async def test_402_without_downgrade(start_proxy: Any) -> None:
    running = await start_proxy(PLANS)
    key = await running.account("acme", None, plan="free")
    await running.state.redis.hset(keyspace.account("acme", "keys"), "key_test", "active")
    await spend(running.state.ledger, "acme", 5_000_000)
    with pytest.raises(openai.APIStatusError) as caught:
        await running.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 402


async def test_plan_switching_never_stacks_allocations(start_proxy: Any) -> None:
    running = await start_proxy(PLANS)
    ledger = await new_account(running, plan="free")
    balances = [(await ledger.touch("acme")).balance]
    for plan in ("pro", "plus", "free"):
        await ledger.save_account("acme", {"plan": plan}, create=False)
        balances.append((await ledger.touch("acme")).balance)
    # each switch voids the old plan's allocation; back on free, this period's was used
    assert balances == [5_000_000, 100_000_000, 20_000_000, 0]
    voids = [e["description"] for e in await entries(running.state.redis, "acme") if e["type"] == "void"]
    assert voids == ["plan changed"] * 3


async def test_backdated_grant_keeps_its_payment_history(start_proxy: Any) -> None:
    tiers = {"rate_tiers": {"tiers": [{"name": "free", "min_usd": "0", "rpm": 3, "tpm": 10**6},
                                      {"name": "tier-2", "min_usd": "50", "rpm": 50, "tpm": 10**6,
                                       "min_days_since_first_payment": 7}]}}  # fmt: skip
    running = await start_proxy(tiers)
    ledger = await new_account(running)
    migrated = int(datetime.now(UTC).timestamp() * 1000) - 30 * DAY_MS
    grant = await running.fund("acme", "60", effective_at=migrated)
    assert grant["effective_at"] == migrated and grant["status"] == "active"
    view = await ledger.touch("acme")
    assert view.fields["tier"] == "tier-2" and view.balance == 60_000_000


async def test_adjustments_settle_invoiced_overage_and_charge_by_hand(start_proxy: Any) -> None:
    from proxy import reconcile

    running = await start_proxy(PLANS)
    ledger = await new_account(running, plan="pro")
    for _ in range(4):
        await spend(ledger, "acme", 50_000_000)  # $200 of use: $100 of overage debt
    paid = {"amount_usd": "100", "description": "overage invoice INV-1 paid", "idempotency_key": "inv-1"}
    status, entry = await running.admin("POST", "/admin/v1/accounts/acme/adjustments", paid)
    assert status == 201 and entry["type"] == "adjustment" and entry["amount_usd"] == "100.000000"
    assert entry["balance_usd"] == "0.000000"
    again, same = await running.admin("POST", "/admin/v1/accounts/acme/adjustments", paid)
    assert again == 200 and same["id"] == entry["id"]  # the same key never settles twice
    view = await ledger.touch("acme")
    assert view.balance == 0 and view.num("debt") == 0
    status, body = await running.admin("POST", "/admin/v1/accounts/acme/adjustments",
                                       {"amount_usd": "1", "description": "too much"})  # fmt: skip
    assert status == 400 and "debt" in body["error"]["message"]
    await running.fund("acme", "10")
    status, charge = await running.admin("POST", "/admin/v1/accounts/acme/adjustments",
                                         {"amount_usd": "-2.5", "description": "support hours"})  # fmt: skip
    assert status == 201 and charge["amount_usd"] == "-2.500000" and charge["draws"][0]["amount_usd"] == "2.500000"
    assert (await ledger.touch("acme")).balance == 7_500_000
    assert not await reconcile.check_account(running.state.redis, "acme")


async def test_the_proxys_entry_is_spliced_in_once_and_never_over_what_settle_writes(proxy: Running) -> None:
    """settle.lua splices the proxy's members of the entry in as JSON text (never decoded):
    each name once, text with quotes, escapes and non-ASCII intact, and the names settle.lua
    writes (amount, request_id, ...) its own even when the proxy's entry has them too."""
    ledger = await new_account(proxy)
    await proxy.fund("acme", "1")
    request_id = "req_splice"
    await ledger.admit("acme", "key_test", "gpt-4o", request_id, prompt_cost=500, output_cost=0, output_pico=0,
                       prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
    usage = {"input_tokens": 3, "output_tokens": 4, "prompt_tokens_details": {"cached_tokens": 1}}
    odd = 'a "quoted" \\ back\\slash, a tab\t, é and 🙂'
    entry = {"model": "gpt-4o", "key_id": "key_test", "usage": usage, "estimated": False, "service_tier": odd,
             "amount": "-999999", "request_id": "req_forged", "balance": "1", "draws": []}  # fmt: skip
    settled = await ledger.settle(SettleCall("acme", "gpt-4o", request_id, Decimal(120), 7, entry))
    ((_, last),) = await proxy.state.redis.xrevrange(keyspace.account("acme", "ledger"), count=1)
    pairs = json.loads(last["e"], object_pairs_hook=lambda items: items)
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), names
    e = dict(pairs)
    assert e["request_id"] == request_id and e["amount"] == "-120" == f"-{settled.cost}"
    assert e["type"] == "usage" and e["key_id"] == "key_test" and e["reserved"] == "500"
    assert dict(e["usage"][:2]) == {"input_tokens": 3, "output_tokens": 4} and e["service_tier"] == odd
    assert e["balance"] == str(settled.balance) and "draws" in e and e["draws"] != []
    assert not await reconcile.check_account(proxy.state.redis, "acme")
