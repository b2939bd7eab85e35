"""`usage.cost_usd` in what the client receives: every endpoint's body, the streamed usage
event, parsed by the official SDK, and equal to the header and the ledger."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import receipt
from proxy.embedded import EmbeddedRedis
from proxy.money import Usage, usd
from proxy.relay import forwardable
from proxy.sse import SSEParser
from proxy.testing.upstream import DemoUpstream
from proxy.upstream import Scrubber
from proxy.usage import StreamTap

from .conftest import UPSTREAM_KEY, Running
from .helpers import entries, wait_for

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


async def charged(running: Running) -> list[str]:
    """What each usage entry charged, oldest first, as the client sees amounts."""
    return [usd(-int(e["amount"])) for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]


def cost_of(usage: Any) -> Any:
    """The SDK keeps fields it does not know: `usage.cost_usd` is one (pydantic's extras)."""
    assert usage is not None
    assert usage.cost_usd == usage.model_extra["cost_usd"]
    return usage.cost_usd


# -- non-streamed bodies -------------------------------------------------------------


async def test_every_endpoints_body_carries_the_charged_cost(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 1000, 200, 7
    client = proxy.client(key)
    raws = [
        await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES),
        await client.completions.with_raw_response.create(model="gpt-4o-mini", prompt="Say hi"),
        await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"]),
        await client.responses.with_raw_response.create(model="o3-mini", input="hello"),
    ]
    costs = [cost_of(raw.parse().usage) for raw in raws]
    assert costs == [raw.headers["x-metering-cost-usd"] for raw in raws] == await charged(proxy)
    assert costs[0] == "0.002320"  # (1000-200) x 2.50 + 200 x 1.25 + 7 x 10.00 micro-USD
    chat = raws[0].parse()
    assert chat.usage is not None and chat.usage.prompt_tokens == 1000  # the rest as the upstream sent it
    assert chat.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6"


async def test_a_body_without_usage_gets_ours_marked_estimated(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.omit_usage = True
    client = proxy.client(key)
    chat = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    embedded = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    (chat_entry, embed_entry) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    usage = chat.parse().usage
    assert cost_of(usage) == chat.headers["x-metering-cost-usd"] == usd(-int(chat_entry["amount"]))
    assert usage is not None and usage.model_extra["estimated"] is True and chat_entry["estimated"] is True
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        chat_entry["usage"]["input_tokens"],
        chat_entry["usage"]["output_tokens"],
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    e_usage = embedded.parse().usage
    assert cost_of(e_usage) == embedded.headers["x-metering-cost-usd"] == usd(-int(embed_entry["amount"]))
    assert e_usage.prompt_tokens == embed_entry["usage"]["input_tokens"] > 0


# -- streams ---------------------------------------------------------------------------


async def test_streamed_usage_events_carry_the_charged_cost(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens, upstream.fault.reasoning_tokens = 100, 6, 4
    client = proxy.client(key)
    with_usage = {"stream": True, "stream_options": {"include_usage": True}}
    chat = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **with_usage)]
    text = [c async for c in await client.completions.create(model="gpt-4o-mini", prompt="Say hi", **with_usage)]
    events = [e async for e in await client.responses.create(model="o3-mini", input="hello", stream=True)]
    shown = [cost_of(chat[-1].usage), cost_of(text[-1].usage), cost_of(events[-1].response.usage)]  # type: ignore[union-attr]
    assert shown == await charged(proxy)
    assert shown[0] == "0.000350"  # 100 x 2.50 + 10 x 10.00 micro-USD
    assert chat[-1].choices == [] and chat[-1].usage is not None and chat[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chat[:-1]) and events[-1].type == "response.completed"


async def test_a_client_that_did_not_ask_for_usage_sees_no_usage_chunk(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    for endpoint, body in (("chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
                           ("completions", {"model": "gpt-4o-mini", "prompt": "Say hi"})):  # fmt: skip
        stream = await raw_stream(proxy, key, endpoint, {**body, "stream": True})
        *chunks, done = SSEParser().feed(stream)
        assert done.data == b"[DONE]" and b"cost_usd" not in stream
        assert all(orjson.loads(c.data)["choices"] and not orjson.loads(c.data)["usage"] for c in chunks)
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}  # forced on upstream
    assert len(await charged(proxy)) == 2


async def test_the_usage_chunk_comes_whole_just_before_done(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    events = SSEParser().feed(await raw_stream(proxy, key, "chat/completions", body))
    *content, usage_chunk, done = events
    assert done.data == b"[DONE]" and all(b"cost_usd" not in e.data for e in content)
    payload = orjson.loads(usage_chunk.data)
    assert payload["choices"] == [] and payload["usage"]["cost_usd"] == (await charged(proxy))[0]
    assert payload["usage"]["prompt_tokens"] == upstream.fault.prompt_tokens
    assert payload["id"] == orjson.loads(content[0].data)["id"]


async def test_a_stream_without_usage_gets_ours_marked_estimated(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.omit_usage = True
    client = proxy.client(key)
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    ]
    upstream.fault.responses_final_event = "response.failed"  # no usage in its final event
    events = [e async for e in await client.responses.create(model="o3-mini", input="hello", stream=True)]
    chat_entry, responses_entry = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and cost_of(usage) == usd(-int(chat_entry["amount"]))
    assert usage is not None and usage.model_extra["estimated"] is True
    assert usage.completion_tokens == chat_entry["usage"]["output_tokens"] > 0
    final = events[-1].response.usage  # type: ignore[union-attr]
    assert cost_of(final) == usd(-int(responses_entry["amount"])) and final.model_extra["estimated"] is True
    assert final.input_tokens == responses_entry["usage"]["input_tokens"]


async def raw_stream(running: Running, key: str, endpoint: str, body: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{running.url}/v1/{endpoint}", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.status == 200
            return await resp.read()


async def test_a_cost_not_known_yet_is_left_out_and_shown_once_settled(
    start_proxy: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis
) -> None:
    """Redis dies after admission: the settlement waits in the journal, so neither the
    header nor the body can say what will be charged; the generation says it later."""
    running: Running = await start_proxy({"redis": {"url": own_redis.url}})
    key = await running.account("acme", "10")
    client = running.client(key)
    upstream.fault.hold_after_chunks = 2
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    streamed = raw.headers["x-request-id"]
    await asyncio.wait_for(upstream.holding.wait(), 10)
    assert own_redis.process is not None
    own_redis.process.kill()
    own_redis.process.wait()
    upstream.release.set()
    chunks = [c async for c in raw.parse()]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == upstream.fault.prompt_tokens
    assert "cost_usd" not in (chunks[-1].usage.model_extra or {})
    journaled = running.state.journal
    assert journaled is not None and len(journaled) == 1
    await own_redis.start()  # back from its AOF
    await wait_for(lambda: len(journaled) == 0, timeout_s=20, what="the journal replayed")
    upstream.fault.hold_after_chunks, upstream.fault.delay_before_headers_s = None, 3  # time to kill Redis
    answer = asyncio.ensure_future(client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES))
    await wait_for(lambda: len(upstream.requests) == 2, what="the request admitted and forwarded")
    own_redis.process.kill()
    own_redis.process.wait()
    plain = await answer
    usage = plain.parse().usage
    assert "x-metering-cost-usd" not in plain.headers
    assert usage is not None and "cost_usd" not in (usage.model_extra or {})
    await own_redis.start()
    await wait_for(lambda: len(journaled) == 0, timeout_s=20, what="the journal replayed")
    for request_id, cost in zip((streamed, plain.headers["x-request-id"]), await charged(running), strict=True):
        found = await client.get("/generation", cast_to=object, options={"params": {"id": request_id}})
        assert (found["status"], found["cost_usd"]) == ("settled", cost)


def test_a_usage_chunk_that_is_not_the_end_goes_out_as_it_came() -> None:
    """Only the stream's end is held: a usage-only chunk followed by more than [DONE]
    (an upstream unlike OpenAI) is released with what follows, never held to the end."""
    tap, held, none = StreamTap("chat", client_wants_usage=True), [], Scrubber()
    usage_chunk = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    content = b'data: {"choices":[{"delta":{"content":"more"}}]}\n\n'
    parser = SSEParser()
    assert forwardable(parser.feed(usage_chunk + b": keep-alive\n\n"), tap, none, held) == b""
    assert len(held) == 2  # held: it may be the end
    assert forwardable(parser.feed(content), tap, none, held) == usage_chunk + b": keep-alive\n\n" + content
    assert held == []
    assert forwardable(parser.feed(b"data: [DONE]\n\n"), tap, none, held) == b"" and len(held) == 1


def test_the_end_is_where_openai_python_sees_it() -> None:
    """openai-python stops at data that starts with [DONE] (`[DONE] `, `[DONE]x`): so does
    the tap, and the usage chunk before it goes out with the cost, not as it came."""
    tap, held = StreamTap("chat", client_wants_usage=True), []
    usage_chunk = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    assert forwardable(SSEParser().feed(usage_chunk + b"data: [DONE] \n\n"), tap, Scrubber(), held) == b""
    assert tap.finished and len(held) == 2
    assert b'"cost_usd":"0.000001"' in receipt.stream_tail(held, tap, "0.000001", None)


def test_a_secret_in_the_held_usage_event_is_scrubbed() -> None:
    """The rewritten usage event goes through the same redaction as every event."""
    scrub = Scrubber([UPSTREAM_KEY])
    tap, held = StreamTap("chat", client_wants_usage=True), []
    chunk = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1}, "note": UPSTREAM_KEY})
    forwardable(SSEParser().feed(b"data: " + chunk + b"\n\ndata: [DONE]\n\n"), tap, scrub, held)
    tail = scrub(receipt.stream_tail(held, tap, "0.000001", None))
    assert UPSTREAM_KEY.encode() not in tail and b'"cost_usd":"0.000001"' in tail


def test_a_final_responses_event_only_pythons_json_reads_ends_the_stream_with_its_cost() -> None:
    """Half an emoji (a lone surrogate escape) in the output text of `response.completed`:
    openai-python reads the event, so the tap does too: the stream ended, its usage is
    charged and the event goes out with the cost, still readable by Python's json."""
    tap, held = StreamTap("responses", client_wants_usage=True), []
    final = (b'{"type":"response.completed","response":{"output":[{"content":[{"text":"\\ud83d"}]}],'
             b'"usage":{"input_tokens":3,"output_tokens":2}}}')  # fmt: skip
    forwardable(SSEParser().feed(b"event: response.completed\ndata: " + final + b"\n\n"), tap, Scrubber(), held)
    assert tap.finished and tap.usage is not None and tap.usage.output_tokens == 2
    tail = receipt.stream_tail(held, tap, "0.000001", None)
    event = json.loads(tail.split(b"data: ", 1)[1])
    assert event["response"]["usage"]["cost_usd"] == "0.000001"
    assert event["response"]["output"][0]["content"][0]["text"] == "\ud83d"


# -- splicing bodies -------------------------------------------------------------------

COST = "0.001234"
USAGE = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
         "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {}}  # fmt: skip
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "hi {"}}],
        "usage": USAGE, "service_tier": "default", "system_fingerprint": "fp_1"}  # fmt: skip


def spliced(raw: bytes, estimate: Usage | None = None, endpoint: str = "chat") -> Any:
    return orjson.loads(receipt.body(raw, orjson.loads(raw), COST, endpoint, estimate))


def test_the_cost_is_spliced_into_compact_and_pretty_bodies_byte_for_byte() -> None:
    for raw in (orjson.dumps(CHAT), json.dumps(CHAT, indent=2).encode(), json.dumps(CHAT).encode()):
        out = receipt.body(raw, orjson.loads(raw), COST, "chat", None)
        assert orjson.loads(out) == {**CHAT, "usage": {**USAGE, "cost_usd": COST}}
        assert out.replace(b',"cost_usd":"0.001234"', b"") == raw  # nothing else changed


def test_bodies_that_cannot_be_spliced_are_reencoded_correctly() -> None:
    # the word as a value: two `"usage"` in the bytes
    tricky = {**CHAT, "choices": [{"message": {"content": "usage"}}]}
    assert spliced(orjson.dumps(tricky)) == {**tricky, "usage": {**USAGE, "cost_usd": COST}}
    # a cost the upstream itself reported (a chained proxy): ours, once
    chained = {**CHAT, "usage": {**USAGE, "cost_usd": "9.000000"}}
    assert spliced(orjson.dumps(chained))["usage"]["cost_usd"] == COST
    assert orjson.dumps(chained).count(b"cost_usd") == 1
    assert spliced(orjson.dumps({**CHAT, "usage": {}}))["usage"] == {"cost_usd": COST}
    # a second `usage` member after it, its name spelled with an escape: the last one
    # counts (for every JSON parser the SDK may use), and the cost goes there
    shadowed = orjson.dumps(CHAT)[:-1] + b',"\\u0075sage":{"prompt_tokens":3}}'
    assert spliced(shadowed)["usage"] == {"prompt_tokens": 3, "cost_usd": COST}
    assert receipt.body(b"[1, 2]", [1, 2], COST, "chat", None) == b"[1, 2]"  # not an object: untouched
    assert receipt.body(b"not json", None, COST, "chat", None) == b"not json"


def test_a_body_without_usage_gets_ours() -> None:
    estimate = Usage(input_tokens=12, output_tokens=5)
    no_usage = {k: v for k, v in CHAT.items() if k != "usage"}
    for raw in (orjson.dumps(no_usage), json.dumps(no_usage, indent=2).encode() + b"\n"):
        assert spliced(raw, estimate)["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                                                   "estimated": True, "cost_usd": COST}  # fmt: skip
    assert spliced(orjson.dumps({**CHAT, "usage": None}), estimate)["usage"]["cost_usd"] == COST
    responses = spliced(b"{}", estimate, "responses")["usage"]
    assert (responses["input_tokens"], responses["output_tokens"], responses["cost_usd"]) == (12, 5, COST)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(alphabet=st.sampled_from('ab{}[]":\\,usage é')),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["usage", "a", "b{"]), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.dictionaries(st.sampled_from(["id", "choices", "x"]), json_values, max_size=3),
    usage=st.dictionaries(st.sampled_from(["prompt_tokens", "details", "usage"]), json_values, max_size=3),
    after=st.dictionaries(st.sampled_from(["service_tier", "y"]), json_values, max_size=2),
    indent=st.sampled_from([None, 2]),
)
@example(before={"x": {"usage": {}}}, usage={}, after={}, indent=None)  # a nested usage object too
@example(before={"x": '"usage":{'}, usage={"details": {"a": "}"}}, after={}, indent=2)
@example(before={}, usage={}, after={"y": {"usage": {"a": [1]}}}, indent=None)  # the last `"usage"` is nested
@example(before={}, usage={"a": 1}, after={'say "usage': {}}, indent=None)  # and a key ending in it, escaped
@example(before={}, usage={}, after={"service_tier": "usage"}, indent=2)  # and the word as a value
def test_any_body_gets_exactly_its_usage_cost(
    before: dict[str, Any], usage: dict[str, Any], after: dict[str, Any], indent: int | None
) -> None:
    body = {**before, "usage": usage, **after}
    raw = json.dumps(body, indent=indent, ensure_ascii=False).encode()
    out = receipt.body(raw, orjson.loads(raw), COST, "chat", None)
    assert orjson.loads(out) == {**body, "usage": {**usage, "cost_usd": COST}}
    if raw.count(b'"usage"') == 1:  # the common case: spliced, every other byte as it came
        member = b'"cost_usd":"0.001234"'
        assert out.replace(b"," + member if b"," + member in out else member, b"", 1) == raw


async def test_a_body_only_pythons_json_reads_is_charged_its_own_usage(proxy: Running, upstream: DemoUpstream) -> None:
    """A lone surrogate escape in the reply text (half an emoji): openai-python's json
    reads the body, so the proxy reads its usage too, instead of charging an estimate
    with no output."""
    key = await proxy.account("acme", "10")
    upstream.fault.lone_surrogate, upstream.fault.output_tokens = True, 50
    raw = await proxy.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )
    reply = raw.parse()
    assert reply.choices[0].message.content.startswith("\ud83d")  # type: ignore[union-attr]
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    assert not entry["estimated"] and entry["usage"]["output_tokens"] == 50
    assert reply.usage.cost_usd == raw.headers["x-metering-cost-usd"] == usd(-int(entry["amount"]))  # type: ignore[union-attr]
