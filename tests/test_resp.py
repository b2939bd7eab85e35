"""The hot path's lean Redis client, against a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import exceptions as redis_errors

from proxy.embedded import EmbeddedRedis
from proxy.resp import RespClient


async def test_concurrent_calls_get_their_own_replies(redis: Any, redis_server: EmbeddedRedis) -> None:
    client = RespClient(redis_server.url)
    try:
        await asyncio.gather(*(client.call("INCRBY", f"k{i % 7}", i) for i in range(500)))
        totals = await asyncio.gather(*(client.call("GET", f"k{k}") for k in range(7)))
        assert [int(t) for t in totals] == [sum(range(k, 500, 7)) for k in range(7)]
        echoes = await asyncio.gather(*(client.call("ECHO", f"v{i}") for i in range(500)))
        assert echoes == [f"v{i}" for i in range(500)]
    finally:
        await client.aclose()


async def test_errors_map_to_redis_py_types(redis: Any, redis_server: EmbeddedRedis) -> None:
    client = RespClient(redis_server.url)
    try:
        with pytest.raises(redis_errors.NoScriptError):
            await client.call("EVALSHA", "0" * 40, 0)
        await client.call("SET", "s", "x")
        with pytest.raises(redis_errors.ResponseError):
            await client.call("INCR", "s")
        zadd, echo = await client.pipeline(("ZADD", "z", "LT", 5, "a"), ("ECHO", "after"))
        assert zadd == 1 and echo == "after"
    finally:
        await client.aclose()


async def test_reconnects_after_a_redis_restart(redis: Any, redis_server: EmbeddedRedis) -> None:
    client = RespClient(redis_server.url)
    try:
        assert await client.call("PING") == "PONG"
        redis_server.stop()
        with pytest.raises(redis_errors.ConnectionError):
            await client.call("PING")
        await redis_server.start()
        assert await client.call("PING") == "PONG"
    finally:
        await client.aclose()


async def test_silent_server_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        with pytest.raises(redis_errors.TimeoutError):
            await client.call("PING")
    finally:
        await client.aclose()
        server.close()


async def test_a_reply_that_stops_coming_times_out_and_the_next_call_reconnects() -> None:
    # each connection answers its first command only: the connection's one timer must let
    # the answered call through, fail the unanswered one, and leave the client usable
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"PING\r\n")
        writer.write(b"+PONG\r\n")
        await writer.drain()
        await reader.read(1 << 20)

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        assert await client.call("PING") == "PONG"
        with pytest.raises(redis_errors.TimeoutError):
            await asyncio.gather(client.call("PING"), client.call("PING"))
        assert await client.call("PING") == "PONG"  # a fresh connection
    finally:
        await client.aclose()
        server.close()


async def test_packed_arguments_are_spliced_in(redis: Any, redis_server: EmbeddedRedis) -> None:
    from proxy.resp import Packed

    client = RespClient(redis_server.url)
    try:
        keys = Packed("k1", "k2")
        assert await client.call("MSET", Packed("k1", "v1"), "k2", "v2") == "OK"
        assert await client.call("MGET", keys, "k3") == ["v1", "v2", None]
    finally:
        await client.aclose()


def test_every_kind_of_argument_packs_as_one_bulk_string() -> None:
    from proxy.resp import Packed, pack

    packed = pack(("SET", "é", 2**60, -1, True, 1.5, b"a\r\nb", Packed("k", 7)))
    bulks = [b"SET", "é".encode(), b"1152921504606846976", b"-1", b"True", b"1.5", b"a\r\nb", b"k", b"7"]
    assert packed == b"*9\r\n" + b"".join(b"$%d\r\n%b\r\n" % (len(b), b) for b in bulks)
