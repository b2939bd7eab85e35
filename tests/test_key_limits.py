"""Per-key spend limits, expiry and rate limits (lib/keys.lua), enforced inside the
admission script on a real Redis, through real proxies and the official openai SDK."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import openai
import pytest

from proxy import keyspace, reconcile, views
from proxy.ledger import Checkpoint, Ledger, SettleCall
from proxy.money import usd
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import entries, post

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}  # 10 + 5 tokens upstream: 75 micro-USD


async def probe(running: Running) -> tuple[int, int]:
    """(reservation, charge) of one CHAT request, measured on an account of its own."""
    key = await running.account("probe", "10")
    await running.client(key).chat.completions.create(**CHAT)
    (entry,) = [e for e in await entries(running.state.redis, "probe") if e["type"] == "usage"]
    return int(entry["reserved"]), -int(entry["amount"])


async def capped_key(running: Running, account_id: str = "acme", **settings: Any) -> dict[str, Any]:
    """A funded account and a key made through the admin API with `settings`."""
    if not await running.state.redis.exists(keyspace.account(account_id, "acct")):
        await running.account(account_id, "10")
    status, key = await running.admin("POST", f"/admin/v1/accounts/{account_id}/keys", settings)
    assert status == 201, key
    return key  # type: ignore[no-any-return]


async def redis_now(running: Running) -> int:
    seconds, micros = await running.state.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def window_requests(fields: dict[str, str]) -> int:
    return sum(int(v) for k, v in fields.items() if k.startswith("r:"))


async def key_spend(running: Running, key_id: str, account_id: str = "acme") -> int:
    """The key's charges as the ledger has them."""
    return -sum(int(e["amount"]) for e in await entries(running.state.redis, account_id) if e.get("key_id") == key_id)


async def test_forty_concurrent_requests_on_two_instances_serve_exactly_what_the_limit_fits(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    first, second = await start_proxy(), await start_proxy()
    reserve, cost = await probe(first)
    assert 2 * cost > reserve  # two charges leave no room for a third reservation
    key = await capped_key(first, limit_usd=usd(2 * reserve), limit_reset="daily")
    sdk = first.client(key["key"])

    async def through_sdk() -> int:
        try:
            await sdk.chat.completions.create(**CHAT)
            return 200
        except openai.APIStatusError as err:
            assert err.body["code"] == "key_limit_exceeded", err.body  # type: ignore[index]
            assert err.body["type"] == "insufficient_quota"  # type: ignore[index]
            return err.status_code

    async def through_http() -> int:
        status, body = await post(second, key["key"], "chat/completions", CHAT)
        assert status == 200 or body["error"]["code"] == "key_limit_exceeded", body
        return status

    served = len(upstream.requests)
    statuses = await asyncio.gather(*(f() for _ in range(20) for f in (through_sdk, through_http)))
    assert sorted(statuses) == [200] * 2 + [402] * 38
    assert len(upstream.requests) - served == 2  # the refused never reached the upstream
    redis = first.state.redis
    usage = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert len(usage) == 2 and all(e["key_id"] == key["id"] for e in usage)
    view = await first.balance("acme")
    assert view.reserved == 0 and view.balance == 10_000_000 - 2 * cost  # the refused cost nothing
    # ... and did not count in the account's rate window either
    assert window_requests(await redis.hgetall(keyspace.account("acme", "rl"))) == 2
    status, shown = await second.admin("GET", f"/admin/v1/keys/{key['id']}")
    assert status == 200 and shown["usage_usd"]["daily"] == usd(2 * cost) == shown["usage_usd"]["total"]
    assert shown["limit_remaining_usd"] == usd(2 * reserve - 2 * cost) and shown["reserved_usd"] == "0.000000"
    assert not await reconcile.check_account(redis, "acme")


async def test_a_refusal_says_which_limit_and_when_it_resets(proxy: Running) -> None:
    reserve, cost = await probe(proxy)
    key = await capped_key(proxy, limit_usd=usd(reserve + cost - 1), limit_reset="daily")
    await proxy.client(key["key"]).chat.completions.create(**CHAT)
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client(key["key"]).chat.completions.create(**CHAT)
    err = refused.value
    tomorrow = (datetime.fromtimestamp(await redis_now(proxy) / 1000, UTC) + timedelta(days=1)).date()
    assert err.status_code == 402 and err.body["code"] == "key_limit_exceeded"  # type: ignore[index]
    assert "daily limit of $" in err.message and f"resets at {tomorrow.isoformat()}T00:00:00.000Z" in err.message
    assert err.response.headers["x-ratelimit-limit-requests"]  # it reached admission: the rate headers too
    never = await capped_key(proxy, limit_usd="0")
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client(never["key"]).chat.completions.create(**CHAT)
    assert "limit (all time) of $0.00" in refused.value.message and "never resets" in refused.value.message


async def test_a_settlement_below_its_reservation_frees_the_rest(proxy: Running) -> None:
    reserve, cost = await probe(proxy)
    # room for one reservation and one charge: the second request fits only once the
    # first has given back what it reserved beyond its cost
    key = await capped_key(proxy, limit_usd=usd(reserve + cost))
    client = proxy.client(key["key"])
    for _ in range(2):
        await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(**CHAT)
    assert refused.value.body["code"] == "key_limit_exceeded"  # type: ignore[index]
    assert await key_spend(proxy, key["id"]) == 2 * cost


def next_boundary(now_ms: int, reset: str) -> int:
    """The end of the UTC day, week (from Monday) or month that contains `now_ms`."""
    today = datetime.fromtimestamp(now_ms / 1000, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if reset == "daily":
        end = today + timedelta(days=1)
    elif reset == "weekly":
        end = today + timedelta(days=7 - today.weekday())
    else:
        end = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
    return int(end.timestamp() * 1000)


@pytest.mark.parametrize("reset", ["daily", "weekly", "monthly"])
async def test_a_limit_resets_at_its_period_boundary(proxy: Running, reset: str) -> None:
    reserve, cost = await probe(proxy)
    key = await capped_key(proxy, limit_usd=usd(reserve), limit_reset=reset)
    client = proxy.client(key["key"])
    await client.chat.completions.create(**CHAT)
    boundary = next_boundary(await redis_now(proxy), reset)
    info = await client.get("/key", cast_to=object)
    assert info["limit_resets_at"] == views.rfc3339(boundary)  # type: ignore[index]
    if reset == "weekly":  # weeks start on Monday
        assert datetime.fromtimestamp(boundary / 1000, UTC).weekday() == 0
    ledger = proxy.state.ledger
    ledger.clock_offset_ms = boundary - await redis_now(proxy) - 2_000  # two seconds before it
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(**CHAT)
    assert views.rfc3339(boundary) in refused.value.message  # type: ignore[operator]
    ledger.clock_offset_ms = boundary - await redis_now(proxy) + 1_000  # one second after it
    await client.chat.completions.create(**CHAT)
    info = await client.get("/key", cast_to=object)
    period = {"daily": "daily", "weekly": "weekly", "monthly": "monthly"}[reset]
    assert info["usage_usd"][period] == usd(cost) and info["usage_usd"]["total"] == usd(2 * cost)  # type: ignore[index]
    assert info["limit_resets_at"] == views.rfc3339(next_boundary(boundary + 1_000, reset))  # type: ignore[index]


async def test_an_expired_key_is_refused_with_a_401_that_says_so(proxy: Running, upstream: DemoUpstream) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    key = await capped_key(proxy, expires_at=expires.isoformat())
    client = proxy.client(key["key"])
    await client.chat.completions.create(**CHAT)
    assert (await client.get("/key", cast_to=object))["expires_at"] == views.rfc3339(  # type: ignore[index]
        int(expires.timestamp() * 1000)
    )
    proxy.state.ledger.clock_offset_ms = 3_600_000 + 1_000  # Redis time: past the expiry
    served = len(upstream.requests)
    with pytest.raises(openai.AuthenticationError) as refused:
        await client.chat.completions.create(**CHAT)
    assert refused.value.body["code"] == "invalid_api_key" and "expired at" in refused.value.message  # type: ignore[index]
    for call in (client.models.list(), client.get("/key", cast_to=object), client.get("/credits", cast_to=object)):
        with pytest.raises(openai.AuthenticationError):
            await call
    assert len(upstream.requests) == served
    status, shown = await proxy.admin("GET", f"/admin/v1/keys/{key['id']}")
    assert status == 200 and shown["status"] == "expired"


async def test_changes_apply_at_once_on_an_instance_that_cached_the_key(start_proxy: Any) -> None:
    admin, serving = await start_proxy(), await start_proxy()
    reserve, _ = await probe(admin)
    key = await capped_key(admin, limit_usd="0")
    client = serving.client(key["key"])
    with pytest.raises(openai.APIStatusError):  # the serving instance now holds the key in its cache
        await client.chat.completions.create(**CHAT)
    path = f"/admin/v1/keys/{key['id']}"
    status, raised = await admin.admin("PATCH", path, {"limit_usd": usd(2 * reserve)})
    assert status == 200 and raised["limit_usd"] == usd(2 * reserve) and raised["limit_reset"] is None
    await client.chat.completions.create(**CHAT)
    assert (await admin.admin("PATCH", path, {"limit_usd": "0.000001"}))[0] == 200  # lowered below what it spent
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(**CHAT)
    assert refused.value.body["code"] == "key_limit_exceeded"  # type: ignore[index]
    assert (await admin.admin("PATCH", path, {"limit_usd": None, "allowed_models": ["gpt-4o-mini"]}))[0] == 200
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await client.chat.completions.create(**CHAT)
    assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert [m.id for m in (await client.models.list()).data] == ["gpt-4o-mini"]
    await client.chat.completions.create(**{**CHAT, "model": "gpt-4o-mini"})  # no limit any more
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert (await admin.admin("PATCH", path, {"expires_at": past}))[0] == 200
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(**{**CHAT, "model": "gpt-4o-mini"})


async def test_a_keys_rpm_caps_it_below_its_account(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy({"rate_tiers": {"tiers": [{"name": "t", "min_usd": "0", "rpm": 10, "tpm": 10**6}]}})
    key = await capped_key(running, rate_limits={"rpm": 2})
    client = running.client(key["key"])
    for remaining in (1, 0):
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"  # the key's limit binds: its figures show
        assert raw.headers["x-ratelimit-remaining-requests"] == str(remaining)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(**CHAT)
    err = limited.value
    assert err.body["type"] == "requests" and "this API key's limit" in err.message  # type: ignore[index]
    assert "Limit 2, Used 2, Requested 1" in err.message  # the first 429 did not count
    assert 0 < int(err.response.headers["retry-after-ms"]) <= 60_000
    other = running.client((await capped_key(running))["key"])  # the account has room: another key is served
    raw = await other.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-ratelimit-limit-requests"] == "10" and raw.headers["x-ratelimit-remaining-requests"] == "7"


async def test_a_keys_tpm_counts_real_tokens_once_settled(proxy: Running) -> None:
    key = await capped_key(proxy, rate_limits={"tpm": 2_000})
    client = proxy.client(key["key"])
    big = {**CHAT, "max_tokens": 1_000}  # 1,000 reserved + the prompt: two at once never fit...
    results = await asyncio.gather(*(client.chat.completions.create(**big) for _ in range(2)), return_exceptions=True)
    (limited,) = [r for r in results if isinstance(r, Exception)]
    assert isinstance(limited, openai.RateLimitError), limited
    assert limited.body["type"] == "tokens" and "this API key's limit" in limited.message  # type: ignore[index]
    for _ in range(3):  # ... but each settles at its real 15 tokens, so these fit one after another
        await client.chat.completions.create(**big)
    status, shown = await proxy.admin("GET", f"/admin/v1/keys/{key['id']}")
    assert status == 200 and shown["rate_limits"] == {"rpm": None, "tpm": 2_000}


async def test_key_info_figures_equal_the_ledgers(proxy: Running, upstream: DemoUpstream) -> None:
    key = await capped_key(proxy, name="ci", limit_usd="1", limit_reset="weekly", allowed_models=["gpt-4o"])
    client = proxy.client(key["key"])
    upstream.fault.output_tokens = 7
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    [chunk async for chunk in stream]
    info: Any = await client.get("/key", cast_to=object)
    spent = await key_spend(proxy, key["id"])
    assert spent > 0 and info["usage_usd"] == dict.fromkeys(("total", "daily", "weekly", "monthly"), usd(spent))
    assert info["limit_usd"] == "1.000000" and info["limit_reset"] == "weekly"
    assert info["limit_remaining_usd"] == usd(1_000_000 - spent) and info["reserved_usd"] == "0.000000"
    assert info["id"] == key["id"] and info["name"] == "ci" and info["allowed_models"] == ["gpt-4o"]
    assert info["expires_at"] is None and info["rate_limits"] == {"rpm": None, "tpm": None}
    status, listed = await proxy.admin("GET", "/admin/v1/accounts/acme/keys")
    assert status == 200 and info in listed["data"]


async def test_clamp_mode_lowers_max_tokens_to_the_keys_room(start_proxy: Any) -> None:
    running = await start_proxy({"billing": {"on_insufficient": "clamp"}})
    reserve, _ = await probe(running)
    # gpt-4o output: $10 / 1M = 10 micro-USD a token; the key has room for the prompt and 3 of them
    prompt = reserve - 5 * 10
    key = await capped_key(running, limit_usd=usd(prompt + 3 * 10))
    raw = await running.client(key["key"]).chat.completions.with_raw_response.create(**{**CHAT, "max_tokens": 500})
    assert raw.headers["x-metering-clamped-max-tokens"] == "3"
    (entry,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert int(entry["reserved"]) == prompt + 3 * 10


async def test_a_reaped_request_settled_late_counts_once(redis: Any, make_config: Any) -> None:
    ledger = Ledger(redis, make_config())
    await ledger.save_account("acme", {}, create=True)
    from proxy.keys import KeyStore
    from proxy.ledger import GrantSpec

    await ledger.grant("acme", GrantSpec("paid", 10_000_000))
    record, _ = await KeyStore(redis).create_key("acme", settings={"limit": "600"})

    async def admit(request_id: str, amount: int) -> None:
        await ledger.admit("acme", record.key_id, "gpt-4o", request_id, prompt_cost=amount, output_cost=0,
                           output_pico=0, prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip

    await admit("req_a", 500)
    await ledger.extend("acme", [Checkpoint("req_a", Decimal(300), {"input_tokens": 1})])
    ledger.clock_offset_ms = (ledger.config.billing.reservation_ttl_s + 1) * 1000
    assert (await ledger.reap("acme")).closed == 1
    [figures] = await ledger.key_figures("acme", [record.key_id])
    assert figures.reserved == 0 and figures.spend["total"] == 300  # the checkpoint, charged by the reaper
    with pytest.raises(Exception) as refused:  # 300 spent: 400 more does not fit under 600
        await admit("req_b", 400)
    assert getattr(refused.value, "code", None) == "key_limit_exceeded"
    await ledger.settle(SettleCall("acme", "gpt-4o", "req_a", Decimal(200), 1, {"key_id": record.key_id}))
    [figures] = await ledger.key_figures("acme", [record.key_id])
    assert figures.spend["total"] == 200  # the late settlement gave 100 back: not 300 + 200
    await admit("req_b", 400)  # now it fits
    assert not await reconcile.check_account(redis, "acme")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"limit_usd": "-1"}, "limit_usd"),
        ({"limit_usd": "1.0000001"}, "limit_usd"),
        ({"limit_usd": "1e3"}, "limit_usd"),
        ({"limit_usd": "10000000000"}, "limit_usd"),
        ({"limit_reset": "hourly"}, "limit_reset"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"rate_limits": {"rpm": 0}}, "rate_limits.rpm"),
        ({"rate_limits": {"rpm": "5"}}, "rate_limits.rpm"),
        ({"allowed_models": ["gpt-5"]}, "allowed_models"),
        ({"limit": "1"}, "limit"),
    ],
)
async def test_bad_key_settings_are_a_400_naming_the_field(proxy: Running, body: dict[str, Any], param: str) -> None:
    await proxy.account("acme", "1")
    (key_id,) = await proxy.state.key_store.key_ids("acme")
    before = await proxy.admin("GET", f"/admin/v1/keys/{key_id}")
    status, refused = await proxy.admin("POST", "/admin/v1/accounts/acme/keys", body)
    assert status == 400 and refused["error"]["param"] == param, refused
    assert await proxy.state.key_store.key_ids("acme") == [key_id]  # nothing was created
    if param != "expires_at" or "tomorrow" in str(body):  # a past expiry is a PATCH's way to expire a key at once
        status, refused = await proxy.admin("PATCH", f"/admin/v1/keys/{key_id}", body)
        assert status == 400 and refused["error"]["param"] == param, refused
        assert await proxy.admin("GET", f"/admin/v1/keys/{key_id}") == before  # nothing was changed


async def test_an_unknown_key_is_a_404(proxy: Running) -> None:
    for method, body in (("GET", None), ("PATCH", {"name": "x"}), ("DELETE", None)):
        status, refused = await proxy.admin(method, "/admin/v1/keys/key_nope", body)
        assert status == 404 and refused["error"]["code"] == "not_found"


async def test_a_downgrade_never_serves_a_model_the_key_may_not_use(start_proxy: Any, upstream: DemoUpstream) -> None:
    """An exhausted account on a plan that downgrades: a key limited to gpt-4o gets the
    402, not gpt-4o-mini (the plan's target) for free; a key that allows it is served."""
    running = await start_proxy({"plans": {"free": {"on_exhausted": {"downgrade_to": "gpt-4o-mini"}}}})
    await running.account("acme", None, plan="free")
    narrow = await capped_key(running, allowed_models=["gpt-4o"])
    served = len(upstream.requests)
    with pytest.raises(openai.APIStatusError) as refused:
        await running.client(narrow["key"]).chat.completions.create(**CHAT)
    assert refused.value.status_code == 402 and refused.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert len(upstream.requests) == served  # nothing reached the upstream
    wide = await capped_key(running, allowed_models=["gpt-4o", "gpt-4o-mini"])
    raw = await running.client(wide["key"]).chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-metering-downgraded-from"] == "gpt-4o"
    assert upstream.requests[-1].body["model"] == "gpt-4o-mini"


async def test_a_late_settlement_gives_back_to_the_period_it_was_charged_in(redis: Any, make_config: Any) -> None:
    """The reaper charged a checkpoint just before a daily boundary; the late settlement,
    just after it, gives part back: that is yesterday's money, so today's spend does not
    go negative and the key still has only its limit to spend today."""
    ledger = Ledger(redis, make_config())
    await ledger.save_account("acme", {}, create=True)
    from proxy.keys import KeyStore
    from proxy.ledger import GrantSpec

    await ledger.grant("acme", GrantSpec("paid", 10_000_000))
    record, _ = await KeyStore(redis).create_key("acme", settings={"limit": "600", "reset": "daily"})

    async def admit(request_id: str, amount: int) -> None:
        await ledger.admit("acme", record.key_id, "gpt-4o", request_id, prompt_cost=amount, output_cost=0,
                           output_pico=0, prompt_tokens=1, max_output_tokens=0, choices=1)  # fmt: skip

    seconds, micros = await redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    boundary = next_boundary(now, "daily")
    ledger.clock_offset_ms = boundary - now - (ledger.config.billing.reservation_ttl_s + 5) * 1000
    await admit("req_a", 500)
    await ledger.extend("acme", [Checkpoint("req_a", Decimal(500), {"input_tokens": 1})])
    ledger.clock_offset_ms = boundary - now - 2_000  # the reaper charges the checkpoint, 2 s before midnight
    assert (await ledger.reap("acme")).closed == 1
    ledger.clock_offset_ms = boundary - now + 2_000  # the late settlement: 400 back, 2 s after
    await ledger.settle(SettleCall("acme", "gpt-4o", "req_a", Decimal(100), 1, {"key_id": record.key_id}))
    [figures] = await ledger.key_figures("acme", [record.key_id])
    assert figures.spend["total"] == 100 and figures.spend["day"] == 0 and figures.remaining == 600
    with pytest.raises(Exception) as refused:  # before: 1,000 fitted under the 600 daily limit
        await admit("req_b", 601)
    assert getattr(refused.value, "code", None) == "key_limit_exceeded"
    await admit("req_c", 600)
    assert not await reconcile.check_account(redis, "acme")
