"""A hostile or broken upstream against the upstream hop's HTTP/1.1 client (proxy/http1.py),
through the real proxy where money is at stake: each request is charged exactly what
its own answer says, or nothing, and the client gets an OpenAI-shaped error, never a
hang, a 500 or a traceback in the logs."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy import errors, http1
from proxy.upstream import Upstream

from .conftest import Running
from .helpers import entries, last_entry_id, next_entry, wait_for
from .helpers import post as raw_post
from .test_http1 import RawServer, Script, post, read_request, seam, target  # noqa: F401 (the seam fixture)

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def completion(prompt: int, output: int) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output},
    }
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever the upstream does, nothing is logged as an error (asyncio's "Fatal error"
    tracebacks from a protocol callback included)."""
    with caplog.at_level(logging.ERROR):
        yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    await server.start()
    yield server
    assert server.server is not None
    server.server.close()


@pytest.fixture
async def hostile(raw: RawServer, start_proxy: Callable[..., Any]) -> Running:
    """The proxy, its one upstream the raw server."""
    url = await raw.start()
    running: Running = await start_proxy({"upstreams": {"openai": {"base_url": url, "timeout_s": 5}}})
    return running


def queue(server: RawServer, *replies: bytes) -> None:
    """Each request, on whichever connection it comes, gets the next reply."""
    pending = list(replies)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while pending:
            await read_request(reader, server.requests)
            writer.write(pending.pop(0))
            await writer.drain()
        await reader.read()

    server.script = script


async def charges(running: Running) -> list[str]:
    return [e["amount"] for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]


async def test_a_second_answer_behind_the_first_is_charged_to_nobody(hostile: Running, raw: RawServer) -> None:
    # gpt-4o: 2.50 and 10.00 USD per million: 100 + 6 tokens cost 310 micro-USD, 10 + 1 cost 35
    queue(raw, completion(100, 6) + completion(1_000_000, 1_000_000), completion(10, 1))
    key = await hostile.account("acme", "10")
    client = hostile.client(key)
    first = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert first.usage is not None and first.usage.prompt_tokens == 100
    assert second.usage is not None and second.usage.prompt_tokens == 10
    assert await charges(hostile) == ["-310", "-35"]
    assert raw.connections == 2  # the connection with bytes nobody asked for was dropped


async def test_bytes_on_an_idle_connection_close_it(raw: RawServer, seam: Upstream) -> None:  # noqa: F811
    url = await raw.start()
    idle = asyncio.Event()
    smuggled = b"HTTP/1.1 200 OK\r\nx-smuggled: 1\r\ncontent-length: 1000\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(completion(100, 6))
        await idle.wait()
        writer.write(smuggled)  # the head of an answer to no request, its body to come
        await read_request(reader)
        writer.write(completion(10, 1))
        await reader.read()

    raw.script = script
    assert (await post(seam, url))[0] == 200
    assert seam.client is not None
    (connection,) = seam.client.idle[http1.Origin.of(url)]
    idle.set()
    await wait_for(
        lambda: connection.transport is None or any(n == "x-smuggled" for n, _ in connection.raw_headers),
        what="the smuggled head",
    )
    raw.script = lambda reader, writer: queue_one(reader, writer, completion(10, 1))
    status, body = await post(seam, url, timeout_s=2)
    assert status == 200 and b'"prompt_tokens": 10' in body
    assert raw.connections == 2


async def queue_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes) -> None:
    await read_request(reader)
    writer.write(reply)
    await writer.drain()
    await reader.read()


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_a_status_outside_100_to_599_is_unavailable_and_free(
    hostile: Running, raw: RawServer, status: bytes
) -> None:
    body = json.loads(completion(100, 6).partition(b"\r\n\r\n")[2])
    data = json.dumps(body).encode()
    queue(raw, b"HTTP/1.1 %s Odd\r\ncontent-length: %d\r\n\r\n%s" % (status, len(data), data))
    key = await hostile.account("acme", "10")
    with pytest.raises(openai.APIStatusError) as caught:
        await hostile.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"
    assert "could not be reached" in caught.value.message  # refused with the head, not a read timeout
    assert await charges(hostile) == []
    assert (await hostile.balance("acme")).balance == 10_000_000


async def test_a_switch_of_protocols_is_unavailable_without_a_traceback(
    hostile: Running, raw: RawServer, caplog: pytest.LogCaptureFixture
) -> None:
    queue(raw, b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxyz")
    key = await hostile.account("acme", "10")
    with caplog.at_level(logging.ERROR), pytest.raises(openai.APIStatusError) as caught:
        await hostile.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await charges(hostile) == []


@pytest.mark.parametrize(
    ("head", "refusal"),
    [
        (b"HTTP/1.1 200 OK\r\nx-endless: ", errors.UpstreamUnavailable),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-endless: ", errors.UpstreamBroken),
    ],
    ids=["header", "trailer"],
)
async def test_a_header_or_trailer_without_end_is_refused_before_it_fills_memory(
    raw: RawServer,
    seam: Upstream,  # noqa: F811
    head: bytes,
    refusal: type[errors.ProxyError],
) -> None:
    """httptools holds a line until it ends: one that never does is cut off, not held."""
    url = await raw.start()
    total = 16 << 20
    sent: list[int] = [0]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head)
        while sent[0] < total:
            writer.write(b"y" * 65536)
            sent[0] += 65536
            await writer.drain()
        await reader.read()

    raw.script = script
    with pytest.raises(refusal):
        await post(seam, url, timeout_s=2)
    assert sent[0] < total  # cut off: what it sent is not all held


async def test_a_gzip_bomb_is_refused_not_inflated(raw: RawServer, seam: Upstream) -> None:  # noqa: F811
    url = await raw.start()
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    block = bytes(1 << 20)
    bomb = b"".join(packer.compress(block) for _ in range(2 * http1.MAX_INFLATED >> 20)) + packer.flush()
    assert len(bomb) < 2 * http1.MAX_INFLATED // 500
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(bomb)
    raw.script = lambda reader, writer: queue_one(reader, writer, head + bomb)
    with pytest.raises(errors.UpstreamBroken, match="inflates past"):
        await post(seam, url)


def sse_stream(prompt: int, output: int) -> list[bytes]:
    events = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": f"tok{i}"}, "finish_reason": None}]}
        for i in range(output)
    ]  # fmt: skip
    events.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                             "total_tokens": prompt + output}})  # fmt: skip
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nx-trailer: t\r\n\r\n"


def byte_by_byte(reply: bytes, requests: int = 1) -> Script:
    """Answer each of `requests` requests on a connection with `reply`, a byte per write."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(requests):
            await read_request(reader)
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
        await reader.read()

    return script


async def test_a_stream_split_at_every_byte_is_relayed_and_charged_exactly(hostile: Running, raw: RawServer) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    raw.script = byte_by_byte(head + chunked(sse_stream(100, 6)), requests=2)
    key = await hostile.account("acme", "10")
    client = hostile.client(key)
    for _ in range(2):
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "tok0tok1tok2tok3tok4tok5"
    assert await charges(hostile) == ["-310", "-310"]
    assert raw.connections == 1


async def test_upstream_headers_that_quote_the_key_do_not_reach_the_client(hostile: Running, raw: RawServer) -> None:
    from .conftest import UPSTREAM_KEY

    reply = completion(100, 6).replace(b"\r\n\r\n", b"\r\nx-echo: Bearer %s\r\n\r\n" % UPSTREAM_KEY.encode(), 1)
    queue(raw, reply, reply.replace(b"200 OK", b"401 Unauthorized", 1))
    key = await hostile.account("acme", "10")
    client = hostile.client(key)
    raw_answer = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert UPSTREAM_KEY not in str(dict(raw_answer.headers))
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert UPSTREAM_KEY not in str(dict(caught.value.response.headers))


async def test_odd_header_values_pass_without_a_500(hostile: Running, raw: RawServer) -> None:
    reply = completion(100, 6).replace(b"\r\n\r\n", b"\r\nx-utf8: \xc3\xa9\r\nx-latin: \xe9\xff\r\n\r\n", 1)
    queue(raw, reply)
    key = await hostile.account("acme", "10")
    answer = await hostile.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert answer.status_code == 200
    assert await charges(hostile) == ["-310"]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nda",
    ],
    ids=["cut body", "cut chunk"],
)
async def test_a_body_cut_off_is_a_clear_502_and_free(
    hostile: Running, raw: RawServer, reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    raw.script = script
    key = await hostile.account("acme", "10")
    with caplog.at_level(logging.ERROR):
        status, body = await raw_post(hostile, key, "chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 502 and body["error"]["code"] == "upstream_unavailable"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await charges(hostile) == []


async def test_an_endless_run_of_informational_answers_is_refused(raw: RawServer, seam: Upstream) -> None:  # noqa: F811
    url = await raw.start()
    total = 8 << 20
    sent: list[int] = [0]
    hint = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        while sent[0] < total:
            writer.write(hint * 100)
            sent[0] += 100 * len(hint)
            await writer.drain()
        await reader.read()

    raw.script = script
    with pytest.raises(errors.UpstreamUnavailable):
        await post(seam, url, timeout_s=2)
    assert sent[0] < total


def endless_stream(events: int, then_stall: bool) -> Script:
    """A stream of `events` token events; then it stalls, or goes on until the proxy hangs up."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        token = sse_stream(0, 1)[0]
        for _ in range(events):
            writer.write(chunked([token])[: -len(b"0\r\nx-trailer: t\r\n\r\n")])
            await writer.drain()
        while not then_stall:
            writer.write(chunked([token])[: -len(b"0\r\nx-trailer: t\r\n\r\n")])
            await writer.drain()  # raises once the proxy drops the connection
        await reader.read()

    return script


async def test_a_client_gone_mid_stream_is_charged_and_its_connection_never_reused(
    hostile: Running, raw: RawServer
) -> None:
    first = endless_stream(3, then_stall=False)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if raw.connections == 1:
            await first(reader, writer)
        else:
            await queue_one(reader, writer, completion(10, 1))

    raw.script = script
    key = await hostile.account("acme", "10")
    after = await last_entry_id(hostile.state.redis, "acme")
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
        async with session.post(f"{hostile.url}/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # one event, then the client hangs up
    assert (await next_entry(hostile.state.redis, "acme", after))["type"] == "usage"
    second = await hostile.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert second.usage is not None and second.usage.prompt_tokens == 10
    first_charge, second_charge = await charges(hostile)
    assert int(first_charge) < 0 and second_charge == "-35"
    assert raw.connections == 2
    assert (await hostile.balance("acme")).reserved == 0


async def test_a_stream_that_stalls_ends_with_an_error_event_and_is_charged_what_was_relayed(
    raw: RawServer, start_proxy: Callable[..., Any]
) -> None:
    url = await raw.start()
    running: Running = await start_proxy({"upstreams": {"openai": {"base_url": url, "timeout_s": 0.5}}})
    raw.script = endless_stream(3, then_stall=True)
    key = await running.account("acme", "10")
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
        async with session.post(f"{running.url}/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            text = await resp.read()
    assert text.count(b"tok0") == 3 and b"stream_interrupted" in text
    (entry,) = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert entry["estimated"] is True and entry["usage"]["output_tokens"] >= 3
    assert (await running.balance("acme")).reserved == 0


async def test_many_requests_sharing_a_pool_of_failing_connections_are_each_settled_once(
    hostile: Running, raw: RawServer
) -> None:
    count = [0]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            count[0] += 1
            kind = count[0] % 4
            if kind == 0:
                return  # hangs up unanswered
            if kind == 1:
                writer.write(completion(10, 1) + completion(1_000_000, 1_000_000))  # and a smuggled second
            elif kind == 2:
                writer.write(completion(10, 1)[:-5])  # cut short
                return
            else:
                writer.write(completion(10, 1))
            await writer.drain()

    raw.script = script
    key = await hostile.account("acme", "10")
    client = hostile.client(key)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        except openai.APIStatusError as exc:
            assert exc.status_code == 502, exc
            return 502
        return 200

    statuses = await asyncio.gather(*(one() for _ in range(60)))
    served = statuses.count(200)
    assert 0 < served < 60
    assert await charges(hostile) == ["-35"] * served
    view = await hostile.balance("acme")
    assert view.reserved == 0 and view.balance == 10_000_000 - 35 * served


async def test_an_ipv6_base_url_with_a_prefix_and_a_trailing_slash(
    raw: RawServer, start_proxy: Callable[..., Any]
) -> None:
    server = await asyncio.start_server(raw._serve, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    queue(raw, completion(100, 6))
    running: Running = await start_proxy({"upstreams": {"openai": {"base_url": f"http://[::1]:{port}/gw/v1/"}}})
    key = await running.account("acme", "10")
    await running.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    server.close()
    (request,) = raw.requests
    assert request.startswith(b"POST /gw/v1/chat/completions HTTP/1.1\r\n")
    assert f"\r\nhost: [::1]:{port}\r\n".encode() in request
    assert await charges(running) == ["-310"]


async def test_a_host_that_does_not_resolve_is_unavailable_and_free(start_proxy: Callable[..., Any]) -> None:
    running: Running = await start_proxy(
        {"upstreams": {"openai": {"base_url": "http://no-such-host.invalid/v1", "connect_timeout_s": 2}}}
    )
    key = await running.account("acme", "10")
    with pytest.raises(openai.APIStatusError) as caught:
        await running.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code in (502, 504)
    assert await charges(running) == [] and (await running.balance("acme")).reserved == 0


async def test_upstream_headers_cannot_pose_as_the_proxys_receipt(hostile: Running, raw: RawServer) -> None:
    spoof = b"x-metering-cost-usd: 0.000000\r\nx-metering-balance-usd: 999999.00\r\nx-metering-downgraded-from: x\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n" + spoof + b"\r\n"
    error = b"HTTP/1.1 429 Too Many\r\ncontent-type: application/json\r\ncontent-length: 2\r\n" + spoof + b"\r\n{}"
    queue(raw, head + chunked(sse_stream(100, 6)), error)
    key = await hostile.account("acme", "10")
    client = hostile.client(key)
    answer = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert [chunk async for chunk in answer.parse()]
    assert not [name for name in answer.headers if name.lower().startswith("x-metering-")]
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert not [name for name in caught.value.response.headers if name.lower().startswith("x-metering-")]


async def test_a_gzipped_stream_split_at_every_byte_is_charged_exactly(hostile: Running, raw: RawServer) -> None:
    packed = gzip.compress(b"".join(sse_stream(100, 6)))
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
    reply += b"content-length: %d\r\n\r\n%s" % (len(packed), packed)
    raw.script = byte_by_byte(reply)
    key = await hostile.account("acme", "10")
    stream = await hostile.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]).endswith("tok5")
    assert await charges(hostile) == ["-310"]


async def test_a_gzipped_stream_that_turns_corrupt_is_charged_what_was_relayed(
    hostile: Running, raw: RawServer
) -> None:
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    good = packer.compress(b"".join(sse_stream(100, 6)[:3])) + packer.flush(zlib.Z_SYNC_FLUSH)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
    head += b"transfer-encoding: chunked\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + b"%x\r\n%s\r\n" % (len(good), good))
        await writer.drain()
        writer.write(b"10\r\n" + b"\xff" * 16 + b"\r\n")
        await reader.read()

    raw.script = script
    key = await hostile.account("acme", "10")
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
        async with session.post(f"{hostile.url}/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            text = await resp.read()
    assert b"tok2" in text and b"stream_interrupted" in text
    (entry,) = [e for e in await entries(hostile.state.redis, "acme") if e["type"] == "usage"]
    assert entry["estimated"] is True and entry["usage"]["output_tokens"] >= 3
    assert (await hostile.balance("acme")).reserved == 0


async def test_an_answer_smuggled_behind_a_finished_stream_reaches_no_one(hostile: Running, raw: RawServer) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    queue(raw, head + chunked(sse_stream(100, 6)) + completion(1_000_000, 1_000_000), completion(10, 1))
    key = await hostile.account("acme", "10")
    client = hostile.client(key)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert [c async for c in stream]
    second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert second.usage is not None and second.usage.prompt_tokens == 10
    assert await charges(hostile) == ["-310", "-35"]
    assert raw.connections == 2


async def test_a_gzipped_body_that_ends_mid_stream_is_a_502_and_free(hostile: Running, raw: RawServer) -> None:
    whole = completion(100, 6).partition(b"\r\n\r\n")[2]
    packed = gzip.compress(whole)[:-12]  # the compressed stream stops before its end
    queue(raw, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(packed), packed))  # fmt: skip
    key = await hostile.account("acme", "10")
    status, body = await raw_post(hostile, key, "chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 502 and body["error"]["code"] == "upstream_unavailable"
    assert await charges(hostile) == []


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"compress", b"gzip, br"])
async def test_an_answer_in_an_encoding_it_cannot_read_is_a_502_and_free(
    hostile: Running, raw: RawServer, encoding: bytes
) -> None:
    packed = b"\x1b\x00\xf8\xa5\x00\x00\x00\x00"  # bytes that are no JSON: as good as any encoding's
    queue(raw, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: %s\r\n"
               b"content-length: %d\r\n\r\n%s" % (encoding, len(packed), packed))  # fmt: skip
    key = await hostile.account("acme", "10")
    status, body = await raw_post(hostile, key, "chat/completions", {"model": "gpt-4o", "messages": MESSAGES})
    assert status == 502 and "could not be reached" in body["error"]["message"]  # refused with the head
    assert await charges(hostile) == []


async def test_an_upstream_that_never_reads_times_each_request_out_for_free(
    raw: RawServer, start_proxy: Callable[..., Any]
) -> None:
    held: list[asyncio.StreamWriter] = []  # a paused transport only a task waits on is garbage: kept

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await asyncio.Event().wait()  # accepts, never reads, never answers

    raw.script = script
    url = await raw.start()
    running: Running = await start_proxy({"upstreams": {"openai": {"base_url": url, "timeout_s": 0.5}}})
    key = await running.account("acme", "10")
    client = running.client(key)
    big = [{"role": "user", "content": "x" * 900_000}]

    async def one(messages: list[Any]) -> int:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        return caught.value.status_code

    statuses = await asyncio.gather(*(one(big if i % 2 else MESSAGES) for i in range(20)))
    assert set(statuses) == {504}
    assert await charges(running) == []
    view = await running.balance("acme")
    assert view.reserved == 0 and view.balance == 10_000_000


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [
        (b"gzip", lambda body: gzip.compress(body[:50]) + gzip.compress(body[50:])),  # two members
        (b"deflate", raw_deflate),  # no zlib header, as some servers send it
        (b"deflate", zlib.compress),
    ],
    ids=["gzip members", "raw deflate", "zlib deflate"],
)
async def test_compressed_answers_read_as_aiohttp_read_them(
    hostile: Running, raw: RawServer, encoding: bytes, pack: Callable[[bytes], bytes]
) -> None:
    packed = pack(completion(100, 6).partition(b"\r\n\r\n")[2])
    queue(raw, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: %s\r\n"
               b"content-length: %d\r\n\r\n%s" % (encoding, len(packed), packed))  # fmt: skip
    key = await hostile.account("acme", "10")
    answer = await hostile.client(key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    assert await charges(hostile) == ["-310"]


async def test_an_empty_body_labelled_gzip_is_empty(raw: RawServer, seam: Upstream) -> None:  # noqa: F811
    url = await raw.start()
    raw.script = lambda reader, writer: queue_one(
        reader, writer, b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 0\r\n\r\n"
    )
    assert await post(seam, url) == (200, b"")


async def test_a_connection_answered_before_its_request_was_sent_whole_is_not_reused(
    raw: RawServer,
    seam: Upstream,  # noqa: F811
) -> None:
    url = await raw.start()
    held: list[asyncio.StreamWriter] = []  # a paused transport only a task waits on is garbage: kept

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if raw.connections == 1:
            held.append(writer)
            await reader.readuntil(b"\r\n\r\n")  # the head only: the 32 MB body stays unread
            writer.write(completion(100, 6))  # answered early, keep-alive
            await asyncio.Event().wait()
        await queue_one(reader, writer, completion(10, 1))

    raw.script = script
    config = target(url, timeout_s=2)
    async with await seam.post(config, "/chat/completions", b"x" * (32 << 20), "req_big") as response:
        assert b'"prompt_tokens": 100' in await response.read()
    # what follows on that connection would reach the upstream behind the unread rest
    async with await seam.post(config, "/chat/completions", b"{}", "req_next") as response:
        assert b'"prompt_tokens": 10' in await response.read()
    assert raw.connections == 2
