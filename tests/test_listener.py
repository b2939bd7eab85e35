"""Both listeners close connections that do nothing: a request head that never completes
(408, then closed) and a keep-alive connection left idle. Raw sockets, timed by blocking
on the socket's read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from .conftest import Running

HEADER_TIMEOUT_S = 0.5
KEEPALIVE_TIMEOUT_S = 1.0
SLACK_S = 1.5  # the loop may be busy with other tests' work on a 2-core machine
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nAuthorization: Bearer "


@pytest.fixture
async def timed(start_proxy: Callable[..., Any]) -> Running:
    server = {"header_timeout_s": HEADER_TIMEOUT_S, "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S}
    return await start_proxy({"server": server})  # type: ignore[no-any-return]


def ports(running: Running) -> list[int]:
    return [running.proxy.ports["client"], running.proxy.ports["admin"]]


async def until_eof(reader: asyncio.StreamReader, bound_s: float) -> bytes:
    """Everything the server sends until it closes; fails if it stays open past `bound_s`."""
    return await asyncio.wait_for(reader.read(), bound_s)


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"x-request-id: req_" in head
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout"


@pytest.mark.parametrize("listener", [0, 1], ids=["client", "admin"])
async def test_a_head_that_stops_halfway_is_408_and_closed(timed: Running, listener: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ports(timed)[listener])
    started = time.monotonic()
    writer.write(HEAD)
    answer = await until_eof(reader, HEADER_TIMEOUT_S + SLACK_S)
    elapsed = time.monotonic() - started
    writer.close()
    assert_408(answer)
    assert HEADER_TIMEOUT_S - 0.05 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S


async def test_a_trickled_head_is_cut_at_the_deadline(timed: Running) -> None:
    """Slowloris: one byte whenever the server has stayed silent for 50 ms."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ports(timed)[0])
    started = time.monotonic()
    sent, answer = 0, b""
    while sent < len(HEAD):
        writer.write(HEAD[sent : sent + 1])
        sent += 1
        try:  # pacing: block on the server's answer (one read: a timeout loses no bytes)
            first = await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            assert time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S, "the trickle was never cut"
            continue
        answer = first + await until_eof(reader, SLACK_S)
        break
    elapsed = time.monotonic() - started
    writer.close()
    assert sent < len(HEAD)  # cut before the head was done
    assert_408(answer)
    assert HEADER_TIMEOUT_S - 0.05 <= elapsed <= HEADER_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize("listener", [0, 1], ids=["client", "admin"])
async def test_an_idle_keep_alive_connection_is_closed(timed: Running, listener: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ports(timed)[listener])
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    started = time.monotonic()
    rest = await until_eof(reader, KEEPALIVE_TIMEOUT_S + SLACK_S)
    elapsed = time.monotonic() - started
    writer.close()
    assert rest == b""  # closed quietly: no request was in progress
    assert KEEPALIVE_TIMEOUT_S - 0.1 <= elapsed <= KEEPALIVE_TIMEOUT_S + SLACK_S


async def test_a_connection_that_never_speaks_is_closed(timed: Running) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", ports(timed)[0])
    assert await until_eof(reader, KEEPALIVE_TIMEOUT_S + SLACK_S) == b""
    writer.close()
    assert time.monotonic() - started >= KEEPALIVE_TIMEOUT_S - 0.1


async def test_a_slow_body_is_not_cut_by_the_header_deadline(timed: Running) -> None:
    key = await timed.account("acme", "10")
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    reader, writer = await asyncio.open_connection("127.0.0.1", ports(timed)[0])
    writer.write(HEAD + key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    with pytest.raises(TimeoutError):  # the head is whole: past its deadline, the server keeps waiting
        await asyncio.wait_for(reader.read(1), HEADER_TIMEOUT_S * 2)
    writer.write(body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
