"""The demo upstream must be parseable by the official OpenAI SDK, faults included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from proxy.testing.upstream import DemoUpstream


@pytest_asyncio.fixture
async def running() -> AsyncIterator[tuple[DemoUpstream, str]]:
    up = DemoUpstream()
    url = await up.start()
    yield up, url
    await up.stop()


@pytest.fixture
def upstream(running: tuple[DemoUpstream, str]) -> DemoUpstream:
    return running[0]


@pytest_asyncio.fixture
async def client(running: tuple[DemoUpstream, str]) -> AsyncIterator[AsyncOpenAI]:
    c = AsyncOpenAI(base_url=running[1], api_key="x", max_retries=0)
    yield c
    await c.close()


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.asyncio
async def test_chat_non_stream_usage(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.cached_tokens, upstream.fault.reasoning_tokens = 4, 3
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=3)
    assert r.choices[0].message.content == "tok0 tok1 tok2"
    assert r.choices[0].finish_reason == "length"
    assert r.model == "gpt-4o-mini" and r.id.startswith("chatcmpl-")
    u = r.usage
    assert u and (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (10, 6, 16)
    assert u.prompt_tokens_details and u.prompt_tokens_details.cached_tokens == 4
    assert u.completion_tokens_details and u.completion_tokens_details.reasoning_tokens == 3
    rec = upstream.requests[-1]
    assert rec.path == "/v1/chat/completions" and rec.headers["Authorization"] == "Bearer x"
    assert rec.body["model"] == "gpt-4o-mini"


@pytest.mark.asyncio
async def test_chat_stream_include_usage(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    # role + 5 content deltas + finish chunk + usage chunk
    assert len(chunks) == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "tok0 tok1 tok2 tok3 tok4"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (10, 5)
    assert upstream.stream_chunks_sent == 9  # includes data: [DONE]
    assert upstream.stream_closed.is_set() and not upstream.client_disconnected


@pytest.mark.asyncio
async def test_chat_stream_without_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 7
    assert all(c.usage is None and c.choices for c in chunks)


@pytest.mark.asyncio
async def test_omit_usage_even_when_asked(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.omit_usage = True
    stream = await client.chat.completions.create(
        model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert len(chunks) == 7 and all(c.usage is None for c in chunks)


@pytest.mark.asyncio
async def test_legacy_completions_stream(client: AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="m", prompt="hi", max_tokens=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


@pytest.mark.asyncio
async def test_responses_stream(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.cached_tokens, upstream.fault.reasoning_tokens = 2, 1
    stream = await client.responses.create(model="gpt-4o", input="hi", stream=True, max_output_tokens=4)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types.count("response.output_text.delta") == 4
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == "tok0 tok1 tok2 tok3"
    u = final.response.usage
    assert u and (u.input_tokens, u.output_tokens, u.total_tokens) == (10, 5, 15)
    assert u.input_tokens_details.cached_tokens == 2 and u.output_tokens_details.reasoning_tokens == 1


@pytest.mark.asyncio
async def test_responses_stream_helper_and_failed(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    async with client.responses.stream(model="gpt-4o", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 tok3 tok4"
    upstream.fault.responses_final_event = "response.failed"
    stream = await client.responses.create(model="gpt-4o", input="hi", stream=True)
    last = [e async for e in stream][-1]
    assert last.type == "response.failed" and last.response.usage is None


@pytest.mark.asyncio
async def test_embeddings_list_input(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    r = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert len(r.data) == 3 and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == 10 and r.usage.total_tokens == 10
    floats = await client.embeddings.create(model="e", input=[[1, 2], [3]], encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in r.data[:2]]


@pytest.mark.asyncio
async def test_models(client: AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert "gpt-4o-mini" in ids


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [400, 429, 500])
async def test_error_status(upstream: DemoUpstream, client: AsyncOpenAI, status: int) -> None:
    upstream.fault.status = status
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="m", messages=MSG)
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and "message" in info.value.body
    assert len(upstream.requests) == 1  # recorded even though the fault answered


@pytest.mark.asyncio
async def test_cut_after_chunks_breaks_sdk_stream(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.cut_after_chunks = 3
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        async for c in stream:
            got.append(c)
    assert len(got) == 3 and upstream.stream_chunks_sent == 3


@pytest.mark.asyncio
async def test_client_disconnect_is_detected(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.chunk_delay_s = 0.05
    upstream.fault.output_tokens = 50
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    await stream.__anext__()
    await stream.close()
    await asyncio.wait_for(upstream.stream_closed.wait(), 2)
    assert upstream.client_disconnected and upstream.stream_chunks_sent < 52


@pytest.mark.asyncio
async def test_cap_knobs(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    upstream.fault.uncapped_output_tokens = 40  # without a cap it writes 40; a cap still holds
    r = await client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert r.usage and r.usage.completion_tokens == 40
    r = await client.chat.completions.create(model="gpt-4o", messages=MSG, max_completion_tokens=3)
    assert r.usage and r.usage.completion_tokens == 3
    upstream.fault.ignore_max_tokens = True  # an upstream that ignores caps altogether
    r = await client.chat.completions.create(model="gpt-4o", messages=MSG, max_completion_tokens=3)
    assert r.usage and r.usage.completion_tokens == 5


@pytest.mark.asyncio
async def test_tier_audio_and_counted_prompt_knobs(upstream: DemoUpstream, client: AsyncOpenAI) -> None:
    f = upstream.fault
    f.service_tier, f.audio_prompt_tokens, f.audio_completion_tokens, f.count_prompt = "flex", 2, 7, True
    r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello world"}])
    assert r.service_tier == "flex" and r.usage
    assert r.usage.prompt_tokens == 2 + 4 + 3  # "hello world": 2 tokens, a message, the reply priming
    assert r.usage.completion_tokens == 5 + 7
    assert r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.audio_tokens == 2
    resp = await client.responses.create(model="gpt-4o", input="hi")
    assert resp.service_tier == "flex"
