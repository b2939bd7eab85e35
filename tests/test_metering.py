"""The metered path end to end: openai SDK -> proxy -> fake upstream, real Redis."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from proxy import keyspace
from proxy.testing.upstream import DemoUpstream

from .conftest import UPSTREAM_KEY, Running


async def test_chat_charges_exact_cost(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens = 1000
    upstream.fault.cached_tokens = 400
    upstream.fault.output_tokens = 7
    client = proxy.client(key)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens == 1000
    # (1000 - 400) * 2.50 + 400 * 1.25 + 7 * 10.00 micro-USD = 1500 + 500 + 70
    assert raw.headers["x-metering-cost-usd"] == "0.002070"
    assert raw.headers["x-metering-balance-usd"] == "9.997930"
    assert raw.headers["x-request-id"].startswith("req_")
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 - 2070
    assert view.reserved == 0
    sent = upstream.requests[-1]
    assert sent.body["model"] == "gpt-4o-2024-08-06"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_reasoning_tokens_are_not_charged_twice(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens = 100
    upstream.fault.output_tokens = 10
    upstream.fault.reasoning_tokens = 30  # completion_tokens = 40, reasoning included
    raw = await proxy.client(key).chat.completions.with_raw_response.create(
        model="o3-mini", messages=[{"role": "user", "content": "think"}]
    )
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 40
    # 100 * 1.10 + 40 * 4.40 = 110 + 176
    assert raw.headers["x-metering-cost-usd"] == "0.000286"


async def test_half_up_rounding_once_per_request(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "1")
    upstream.fault.prompt_tokens = 3  # 3 * 0.15 = 0.45 micro
    upstream.fault.cached_tokens = 0
    upstream.fault.output_tokens = 1  # 1 * 0.60 = 0.60 micro -> total 1.05 -> 1
    raw = await proxy.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert raw.headers["x-metering-cost-usd"] == "0.000001"
    upstream.fault.prompt_tokens = 5  # 0.75 + 0.60 = 1.35 -> 1 ; check .5 goes up with 0.30 input
    raw = await proxy.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert raw.headers["x-metering-cost-usd"] == "0.000001"


async def test_markup_and_embeddings(start_proxy, upstream: DemoUpstream) -> None:  # type: ignore[no-untyped-def]
    running = await start_proxy({"billing": {"markup_percent": "20"}})
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens = 1_000_000
    raw = await running.client(key).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b", "c"]
    )
    assert len(raw.parse().data) == 3
    # 1M tokens * $0.02/1M * 1.2
    assert raw.headers["x-metering-cost-usd"] == "0.024000"


async def test_402_when_credits_cannot_cover_reservation(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "0.001")
    client = proxy.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        # reserves 1000 output tokens * $10/1M = $0.01 > $0.001
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 402
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota" and body["type"] == "insufficient_quota"
    assert upstream.requests == []  # nothing forwarded
    view = await proxy.balance("acme")
    assert view.balance == 1000 and view.reserved == 0


async def test_upstream_error_passes_through_and_costs_nothing(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.status = 400
    upstream.fault.error_message = "This model's maximum context length is 128000 tokens."
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "maximum context length" in str(caught.value)
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 and view.reserved == 0
    entries = await proxy.state.redis.xrange(keyspace.account("acme", "ledger"))
    assert [e[1]["e"].count('"type":"release"') for e in entries][-1] == 1


async def test_errors_have_openai_shape(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    # 401: unknown key
    with pytest.raises(openai.AuthenticationError) as auth:
        await proxy.client("sk-nope-nope-nope").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert auth.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    # 400: unknown model, bad max_tokens, missing messages
    client = proxy.client(key)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o", messages=[])
    assert upstream.requests == []
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 and view.reserved == 0


async def test_model_not_allowed_and_413(proxy: Running, upstream: DemoUpstream) -> None:
    await proxy.account("acme", "10")
    _, key = await proxy.state.key_store.create_key("acme", allowed_models=["gpt-4o-mini"])
    client = proxy.client(key)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    with pytest.raises(openai.APIStatusError) as too_big:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 2_000_000}]
        )
    assert too_big.value.status_code == 413
    assert upstream.requests == []


async def test_revoked_key_stops_at_once(proxy: Running, upstream: DemoUpstream) -> None:
    await proxy.account("acme", "10")
    record, key = await proxy.state.key_store.create_key("acme")
    client = proxy.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    await proxy.state.key_store.revoke_key(record.key_id)
    with pytest.raises(openai.AuthenticationError):  # the key record is still cached here
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert len(upstream.requests) == 1


async def test_suspended_account_is_403(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    await proxy.state.ledger.save_account("acme", {"status": "suspended"}, create=False)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert denied.value.body["code"] == "account_suspended"  # type: ignore[index]
    assert upstream.requests == []


async def test_redis_down_is_503_and_nothing_forwarded(proxy: Running, upstream: DemoUpstream, redis_server) -> None:  # type: ignore[no-untyped-def]
    key = await proxy.account("acme", "10")
    client = proxy.client(key)
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    forwarded = len(upstream.requests)
    redis_server.stop()
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 503
        assert len(upstream.requests) == forwarded
    finally:
        await redis_server.start()


async def test_ledger_sums_to_balance(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "1")
    await proxy.fund("acme", "2.5", kind="promotional")
    client = proxy.client(key)
    for _ in range(5):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    entries = await proxy.state.redis.xrange(keyspace.account("acme", "ledger"))
    import orjson

    total = sum(int(orjson.loads(fields["e"])["amount"]) for _, fields in entries)
    view = await proxy.balance("acme")
    assert total == view.balance
    assert Decimal(view.balance) < Decimal(3_500_000)


async def test_unknown_route_is_an_openai_shaped_404(proxy: Running) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v1/nope") as resp:
            body = await resp.json()
        assert resp.status == 404 and body["error"]["type"] == "invalid_request_error"
        async with session.get(f"{proxy.url}/v1/chat/completions") as resp:
            assert resp.status == 405 and "error" in await resp.json()


async def test_no_max_tokens_reserves_the_models_cap(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "0.1")  # covers 4096 gpt-4o output tokens, not the 16384 cap
    client = proxy.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 402 and upstream.requests == []
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=4096)


async def test_prompt_stored_upstream_reserves_the_context_window(start_proxy, upstream: DemoUpstream) -> None:  # type: ignore[no-untyped-def]
    running = await start_proxy({"models": {"o3-mini": {"max_input_tokens": 200_000}}})
    key = await running.account("acme", "0.1")  # a 200k-token prompt costs $0.22
    client = running.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.responses.create(model="o3-mini", input="and now?", previous_response_id="resp_1",
                                      max_output_tokens=16)  # fmt: skip
    assert caught.value.status_code == 402 and upstream.requests == []
    await client.responses.create(model="o3-mini", input="hello", max_output_tokens=16)  # countable: fits
