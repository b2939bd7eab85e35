"""Streams, every endpoint, and no money lost when a stream goes wrong."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import openai
import pytest

from proxy import prompts, tokens
from proxy.catalog import PROMPT_MARGIN_TOKENS
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import entries, last_entry_id, next_entry

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


# paced: each event its own network read, as a model streams (the relay's one-event path)
PACING_S = [0.0, 0.005]


@pytest.mark.parametrize("pacing_s", PACING_S)
async def test_chat_stream_with_usage_asked(proxy: Running, upstream: DemoUpstream, pacing_s: float) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 100, 6
    upstream.fault.chunk_delay_s = pacing_s
    stream = await proxy.client(key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == [] and chunks[-1] is usage_chunks[0]
    assert (usage_chunks[0].usage.model_extra or {})["cost_usd"] == "0.000310"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("tok0 tok1")
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 - (100 * 2.5 + 6 * 10) and view.reserved == 0


@pytest.mark.parametrize("pacing_s", PACING_S)
async def test_chat_stream_hides_the_forced_usage_chunk(
    proxy: Running, upstream: DemoUpstream, pacing_s: float
) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 100, 6
    upstream.fault.chunk_delay_s = pacing_s
    stream = await proxy.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)  # no usage-only chunk leaked
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert entry["amount"] == "-310" and entry["estimated"] is False


async def test_legacy_completions_stream_is_metered(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 20, 4
    stream = await proxy.client(key).completions.create(model="gpt-4o-mini", prompt="Say hi", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text.startswith("tok0")
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert entry["usage"]["output_tokens"] == 4 and entry["estimated"] is False  # not zero (LiteLLM #8349)


async def test_responses_stream_and_non_stream(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens = 1000, 200
    upstream.fault.output_tokens, upstream.fault.reasoning_tokens = 5, 20
    client = proxy.client(key)
    raw = await client.responses.with_raw_response.create(model="o3-mini", input="hello")
    # (1000-200)*1.10 + 200*0.55 + 25*4.40 = 880 + 110 + 110
    assert raw.headers["x-metering-cost-usd"] == "0.001100"
    stream = await client.responses.create(model="o3-mini", input="hello", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed"
    usage = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert [e["amount"] for e in usage] == ["-1100", "-1100"]  # streamed usage not lost (LiteLLM #38065)
    assert usage[1]["usage"] == {"input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 25,
                                 "reasoning_tokens": 20}  # fmt: skip


async def test_responses_incomplete_without_usage_is_estimated(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.responses_final_event = "response.failed"
    stream = await proxy.client(key).responses.create(model="o3-mini", input="hello", stream=True)
    [event async for event in stream]
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert entry["estimated"] is True and int(entry["amount"]) < 0


async def test_upstream_cut_mid_stream_charges_an_estimate(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.cut_after_chunks = 50, 6
    stream = await proxy.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="ended unexpectedly"):
        [chunk async for chunk in stream]
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    enc = tokens.get_encoding("o200k_base")
    streamed = len(enc.encode("tok0" + "".join(f" tok{i}" for i in range(1, 5))))  # role chunk + 5 deltas
    assert entry["estimated"] is True
    assert entry["usage"]["output_tokens"] == streamed
    assert entry["usage"]["input_tokens"] == prompts.estimate_prompt_tokens("chat", {"messages": MESSAGES}, enc)
    assert (await proxy.balance("acme")).reserved == 0


async def test_a_stream_ending_mid_event_fails_cleanly_in_the_sdk(proxy: Running, upstream: DemoUpstream) -> None:
    """An upstream body that ends cleanly inside an event: the client gets our error event
    on its own, not run into the unfinished bytes (which openai-python would fail to parse)."""
    key = await proxy.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.end_mid_event_after = 50, 3
    client = proxy.client(key)
    for usage in ({}, {"stream_options": {"include_usage": True}}):
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, **usage)
        with pytest.raises(openai.APIError, match="ended unexpectedly"):
            [chunk async for chunk in stream]
    charges = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert len(charges) == 2 and all(e["estimated"] is True and int(e["amount"]) < 0 for e in charges)
    assert (await proxy.balance("acme")).reserved == 0


async def test_client_disconnect_mid_stream(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.chunk_delay_s = 200, 0.02
    before = await last_entry_id(proxy.state.redis, "acme")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{proxy.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-4o", "messages": MESSAGES, "stream": True})  # fmt: skip
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data: ")
            if seen == 5:
                break
        resp.close()  # the client goes away mid-stream
    entry = await next_entry(proxy.state.redis, "acme", before)
    assert entry["type"] == "usage" and entry["estimated"] is True
    assert 4 <= entry["usage"]["output_tokens"] < 100  # what was streamed, not the 200 asked
    await asyncio.wait_for(upstream.stream_closed.wait(), 5)
    assert upstream.stream_chunks_sent < 150  # the upstream was closed, not drained
    assert (await proxy.balance("acme")).reserved == 0


async def test_upstream_5xx_before_first_byte_costs_nothing(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.status = 503
    with pytest.raises(openai.InternalServerError) as caught:
        await proxy.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 503
    view = await proxy.balance("acme")
    assert view.balance == 10_000_000 and view.reserved == 0


async def test_upstream_unreachable_is_502_and_timeout_504(start_proxy, upstream: DemoUpstream) -> None:  # type: ignore[no-untyped-def]
    from proxy.embedded import free_port

    dead = await start_proxy({"upstreams": {"openai": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}}})
    key = await dead.account("acme", "10")
    with pytest.raises(openai.APIStatusError) as caught:
        await dead.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    slow = await start_proxy({"upstreams": {"openai": {"timeout_s": 0.3}}})
    upstream.fault.delay_before_headers_s = 2
    with pytest.raises(openai.APIStatusError) as caught:
        await slow.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 504
    view = await slow.balance("acme")
    assert view.balance == 10_000_000 and view.reserved == 0


async def test_a_stream_is_relayed_as_it_arrives_not_buffered(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.hold_after_chunks = 4, 2  # the upstream stops after two events
    stream = await proxy.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = aiter(stream)
    # they arrive while the upstream still holds the rest (a buffering proxy would time out here)
    first = [await asyncio.wait_for(anext(chunks), 10) for _ in range(2)]
    assert upstream.holding.is_set() and not upstream.release.is_set()
    assert first[1].choices[0].delta.content == "tok0"
    upstream.release.set()
    rest = [chunk async for chunk in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == " tok1 tok2 tok3"


async def test_embeddings_list_and_models_per_key(proxy: Running, upstream: DemoUpstream) -> None:
    await proxy.account("acme", "10")
    _, key = await proxy.state.key_store.create_key("acme", allowed_models=["text-embedding-3-small", "gpt-4o"])
    client = proxy.client(key)
    result = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2
    assert sorted(m.id for m in (await client.models.list()).data) == ["gpt-4o", "text-embedding-3-small"]


async def test_clamp_lowers_max_tokens_to_what_balance_affords(start_proxy, upstream: DemoUpstream) -> None:  # type: ignore[no-untyped-def]
    running = await start_proxy({"billing": {"on_insufficient": "clamp"}})
    key = await running.account("acme", "0.001")  # 1000 micro-USD
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=5000
    )
    clamped = int(raw.headers["x-metering-clamped-max-tokens"])
    prompt = upstream.requests[-1].body
    assert prompt["max_tokens"] == clamped
    enc = tokens.get_encoding("o200k_base")
    counted = prompts.estimate_prompt_tokens("chat", {"messages": MESSAGES}, enc)
    reserved = counted + -(-counted // 20) + PROMPT_MARGIN_TOKENS  # the prompt's worst case
    prompt_cost = math.ceil(reserved * 2.5)
    assert 0 < clamped and prompt_cost + clamped * 10 <= 1000 < prompt_cost + (clamped + 1) * 10
