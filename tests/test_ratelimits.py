"""Spend-based tiers and rate limits that hold across instances (real Redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from proxy import keyspace
from proxy.ledger import GrantSpec, Ledger
from proxy.ratelimits import go_duration
from proxy.testing.upstream import DemoUpstream

from .conftest import Running, deep_merge

DAY_MS = 86_400_000
MESSAGES = [{"role": "user", "content": "hi"}]
TIERS = {"rate_tiers": {"basis": "paid", "tiers": [
    {"name": "free", "min_usd": "0", "rpm": 3, "tpm": 1_000_000},
    {"name": "tier-1", "min_usd": "5", "rpm": 10, "tpm": 1_000_000},
    {"name": "tier-2", "min_usd": "50", "rpm": 20, "tpm": 1_000_000, "min_days_since_first_payment": 7},
]}}  # fmt: skip


async def chat(running: Running, key: str, **kwargs: Any) -> Any:
    return await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, **kwargs
    )


def test_go_duration_matches_openai_format() -> None:
    assert [go_duration(ms) for ms in (0, 12, 1000, 1500, 59_999, 360_000)] == [
        "0s", "12ms", "1s", "1.5s", "59.999s", "6m0s"]  # fmt: skip


async def test_rpm_limit_429_with_headers_and_rejections_do_not_count(start_proxy: Any) -> None:
    running = await start_proxy(TIERS)
    key = await running.account("acme", "1")
    for remaining in (2, 1, 0):
        raw = await chat(running, key)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert raw.headers["x-ratelimit-reset-requests"] not in ("0s", "")  # this request frees up in ~60 s
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            await chat(running, key)
    err = caught.value
    assert err.body["code"] == "rate_limit_exceeded" and err.body["type"] == "requests"  # type: ignore[index]
    assert "Limit 3, Used 3, Requested 1" in err.message  # the second 429 did not count the first
    assert 0 < int(err.response.headers["retry-after-ms"]) <= 60_000
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    view = await running.balance("acme")
    # the 429s reserved and cost nothing: 3 requests of 10 * 0.15 + 5 * 0.60 = 4.5 micro-USD,
    # rounded with the carried remainder: 5 + 4 + 5 = 14 (exactly 13.5)
    assert view.reserved == 0 and view.balance == 1_000_000 - 14


async def test_limits_are_global_across_two_instances(start_proxy: Any) -> None:
    first, second = await start_proxy(TIERS), await start_proxy(TIERS)
    key = await first.account("acme", "1")
    await chat(first, key)
    await chat(second, key)
    await chat(first, key)
    with pytest.raises(openai.RateLimitError):
        await chat(second, key)


async def test_tier_upgrade_counts_what_was_used(start_proxy: Any) -> None:
    running = await start_proxy(TIERS)
    key = await running.account("acme", "1")
    for _ in range(3):
        await chat(running, key)
    with pytest.raises(openai.RateLimitError):
        await chat(running, key)
    await running.fund("acme", "5")  # lifetime paid $6: tier-1, rpm 10
    for _ in range(7):  # 3 of 10 already used: 7 more now
        raw = await chat(running, key)
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    with pytest.raises(openai.RateLimitError):
        await chat(running, key)
    assert (await running.balance("acme")).fields["tier"] == "tier-1"


async def test_min_days_since_first_payment(start_proxy: Any) -> None:
    running = await start_proxy(TIERS)
    await running.account("acme", "60")
    view = await running.balance("acme")
    assert view.fields["tier"] == "tier-1" and view.rpm == 10  # paid enough, too recently
    running.state.ledger.clock_offset_ms = 6 * DAY_MS
    assert (await running.balance("acme")).fields["tier"] == "tier-1"
    running.state.ledger.clock_offset_ms = 7 * DAY_MS + 1000
    view = await running.balance("acme")
    assert view.fields["tier"] == "tier-2" and view.rpm == 20


async def test_admin_override_pins_limits(start_proxy: Any) -> None:
    running = await start_proxy(TIERS)
    key = await running.account("acme", "100", rl_rpm="1")
    await chat(running, key)
    with pytest.raises(openai.RateLimitError):
        await chat(running, key)


async def test_tpm_counts_reserved_max_tokens_then_real_usage(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy({"rate_tiers": {"tiers": [{"name": "t", "min_usd": "0", "rpm": 100, "tpm": 10_000}]}})
    key = await running.account("acme", "10")
    client = running.client(key)
    upstream.fault.chunk_delay_s = 0.05
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=9000,
                                                  stream=True)  # fmt: skip
    # while the first stream holds ~9000 reserved tokens, a second large one does not fit
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=9000)
    assert caught.value.body["type"] == "tokens"  # type: ignore[index]
    assert "Limit 10000" in caught.value.message
    [chunk async for chunk in stream]
    # settled: the window now holds the real 15 tokens, so the large request fits
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                 max_tokens=9000)  # fmt: skip
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1000


async def test_stream_responses_carry_rate_headers(start_proxy: Any) -> None:
    running = await start_proxy(TIERS)
    key = await running.account("acme", "1")
    async with running.client(key).chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
        assert resp.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert "x-metering-cost-usd" not in resp.headers  # only known after the stream


async def test_sdk_honours_retry_after(start_proxy: Any) -> None:
    """The SDK retries a 429 after its retry-after-ms: Redis time is moved ahead to 1.5 s
    before the minute's requests leave the window, so the wait is real and short."""
    running = await start_proxy(TIERS)
    key = await running.account("acme", "1")
    redis = running.state.redis
    first_second = (await redis.time())[0]  # the requests' oldest second is this one or the next
    for _ in range(3):
        await chat(running, key)  # the minute's 3 requests
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    # the window drops a second 60 s after it began: leave this test 1.5 s of real time
    running.state.ledger.clock_offset_ms += first_second * 1000 + 58_500 - now_ms
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(running, key)
    retry_ms = int(caught.value.response.headers["retry-after-ms"])
    assert 0 < retry_ms <= 2_500
    started = asyncio.get_running_loop().time()
    completion = await running.client(key, max_retries=2).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
    )
    assert completion.choices
    waited = asyncio.get_running_loop().time() - started
    assert waited >= retry_ms / 1000 * 0.5  # it waited (the SDK jitters retry-after-ms down by up to 25%)


async def test_per_model_limits(start_proxy: Any) -> None:
    tiers = {"rate_tiers": {"tiers": [{"name": "t", "min_usd": "0", "rpm": 100, "tpm": 1_000_000,
                                       "models": {"gpt-4o": {"rpm": 1, "tpm": 1_000_000}}}]}}  # fmt: skip
    running = await start_proxy(tiers)
    key = await running.account("acme", "10")
    client = running.client(key)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
    assert "Limit 1, Used 1" in caught.value.message
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)  # other models free


async def test_a_staggered_reload_cannot_make_instances_fight_over_a_tier(
    redis: Any, make_config: Any, upstream: Any
) -> None:
    hooks = {"webhooks": {"url": "http://127.0.0.1:9/hooks", "secret": "whsec_" + "QUJDREVGR0hJSktM"}}
    tiers = lambda paid: {"rate_tiers": {"tiers": [  # noqa: E731
        {"name": "free", "min_usd": "0", "rpm": 100, "tpm": 1_000_000},
        {"name": "tier-1", "min_usd": paid, "rpm": 500, "tpm": 2_000_000}]}}  # fmt: skip
    old = Ledger(redis, make_config(deep_merge(hooks, tiers("5"))))  # $10 paid: tier-1 here
    await old.claim_tier_generation()
    await old.save_account("acme", {}, create=True)
    await old.grant("acme", GrantSpec("paid", 10_000_000))
    new = Ledger(redis, make_config(deep_merge(hooks, tiers("50"))))  # the reloaded config: free
    await new.claim_tier_generation()
    restarted_old = Ledger(redis, old.config)  # an old instance restarted mid-rollout
    assert await restarted_old.claim_tier_generation() == old.tier_generation < new.tier_generation
    for _ in range(5):  # requests land on instances of both configs in turn
        for ledger in (old, new, restarted_old):
            await ledger.touch("acme")
    outbox = [orjson.loads(e) for e in await redis.lrange(keyspace.outbox("acme"), 0, -1)]
    changes = [e["data"] for e in outbox if e["type"] == "tier.changed"]
    # the grant moved it up under the old table; the newest table moved it once, for good
    assert changes == [{"from": "free", "to": "tier-1", "account_id": "acme"},
                       {"from": "tier-1", "to": "free", "account_id": "acme"}]  # fmt: skip
    assert (await old.touch("acme")).fields["tier"] == "free"
