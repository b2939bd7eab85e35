"""The upstream hop's HTTP/1.1 client (proxy/http1.py) against a raw TCP server that
answers byte for byte what each test scripts: what the fake upstream (a well-behaved
aiohttp server) never sends."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from proxy import errors, http1
from proxy.config import UpstreamConfig
from proxy.upstream import Upstream

from .helpers import wait_for

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'


class RawServer:
    """Each connection runs `script`; `connections` counts them."""

    def __init__(self) -> None:
        self.script: Script = answer(OK)
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://{host}:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader, into: list[bytes] | None = None) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    body = await reader.readexactly(length)
    if into is not None:
        into.append(head + body)
    return head


def answer(*replies: bytes, keep_open: bool = True) -> Script:
    """Answer each request on a connection with the next reply; then wait for more."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
        if keep_open:
            await reader.read()  # until the client closes

    return script


@pytest.fixture
async def raw() -> AsyncIterator[tuple[RawServer, str]]:
    server = RawServer()
    url = await server.start()
    yield server, url
    assert server.server is not None
    server.server.close()


@pytest.fixture
async def seam() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    await upstream.start()
    yield upstream
    await upstream.close()


def target(url: str, timeout_s: float = 30.0) -> UpstreamConfig:
    return UpstreamConfig(base_url=url, timeout_s=timeout_s, connect_timeout_s=5.0)


async def post(seam: Upstream, url: str, timeout_s: float = 30.0) -> tuple[int, bytes]:
    async with await seam.post(target(url, timeout_s), "/chat/completions", b'{"a": 1}', "req_t") as response:
        return response.status, await response.read()


async def test_sequential_requests_share_one_keep_alive_connection(raw: tuple[RawServer, str], seam: Upstream) -> None:
    server, url = raw
    server.script = answer(OK, OK, OK)
    for _ in range(3):
        assert await post(seam, url) == (200, b'{"ok": true}')
    assert server.connections == 1


async def test_the_request_line_and_headers_are_what_the_upstream_expects(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, server.requests)
        writer.write(OK)
        await reader.read()

    server.script = script
    config = UpstreamConfig(base_url=url, api_key="sk-upstream-secret-1")
    async with await seam.post(config, "/chat/completions", b'{"a": 1}', "req_abc") as response:
        await response.read()
    head, body = server.requests[0].split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1" and body == b'{"a": 1}'
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    port = url.split(":")[2].split("/")[0]
    assert fields == {
        "host": f"127.0.0.1:{port}",
        "content-length": "8",
        "content-type": "application/json",
        "accept-encoding": "identity",
        "x-request-id": "req_abc",
        "authorization": "Bearer sk-upstream-secret-1",
    }


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw
    server.script = answer(OK, keep_open=False)  # one answer, then it hangs up
    assert await post(seam, url) == (200, b'{"ok": true}')
    assert seam.client is not None
    (idle,) = seam.client.idle[http1.Origin.of(url)]
    await wait_for(lambda: idle.transport is None, what="the hang-up")
    assert await post(seam, url) == (200, b'{"ok": true}')
    assert server.connections == 2


async def test_connection_close_and_a_body_that_ends_with_the_connection(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw
    server.script = answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 100_000, keep_open=False)
    assert await post(seam, url) == (200, b"x" * 100_000)
    assert await post(seam, url) == (200, b"x" * 100_000)
    assert server.connections == 2  # never reused


async def test_chunked_gzip_and_informational_answers_are_read_as_meant(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw
    packed = gzip.compress(b'{"zipped": true}')
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (packed[:7], packed[7:])) + b"0\r\n\r\n"
    server.script = answer(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n" + chunked,
        b"HTTP/1.1 200 OK\r\ncontent-encoding: deflate\r\ncontent-length: %d\r\n\r\n%s"
        % (len(zlib.compress(b"deflated")), zlib.compress(b"deflated")),
    )
    assert await post(seam, url) == (200, b'{"zipped": true}')
    assert await post(seam, url) == (200, b"deflated")
    assert server.connections == 1


@pytest.mark.parametrize(
    "reply",
    [b"not http at all\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n", b""],
    ids=["garbage", "bad length", "hang-up"],
)
async def test_an_answer_that_is_not_http_is_unavailable_not_a_crash(
    raw: tuple[RawServer, str], seam: Upstream, reply: bytes
) -> None:
    server, url = raw
    server.script = answer(reply, keep_open=False)
    with pytest.raises(errors.UpstreamUnavailable, match="could not be reached"):
        await post(seam, url)


async def test_headers_without_end_are_refused(raw: tuple[RawServer, str], seam: Upstream) -> None:
    server, url = raw
    server.script = answer(b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"y" * 100_000 + b"\r\n\r\n")
    with pytest.raises(errors.UpstreamUnavailable):
        await post(seam, url)


async def test_a_body_cut_short_of_its_length_is_broken(raw: tuple[RawServer, str], seam: Upstream) -> None:
    server, url = raw
    server.script = answer(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"half":', keep_open=False)
    with pytest.raises(errors.UpstreamBroken, match="broke off its answer"):
        await post(seam, url)


async def test_an_upstream_that_never_answers_times_out(raw: tuple[RawServer, str], seam: Upstream) -> None:
    server, url = raw
    server.script = answer()  # reads nothing, answers nothing
    with pytest.raises(errors.UpstreamTimeout):
        await post(seam, url, timeout_s=0.2)


async def test_a_body_that_stalls_times_out_as_broken(raw: tuple[RawServer, str], seam: Upstream) -> None:
    server, url = raw
    server.script = answer(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"stalled":')
    with pytest.raises(errors.UpstreamBroken, match="timeout"):
        await post(seam, url, timeout_s=0.2)


async def test_a_slow_reader_pauses_the_socket_so_memory_stays_bounded(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw
    sent = asyncio.Event()
    total = 128 * http1.HIGH_WATER  # 32 MB

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 4096):
            writer.write(b"z" * 4096)
            await writer.drain()  # blocks once the client stops reading
        sent.set()
        await reader.read()

    server.script = script
    async with await seam.post(target(url), "/chat/completions", b"{}", "req_slow") as response:
        connection = response._response._connection
        # the client's buffer fills, then it stops reading: far more than the loopback's
        # buffers hold stays with the upstream, which cannot finish sending
        await wait_for(lambda: connection.paused, what="the pause")
        read_size = 256 * 1024  # the most one read of the event loop takes (asyncio, uvloop)
        assert connection.buffered <= http1.HIGH_WATER + read_size and not sent.is_set()
        received = 0
        while (chunk := await response.next_chunk()) is not None:
            received += len(chunk)
        assert received == total and sent.is_set()


async def test_a_request_cancelled_while_waiting_closes_its_connection(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    server, url = raw
    server.script = answer()  # never answers
    task = asyncio.create_task(post(seam, url))
    await wait_for(lambda: server.connections == 1, what="the connection")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seam.client is not None and not seam.client.idle.get(http1.Origin.of(url))


def test_origins_parse_once_per_base_url() -> None:
    assert http1.Origin.of("https://api.openai.com/v1") == http1.Origin(
        "api.openai.com", 443, True, "/v1", "api.openai.com"
    )
    assert http1.Origin.of("http://[::1]:8080/") == http1.Origin("::1", 8080, False, "", "[::1]:8080")


async def test_connections_idle_past_the_keep_alive_are_closed_at_the_next_release(
    raw: tuple[RawServer, str], seam: Upstream
) -> None:
    """After a burst, the pool does not keep sockets open that it will never reuse."""
    server, url = raw
    server.script = answer(OK, OK)
    await asyncio.gather(*(post(seam, url) for _ in range(3)))  # three at once: three connections
    assert seam.client is not None
    pool = seam.client.idle[http1.Origin.of(url)]
    assert len(pool) == 3 and server.connections == 3
    stale = list(pool)[:2]  # the two used least recently
    for connection in stale:
        connection.idle_since -= http1.KEEPALIVE_S + 1  # as if they had idled since a burst long ago
    assert await post(seam, url) == (200, b'{"ok": true}')  # reuses the freshest, then releases it
    assert len(pool) == 1 and server.connections == 3
    await wait_for(lambda: sum(c.transport is None for c in stale) == 2, what="the stale two closed")


async def tls_server(name: str) -> tuple[trustme.CA, RawServer, str]:
    """A TLS server on localhost whose certificate, for `name`, a new test CA signed."""
    ca = trustme.CA()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(served)
    server = RawServer()
    url = await server.start(tls=served, host="localhost")
    server.script = answer(OK, OK)
    return ca, server, url


@pytest.mark.parametrize("name", ["localhost", "elsewhere.example"])
async def test_a_tls_upstream_is_verified_by_name_and_kept_alive(
    seam: Upstream, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """HTTPS upstreams (OpenAI's): the certificate is checked against the system's CAs
    (here a test CA stands in for them) and the host name; a certificate for another
    name is refused before anything is sent."""
    ca, server, url = await tls_server(name)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    monkeypatch.setattr(http1, "tls_context", lambda: trusted)
    try:
        if name != "localhost":
            with pytest.raises(errors.UpstreamUnavailable, match="could not be reached"):
                await post(seam, url)
            return
        assert await post(seam, url) == (200, b'{"ok": true}')
        assert await post(seam, url) == (200, b'{"ok": true}')
        assert server.connections == 1
    finally:
        assert server.server is not None
        server.server.close()


async def test_a_tls_upstream_whose_ca_is_not_trusted_is_refused(seam: Upstream) -> None:
    _, server, url = await tls_server("localhost")  # its CA is not among the system's
    try:
        with pytest.raises(errors.UpstreamUnavailable, match="could not be reached"):
            await post(seam, url)
    finally:
        assert server.server is not None
        server.server.close()


async def test_a_burst_of_new_connections_resolves_the_host_name_once(
    raw: tuple[RawServer, str], seam: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As aiohttp's connector did (ttl_dns_cache): DNS is asked once per name, not once per
    new connection through the loop's few resolver threads."""
    server, url = raw
    server.script = answer(OK, OK)
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: str, *args: object, **kwargs: object) -> object:
        asked.append(host)
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    by_name = url.replace("127.0.0.1", "localhost")
    results = await asyncio.gather(*(post(seam, by_name) for _ in range(8)))
    assert results == [(200, b'{"ok": true}')] * 8 and server.connections == 8
    await asyncio.gather(*(post(seam, by_name) for _ in range(9)))  # 8 kept alive, 1 new: known already
    assert server.connections == 9 and asked.count("localhost") == 1
