"""Every price dimension: service tiers, long context, audio, predicted outputs.
Reserved at the worst the request may cost, charged at what the upstream reports."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest
import yaml

from proxy import intake, tokens
from proxy.catalog import price_of
from proxy.configfile import ConfigError, parse_config
from proxy.money import Usage
from proxy.testing.upstream import DemoUpstream

from .conftest import BASE_CONFIG, Running, deep_merge
from .helpers import PDF, entries, post

TIERS = {"models": {"gpt-4o": {"price": {"service_tiers": {
    "priority": {"input": "4.25", "cached_input": "2.125", "output": "17.00"},
    "flex": {"input": "1.25", "output": "5.00"},  # cached_input: the base 1.25
}}}}}  # fmt: skip
LONG = {"models": {"gpt-4o": {"max_input_tokens": 400_000, "price": {"long_context": [
    {"above_input_tokens": 200_000, "input": "5.00", "output": "15.00"},  # cached_input: the base 1.25
]}}}}  # fmt: skip
AUDIO = {"models": {"gpt-4o": {"price": {"audio_input": "40.00", "audio_output": "80.00"}}}}
HELLO: Any = [{"role": "user", "content": "hello"}]


async def test_priority_is_reserved_at_its_price(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(TIERS)
    key = await running.account("acme", "0.015")  # 1,000 output tokens: $0.010 standard, $0.017 priority
    client = running.client(key)
    for tier in ("priority", "auto"):  # `auto` may be served at the project's default tier: priority too
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1000, service_tier=tier)
        assert caught.value.status_code == 402 and upstream.requests == []
    await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1000, service_tier="default")
    assert upstream.requests[-1].body["service_tier"] == "default"  # passed through as asked


@pytest.mark.parametrize(
    ("asked", "reported", "cost"),
    [
        ("auto", "priority", "0.004335"),  # 1000 x 4.25 + 5 x 17.00
        ("flex", "flex", "0.001275"),  # 1000 x 1.25 + 5 x 5.00
        ("priority", "default", "0.002550"),  # the tier that served it, not the one asked
    ],
)
async def test_charged_at_the_tier_the_upstream_reports(
    start_proxy: Any, upstream: DemoUpstream, asked: str, reported: str, cost: str
) -> None:
    running: Running = await start_proxy(TIERS)
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.service_tier = 1000, reported
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=HELLO,
        max_tokens=10,
        service_tier=asked,  # type: ignore[arg-type]
    )
    assert raw.headers["x-metering-cost-usd"] == cost


async def test_streams_report_their_tier_too(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(TIERS)
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.service_tier = 1000, "priority"
    client = running.client(key)
    async for _ in await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True):
        pass
    async for _ in await client.responses.create(model="gpt-4o", input="hello", stream=True):
        pass
    charged = [e["amount"] for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert charged == ["-4335", "-4335"]


async def test_long_context_prices_the_whole_request(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(LONG)
    key = await running.account("acme", "10")
    client = running.client(key)
    costs = []
    for prompt_tokens in (200_000, 200_001):
        upstream.fault.prompt_tokens = prompt_tokens
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, max_tokens=10)
        costs.append(raw.headers["x-metering-cost-usd"])
    assert costs == ["0.500050", "1.000080"]  # 200,000 x 2.50 + 5 x 10; 200,001 x 5.00 + 5 x 15 (rounded)


async def test_long_context_is_reserved_at_the_worst_rates(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(LONG)
    body = {"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": [PDF]}]}
    reservation = running.state.catalog.route("gpt-4o").reservation(intake.parse("chat", orjson.dumps(body)))
    assert (reservation.reserved_prompt_tokens, reservation.prompt_cost) == (400_000, 2_000_000)  # at 5.00
    assert reservation.output_cost == 1500  # 100 x 15.00
    key = await running.account("acme", "1.5")  # the standard price ($1.001) would fit
    status, _ = await post(running, key, "chat/completions", body)
    assert status == 402 and upstream.requests == []


async def test_audio_tokens_have_their_own_price(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(AUDIO)
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.audio_prompt_tokens = 100, 60  # audio is part of prompt_tokens
    upstream.fault.audio_completion_tokens = 20  # completion_tokens: 5 text + 20 audio
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, max_tokens=50, modalities=["text", "audio"]
    )
    assert raw.headers["x-metering-cost-usd"] == "0.004150"  # 40 x 2.50 + 60 x 40 + 5 x 10 + 20 x 80
    (entry,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert entry["usage"]["audio_input_tokens"] == 60 and entry["usage"]["audio_output_tokens"] == 20


async def test_audio_output_is_reserved_at_its_price(start_proxy: Any, upstream: DemoUpstream) -> None:
    running: Running = await start_proxy(AUDIO)
    key = await running.account("acme", "0.005")  # 100 output tokens: $0.001 as text, $0.008 as audio
    client = running.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=100, modalities=["audio"])
    assert caught.value.status_code == 402 and upstream.requests == []
    await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=100)


async def test_a_prediction_is_reserved_beyond_the_cap(proxy: Running) -> None:
    prediction = "def main():\n    return 42\n" * 20
    body = {"model": "gpt-4o", "messages": HELLO, "max_tokens": 100, "n": 2,
            "prediction": {"type": "content", "content": [{"type": "text", "text": prediction}]}}  # fmt: skip
    route = proxy.state.catalog.route("gpt-4o")
    reservation = route.reservation(intake.parse("chat", orjson.dumps(body)))
    predicted = len(tokens.get_encoding("o200k_base").encode(prediction))
    assert reservation.reserved_output_tokens >= 2 * (100 + predicted)  # rejected predictions bill as output
    assert reservation.cap == 100


def test_cost_prefers_the_reported_tier_then_the_asked_one() -> None:
    price = price_of(_price(TIERS), Decimal(0))
    usage = Usage(input_tokens=1000, output_tokens=10)
    assert price.cost(usage) == 2600 and price.cost(usage, "priority") == 4420
    assert price.cost(Usage(1000, 0, 10, service_tier="flex"), "priority") == 1300
    assert price.exact_cost(Usage(input_tokens=3)) == Decimal("7.50")  # exact, not rounded


def _price(extra: dict[str, Any]) -> Any:
    """A model's configured price, parsed from a whole config as `config check` would."""
    data = deep_merge(BASE_CONFIG, {"redis": {"url": "redis://127.0.0.1:1/0"}, **extra})
    return parse_config(yaml.safe_dump(data), env={}).models["gpt-4o"].price


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ({"service_tiers": {"turbo": {"input": "9"}}}, "unknown service tier 'turbo'"),
        ({"service_tiers": {"priority": {"output": "-1"}}}, "must not be negative"),
        ({"long_context": [{"above_input_tokens": 2, "input": "5"}, {"above_input_tokens": 1, "input": "6"}]},
         "above_input_tokens must be unique and ascending"),
        ({"long_context": [{"above_input_tokens": 1, "input": "5"}], "service_tiers": {"flex": {"input": "1"}}},
         "service_tiers.flex.long_context must be set when long_context is"),
        ({"audio_output": "1.0000001"}, "at most 6 decimal places"),
    ],
)  # fmt: skip
def test_price_dimensions_are_validated(price: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _price({"models": {"gpt-4o": {"price": price}}})
    assert any(message in line and "models.gpt-4o.price" in line for line in caught.value.errors), caught.value.errors
