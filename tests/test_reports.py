"""Usage reports: `GET /v1/usage` for the caller's own account, the admin route's shape
and figures, grouped by model, UTC day and API key; every figure the ledger's."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from proxy import keyspace
from proxy.money import usd
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import get

MESSAGES = [{"role": "user", "content": "hi"}]
TOKENS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
GROUPINGS = ("model", "day", "key", "model,key", "day,model,key", "key,day")


async def expected_groups(redis: Redis, account_id: str, group_by: str) -> list[dict[str, Any]]:
    """The report computed here, independently, from every usage entry of the ledger."""
    groups: dict[tuple[str, ...], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "cost": 0, **dict.fromkeys(TOKENS, 0)}
    )
    labels: dict[tuple[str, ...], dict[str, Any]] = {}
    for entry_id, fields in await redis.xrange(keyspace.account(account_id, "ledger")):
        e = orjson.loads(fields["e"])
        if e["type"] != "usage":
            continue
        day = datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000, UTC).date().isoformat()
        values = {"model": e["model"], "day": day, "key_id": e["key_id"]}
        names = ["key_id" if d == "key" else d for d in group_by.split(",")]
        key = tuple(values[n] for n in names)
        labels[key] = {"model": None, **{n: values[n] for n in names}}
        group = groups[key]
        group["requests"] += 1
        group["cost"] -= int(e["amount"])
        for name in TOKENS:
            group[name] += e["usage"][name]
    return [
        {**labels[k], "requests": g["requests"], **{n: g[n] for n in TOKENS}, "cost_usd": usd(g["cost"])}
        for k, g in sorted(groups.items())
    ]


async def test_own_usage_by_model_day_and_key_equals_the_ledger(proxy: Running, upstream: DemoUpstream) -> None:
    first = await proxy.account("acme", "10")
    _, second = await proxy.state.key_store.create_key("acme", name="second")
    other = await proxy.account("globex", "10")
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 100, 30, 7
    for _ in range(2):
        await proxy.client(first).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    upstream.fault.reasoning_tokens = 5
    await proxy.client(second).chat.completions.create(model="o3-mini", messages=MESSAGES)
    await proxy.client(second).embeddings.create(model="text-embedding-3-small", input="hello")
    await proxy.client(other).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # not acme's
    client = proxy.client(first)
    for group_by in GROUPINGS:
        mine = await client.get("/usage", cast_to=object, options={"params": {"group_by": group_by}})
        assert mine["account_id"] == "acme" and mine["groups"] == await expected_groups(
            proxy.state.redis, "acme", group_by
        )
        status, admin = await proxy.admin("GET", f"/admin/v1/accounts/acme/usage?group_by={group_by}")
        assert status == 200 and admin["groups"] == mine["groups"], group_by
    by_key = (await get(proxy, second, "usage", {"group_by": "key"}))[1]["groups"]  # any key of the account
    assert by_key == await expected_groups(proxy.state.redis, "acme", "key")
    assert sorted(g["requests"] for g in by_key) == [2, 2] and {g["model"] for g in by_key} == {None}
    default = (await get(proxy, first, "usage"))[1]  # group_by=model, the last 30 days
    assert [g["model"] for g in default["groups"]] == ["gpt-4o", "o3-mini", "text-embedding-3-small"]
    # 70 x 2.50 + 30 x 1.25 + 7 x 10.00 = 282.5 micro-USD, twice: 565 (the carry rounds each)
    assert (default["groups"][0]["requests"], default["groups"][0]["cost_usd"]) == (2, "0.000565")


async def test_usage_is_grouped_by_utc_day_over_a_range(proxy: Running, upstream: DemoUpstream) -> None:
    """Entries dated on two past days (stream ids are their times) and today's requests:
    each day its own group, and `from`/`to` select [from, to)."""
    redis = proxy.state.redis
    await proxy.state.ledger.save_account("acme", {}, create=True)
    usage = {"input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 2, "reasoning_tokens": 0}
    for day, amount in (("2024-03-01T23:59:59", -5), ("2024-03-02T00:00:00", -7), ("2024-03-02T12:00:00", -1)):
        ms = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)
        entry = {"type": "usage", "model": "gpt-4o", "key_id": "key_old", "usage": usage, "amount": str(amount)}
        await redis.xadd(keyspace.account("acme", "ledger"), {"e": orjson.dumps(entry)}, id=f"{ms}-0")
    await proxy.fund("acme", "10")
    _, key = await proxy.state.key_store.create_key("acme")
    await proxy.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    status, report = await get(proxy, key, "usage", {"from": "2024-03-01", "to": "2024-03-03", "group_by": "day"})
    assert status == 200 and (report["from"], report["to"]) == ("2024-03-01T00:00:00.000Z", "2024-03-03T00:00:00.000Z")
    assert [(g["day"], g["requests"], g["input_tokens"], g["cost_usd"]) for g in report["groups"]] == [
        ("2024-03-01", 1, 10, "0.000005"),
        ("2024-03-02", 2, 20, "0.000008"),
    ]
    narrow = (await get(proxy, key, "usage", {"from": "2024-03-02T00:00:00Z", "to": "2024-03-02T12:00:00Z",
                                              "group_by": "day"}))[1]  # fmt: skip
    assert [(g["day"], g["requests"]) for g in narrow["groups"]] == [("2024-03-02", 1)]  # `to` is exclusive
    since = (await get(proxy, key, "usage", {"from": "2024-01-01", "group_by": "day,key"}))[1]["groups"]
    assert [g["day"] for g in since] == ["2024-03-01", "2024-03-02", datetime.now(UTC).date().isoformat()]
    assert await expected_groups(redis, "acme", "day,key") == since


async def test_bad_usage_queries_are_400s_and_keys_must_be_live(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    for params, param in (
        ({"group_by": "tenant"}, "group_by"),
        ({"group_by": ""}, "group_by"),
        ({"group_by": "model,model"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2024-13-01"}, "to"),
        ({"from": "2024-02-01", "to": "2024-01-01"}, "from"),
        ({"account_id": "globex"}, "account_id"),
    ):
        status, body = await get(proxy, key, "usage", params)
        assert status == 400 and body["error"]["param"] == param, (params, body)
    (key_id,) = await proxy.state.redis.hkeys(keyspace.account("acme", "keys"))
    await proxy.state.key_store.revoke_key(key_id)
    status, body = await get(proxy, key, "usage")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_a_day_that_ended_is_read_once_and_today_stays_live(proxy: Running, upstream: DemoUpstream) -> None:
    """Whole days before the ledger's latest entry can gain no entry: the first report
    keeps their totals, later reports read those (not the entries), and today's new
    requests show at once. A customer calling /v1/usage in a loop rescans one day at most."""
    redis = proxy.state.redis
    await proxy.state.ledger.save_account("acme", {}, create=True)
    usage = {"input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 2, "reasoning_tokens": 0}
    for day in ("2024-03-01T08:00:00", "2024-03-02T08:00:00"):  # entries of two past days (ids are times)
        ms = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)
        entry = {"type": "usage", "model": "gpt-4o", "key_id": "key_old", "usage": usage, "amount": "-5"}
        await redis.xadd(keyspace.account("acme", "ledger"), {"e": orjson.dumps(entry)}, id=f"{ms}-0")
    await proxy.fund("acme", "10")
    _, key = await proxy.state.key_store.create_key("acme")
    client = proxy.client(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # today
    params = {"from": "2024-01-01", "group_by": "day,model"}
    first = (await get(proxy, key, "usage", params))[1]["groups"]
    assert first == await expected_groups(redis, "acme", "day,model") and len(first) == 3
    kept = await redis.hgetall(keyspace.account("acme", "usage_days"))
    # every whole day from the ledger's first to the one before its latest entry: two with usage
    assert sorted(v for v in kept.values() if v != "[]") == sorted(
        orjson.dumps([["gpt-4o", "key_old", 1, 10, 0, 2, 0, 5]]).decode() for _ in range(2)
    )
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert max(map(int, kept)) == int(today.timestamp() * 1000) - 86_400_000
    assert min(map(int, kept)) == int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)  # not from 2024-01-01
    # what is kept is what later reports read: a changed figure shows, a rescan would not
    march_first = str(int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000))
    await redis.hset(keyspace.account("acme", "usage_days"), march_first,
                     orjson.dumps([["gpt-4o", "key_old", 41, 10, 0, 2, 0, 5]]))  # fmt: skip
    again = (await get(proxy, key, "usage", params))[1]["groups"]
    assert [g["requests"] for g in again] == [41, 1, 1]
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # today: still live
    latest = (await get(proxy, key, "usage", params))[1]["groups"]
    assert [(g["model"], g["requests"]) for g in latest[2:]] == [("gpt-4o", 1), ("gpt-4o-mini", 1)]
