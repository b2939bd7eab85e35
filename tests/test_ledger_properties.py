"""Property-based: random sequences of grants, voids, expiries, admissions and
settlements (some concurrent) on a real Redis keep the ledger's invariants after
every step (proxy.reconcile checks them), the API key's counters among them; and an
admission never takes the key past its daily limit."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy import errors, keyspace, reconcile
from proxy.app import connect
from proxy.configfile import parse_config
from proxy.embedded import EmbeddedRedis
from proxy.ledger import Checkpoint, GrantSpec, Ledger, SettleCall

from .conftest import BASE_CONFIG, deep_merge

CONFIG = deep_merge(BASE_CONFIG, {
    "billing": {"reservation_ttl_s": 30},
    "plans": {"metered": {"allocation": {"amount_usd": "1", "every": "day"}, "overage": {"limit_usd": "2"}}},
})  # fmt: skip

KEY_LIMIT = 1_500_000  # the key's daily limit: reached now and then, reset by a day's `advance`
KEY_SETTINGS = {"limit": str(KEY_LIMIT), "reset": "daily"}
grant = st.tuples(
    st.just("grant"),
    st.sampled_from(["paid", "promotional"]),
    st.integers(1, 3_000_000),
    st.integers(0, 3),
    st.sampled_from([0, 1_000, 60_000, 86_400_000]),
    st.sampled_from([0, 0, 2_000]),
)
void = st.tuples(st.just("void"), st.integers(0, 20))
admit = st.tuples(st.just("admit"), st.integers(0, 2_000_000))
# costs in thousandths of a micro-USD: sub-micro remainders are carried per account
settle = st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, 3_000_000_000))
checkpoint = st.tuples(st.just("checkpoint"), st.integers(0, 20), st.integers(0, 3_000_000_000))
lose = st.tuples(st.just("lose"), st.integers(0, 20))  # a reservation lost behind our back (failover)
duplicate = st.tuples(st.just("duplicate"), st.integers(0, 20))
advance = st.tuples(st.just("advance"), st.sampled_from([500, 3_000, 31_000, 86_400_000]))
burst = st.tuples(st.just("burst"), st.lists(st.integers(0, 1_500_000), min_size=2, max_size=6))
reap = st.tuples(st.just("reap"))
adjust = st.tuples(st.just("adjust"), st.integers(-1_000_000, 1_000_000).filter(bool))
operations = st.lists(
    st.one_of(grant, void, admit, settle, advance, burst, reap, adjust, checkpoint, lose, duplicate),
    min_size=1,
    max_size=25,
)


class Scenario:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.grants: list[str] = []
        self.open: list[str] = []
        self.settled: list[str] = []
        self.count = 0

    async def admit(self, reserve: int, alone: bool = True) -> None:
        self.count += 1
        request_id = f"req_{self.count}"
        try:
            await self.ledger.admit("acme", "key_p", "gpt-4o", request_id, prompt_cost=reserve, output_cost=0,
                                    output_pico=0, prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip
        except errors.InsufficientQuota:  # the balance's or the key's limit
            return
        self.open.append(request_id)
        if alone:  # (a concurrent settlement may charge above its reservation meanwhile)
            [key] = await self.ledger.key_figures("acme", ["key_p"])
            assert key.limit_spent + key.reserved <= KEY_LIMIT

    async def settle(self, index: int, milli: int) -> None:
        if self.open:
            request_id = self.open.pop(index % len(self.open))
            await self.ledger.settle(SettleCall("acme", "gpt-4o", request_id, _micro(milli), 1, {"model": "gpt-4o"}))
            self.settled.append(request_id)

    async def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "grant":
            _, grant_kind, amount, priority, expires_in, effective_in = op
            now = await self.now()
            _, g = await self.ledger.grant("acme", GrantSpec(
                grant_kind, amount, priority, effective_at=now + effective_in if effective_in else 0,
                expires_at=now + effective_in + expires_in if expires_in else 0, id=f"grant_{len(self.grants)}",
            ))  # fmt: skip
            self.grants.append(g["id"])
        elif kind == "void" and self.grants:
            await self.ledger.void("acme", self.grants[op[1] % len(self.grants)], "test")
        elif kind == "admit":
            await self.admit(op[1])
        elif kind == "settle":
            await self.settle(op[1], op[2])
        elif kind == "advance":
            self.ledger.clock_offset_ms += op[1]
        elif kind == "burst":  # concurrent admissions and settlements
            await asyncio.gather(
                *(self.admit(r, alone=False) for r in op[1]), *(self.settle(i, r) for i, r in enumerate(op[1]))
            )
        elif kind == "adjust":  # a positive adjustment may only settle debt: bound it by the debt
            amount = op[1] if op[1] < 0 else min(op[1], (await self.ledger.touch("acme")).num("debt"))
            if amount:
                await self.ledger.adjust("acme", {"amount": str(amount), "description": "test"})
        elif kind == "reap":  # reaped reservations stay in `open`: they may still settle late, once
            await self.ledger.reap("acme")
        elif kind == "checkpoint" and self.open:  # what the reaper charges if the proxy dies
            point = Checkpoint(self.open[op[1] % len(self.open)], _micro(op[2]), {"input_tokens": 1})
            await self.ledger.extend("acme", [point])
        elif kind == "lose" and self.open:  # the reservation and its parts of `reserved` vanish together
            request_id = self.open[op[1] % len(self.open)]
            raw = await self.ledger.redis.hget(keyspace.account("acme", "resv"), request_id)
            if raw:
                amount = -int(orjson.loads(raw)["amount"])
                await self.ledger.redis.hdel(keyspace.account("acme", "resv"), request_id)
                await self.ledger.redis.hincrby(keyspace.account("acme", "acct"), "reserved", amount)
                await self.ledger.redis.hincrby(keyspace.account("acme", "kuse"), "r:key_p", amount)
        elif kind == "duplicate" and self.settled:  # a settlement replayed: charged once only
            request_id = self.settled[op[1] % len(self.settled)]
            before = await self.ledger.touch("acme")
            again = await self.ledger.settle(
                SettleCall("acme", "gpt-4o", request_id, Decimal(7), 1, {"model": "gpt-4o"})
            )
            assert again.duplicate and (await self.ledger.touch("acme")).balance == before.balance

    async def now(self) -> int:
        seconds, micros = await self.ledger.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000 + self.ledger.clock_offset_ms


def _micro(milli: int) -> Decimal:
    return Decimal(milli) / 1000


async def play(url: str, ops: list[tuple[Any, ...]]) -> None:
    redis = connect(url)
    try:
        await redis.flushall()
        ledger = Ledger(redis, parse_config(yaml.safe_dump(CONFIG)))
        await ledger.save_account("acme", {"plan": "metered"}, create=True)
        await redis.hset(keyspace.account("acme", "keys"), "key_p", "active")
        await redis.hset(keyspace.account("acme", "kset"), "key_p", orjson.dumps(KEY_SETTINGS))
        scenario = Scenario(ledger)
        for step, op in enumerate(ops):
            await scenario.run(op)
            drifts = await reconcile.check_account(redis, "acme")
            assert not drifts, f"after step {step} {op}: {[str(d) for d in drifts]}"
        for request_id in list(scenario.open):  # everything settles in the end
            await ledger.settle(SettleCall("acme", "gpt-4o", request_id, Decimal(1), 1, {"model": "gpt-4o"}))
        view = await ledger.touch("acme")
        assert view.reserved == 0
        assert not await reconcile.check_account(redis, "acme")
    finally:
        await redis.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
# a future grant that expires soon after, admitted against while pending: activation
# pays off debt and depletes it, and a depleted grant must not then be "expired"
@example(ops=[("grant", "paid", 1, 0, 0, 0), ("grant", "paid", 1, 0, 1000, 2000), ("admit", 0),
              ("burst", [1000002, 0]), ("advance", 3000)])  # fmt: skip
# a reaped stream charged at its checkpoint, then settled late below it: the difference
# goes back to the grant it was drawn from; and once more above it
@example(ops=[("grant", "paid", 1_000_000, 0, 0, 0), ("admit", 500_000), ("admit", 500_000),
              ("checkpoint", 0, 400_000_000), ("checkpoint", 1, 1_500), ("advance", 31_000), ("reap",),
              ("settle", 0, 100_000_000), ("settle", 0, 2_000_250)])  # fmt: skip
# a reservation lost in a failover is still charged; its replay is a duplicate
@example(ops=[("grant", "paid", 1_000_000, 0, 0, 0), ("admit", 500_000), ("lose", 0), ("settle", 0, 300_500),
              ("duplicate", 0)])  # fmt: skip
def test_invariants_hold_after_every_step(redis_url: str, ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(play(redis_url, ops))


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url
