"""A reservation is a true upper bound: no request, however built, takes a balance
below zero in `reject` mode. Real parts: openai SDK -> proxy -> fake upstream, real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest

from proxy import intake
from proxy.money import usd
from proxy.testing.upstream import DemoUpstream, real_prompt_tokens

from .conftest import Running
from .helpers import PDF, post
from .sample_text import heterogeneous_text

AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}


async def sdk_status(call: Awaitable[Any]) -> int:
    try:
        await call
    except openai.APIStatusError as err:
        return err.status_code
    return 200


async def statuses(n: int, call: Callable[[], Awaitable[int]]) -> list[int]:
    """The statuses of `n` concurrent calls."""
    return list(await asyncio.gather(*(call() for _ in range(n))))


async def test_file_parts_cannot_overrun_a_balance(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_input_tokens": 200_000}}})
    key = await running.account("acme", "0.05")
    upstream.fault.prompt_tokens = 200_000  # what the PDF really costs, known only upstream
    client = running.client(key)
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Summarise this."}, PDF]}]

    def attack() -> Awaitable[int]:
        return sdk_status(client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=100))

    assert await statuses(50, attack) == [402] * 50  # one worst case is 200k x $2.50/1M = $0.50
    view = await running.balance("acme")
    assert (view.balance, view.reserved, upstream.requests) == (50_000, 0, [])

    await running.fund("acme", "1.05")  # $1.10: two worst cases ($0.501 each), not three
    results = await statuses(50, attack)
    assert results.count(200) == 2 and results.count(402) == 48
    view = await running.balance("acme")
    assert view.balance == 1_100_000 - 2 * (200_000 * 5 // 2 + 5 * 10) and view.reserved == 0


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": [AUDIO]}]}, "messages[0].content[0]"),
        ("chat/completions", {"messages": [{"role": "user", "content": [PDF]}]}, "messages[0].content[0]"),
        ("chat/completions", {"messages": [{"role": "assistant", "audio": {"id": "audio_1"}}]}, "messages[0].audio"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "web_search_options": {}},
         "web_search_options"),
        ("responses", {"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ("responses", {"input": "x", "conversation": "conv_1"}, "conversation"),
        ("responses", {"prompt": {"id": "pmpt_1"}}, "prompt"),
        ("responses", {"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]"),
        ("responses", {"input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]},
         "tools[1]"),
        ("responses", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
         "input[0]"),
    ],
)  # fmt: skip
async def test_uncountable_parts_need_the_context_window(
    proxy: Running, upstream: DemoUpstream, endpoint: str, body: dict[str, Any], param: str
) -> None:
    key = await proxy.account("acme", "10")
    status, reply = await post(proxy, key, endpoint, {"model": "o3-mini", **body})  # o3-mini: no max_input_tokens
    error = reply["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert "max_input_tokens" in error["message"] and "o3-mini" in error["message"]
    assert upstream.requests == []
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 and view.reserved == 0


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "max_completion_tokens"),
        ("completions", {"prompt": "x"}, "max_tokens"),
        ("responses", {"input": "x"}, "max_output_tokens"),
    ],
)
@pytest.mark.parametrize("model", ["gpt-4o", "o3-mini"])  # o3-mini has no max_output_tokens: the default
async def test_the_reserved_cap_is_forwarded_when_the_client_names_none(
    start_proxy: Any, upstream: DemoUpstream, endpoint: str, body: dict[str, Any], field: str, model: str
) -> None:
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_output_tokens": 1000}}})
    key = await running.account("acme", "0.05")
    upstream.fault.uncapped_output_tokens = 20_000  # an upstream that writes far past a missing cap
    status, _ = await post(running, key, endpoint, {"model": model, **body})
    assert status == 200
    assert upstream.requests[-1].body[field] == 1000  # gpt-4o's limit; billing.default_max_output_tokens
    view = await running.balance("acme")
    assert 0 < view.balance < 50_000 and view.reserved == 0


async def test_a_cap_above_the_models_limit_is_forwarded_lowered(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_output_tokens": 1000}}})
    key = await running.account("acme", "1")
    await running.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=5000, n=2
    )
    assert upstream.requests[-1].body["max_tokens"] == 1000  # per choice; n=2 reserved 2000
    assert "max_completion_tokens" not in upstream.requests[-1].body


async def test_a_provider_that_only_takes_max_tokens(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy({"models": {"gpt-4o-mini": {"max_tokens_field": "max_tokens"}}})
    key = await running.account("acme", "1")
    await running.client(key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    sent = upstream.requests[-1].body
    assert sent["max_tokens"] == 16384 and "max_completion_tokens" not in sent


async def test_the_largest_of_two_max_fields_is_reserved(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "0.1")  # 5 gpt-4o tokens fit; 16,384 ($0.16) do not
    both: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
                            "max_completion_tokens": 5, "max_tokens": 100_000}  # fmt: skip
    status, reply = await post(proxy, key, "chat/completions", both)
    assert status == 402 and reply["error"]["code"] == "insufficient_quota" and upstream.requests == []
    await proxy.fund("acme", "1")
    status, _ = await post(proxy, key, "chat/completions", both)
    sent = upstream.requests[-1].body
    assert status == 200 and (sent["max_completion_tokens"], sent["max_tokens"]) == (5, 16384)  # lowered to the limit
    status, reply = await post(proxy, key, "chat/completions", {**both, "max_tokens": 0})
    assert status == 400 and reply["error"]["param"] == "max_tokens"  # every field must be a positive integer
    assert len(upstream.requests) == 1


async def test_clamp_rewrites_every_max_field_and_adds_the_endpoints_own(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    running: Running = await start_proxy({"billing": {"on_insufficient": "clamp"}})
    key = await running.account("acme", "0.001")  # affords under 100 gpt-4o output tokens
    client = running.client(key)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_completion_tokens=500, max_tokens=400
    )
    clamped = int(raw.headers["x-metering-clamped-max-tokens"])
    sent = upstream.requests[-1].body
    assert 0 < clamped < 100 and sent["max_completion_tokens"] == sent["max_tokens"] == clamped
    raw = await client.responses.with_raw_response.create(model="gpt-4o", input="x")
    assert upstream.requests[-1].body["max_output_tokens"] == int(raw.headers["x-metering-clamped-max-tokens"])


async def test_a_huge_heterogeneous_prompt_is_reserved_above_its_real_count(
    proxy: Running, upstream: DemoUpstream
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 16,
                            "messages": [{"role": "user", "content": heterogeneous_text(500_000)}]}  # fmt: skip
    upstream.fault.count_prompt = True  # the upstream bills tiktoken's real count
    real = real_prompt_tokens(body)
    real_cost = real * 5 // 2 + 5 * 10
    key = await proxy.account("acme", usd(real_cost + 1000))  # just above one request's real cost

    async def send() -> int:
        return (await post(proxy, key, "chat/completions", body))[0]

    results = await statuses(4, send)
    assert (await proxy.balance("acme")).balance == real_cost + 1000  # nothing served below its cost
    assert results == [402] * 4
    reservation = proxy.state.catalog.route("gpt-4o").reservation(intake.parse("chat", orjson.dumps(body)))
    print(f"500k chars: real {real} tokens, reserved {reservation.reserved_prompt_tokens}")
    assert reservation.reserved_prompt_tokens >= real
    reserve = reservation.prompt_cost + reservation.output_cost
    await proxy.fund("acme", usd(reserve - real_cost))  # now one worst case fits, not two
    results = await statuses(4, send)
    view = await proxy.balance("acme")
    assert sorted(results) == [200, 402, 402, 402]
    assert view.balance == reserve + 1000 - real_cost >= 0 and view.reserved == 0
