"""A lean HTTP/1.1 client for the upstream hop: keep-alive connections per origin, a
request written in one call, the answer parsed by llhttp (httptools) as it arrives.

aiohttp's client spends ~95 us of CPU per request on this machine (request and response
objects, tracing hooks, connector bookkeeping, a timer per read); this one ~15 us. It
speaks only what the proxy sends upstream: a POST whose body is in hand, over TCP or
TLS, and an answer read whole or chunk by chunk. Its failures are `HttpError` (the
connection or the protocol broke) and `TimeoutError` (no byte for `read_timeout_s`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

KEEPALIVE_S = 15.0  # an idle connection is not reused after this (aiohttp's default)
HIGH_WATER = 1 << 18  # unread answer bytes buffered before the socket is paused
MAX_HEAD_BYTES = 1 << 16  # an answer's status line and headers, at most
DNS_TTL_S = 300.0  # a resolved host name is reused this long (aiohttp's ttl_dns_cache)
MAX_INFLATED = 1 << 27  # what a compressed answer may inflate to (we ask for identity)


class HttpError(Exception):
    """The upstream closed the connection early, or did not speak HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a base URL's requests go, parsed once: `https://host/v1` -> TLS to host:443,
    paths under /v1."""

    host: str
    port: int
    tls: bool
    prefix: str  # the base URL's path, which every request path extends
    host_header: str

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def of(base_url: str) -> Origin:
        parts = urlsplit(base_url)
        tls = parts.scheme == "https"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if parts.port is None else f"{shown}:{port}"
        return Origin(host, port, tls, parts.path.rstrip("/"), host_header)


@functools.cache
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # the system's CAs, as aiohttp's client uses


class Inflater:
    """A gzip or deflate body, inflated to at most MAX_INFLATED bytes, as aiohttp read it:
    gzip members one after another, deflate with or without its zlib header."""

    def __init__(self, encoding: str) -> None:
        self.gzip = "gzip" in encoding
        self.decoder: zlib._Decompress | None = None  # made at the first byte, which tells deflate's kind
        self.room = MAX_INFLATED

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.decoder is None:
                raw = not self.gzip and data[0] & 0x0F != 8  # 8: a zlib header's method, deflate
                self.decoder = zlib.decompressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS | 32)
            piece = self.decoder.decompress(data, self.room + 1)
            self.room -= len(piece)
            if self.room < 0:  # a bomb: a few MB on the wire, GBs inflated
                raise HttpError(f"the upstream's compressed body inflates past {MAX_INFLATED} bytes")
            out.append(piece)
            data = self.decoder.unused_data if self.gzip and self.decoder.eof else b""
            if data:  # the next gzip member
                self.decoder = None
        return b"".join(out)

    def finish(self) -> bytes:
        if self.decoder is None:
            return b""  # an empty body
        try:
            tail = self.decoder.flush()
        except zlib.error as exc:
            raise HttpError(f"the upstream's compressed body is corrupt ({exc})") from exc
        if not self.decoder.eof:
            raise HttpError("the upstream's compressed body ends before its compressed stream")
        return tail


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. The parser's callbacks fill the
    status, headers and body chunks; readers wait on one future at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.in_flight = False  # a request was sent and its answer has not ended
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.body_bytes = 0
        self.barren = 0  # bytes fed since the last that gave body: a head, 1xx answers, trailers
        self.headers: CIMultiDictProxy[str] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.whole = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False  # no length and not chunked: the body ends with the connection
        self.decoder: Inflater | None = None
        self.failure: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.read_timeout_s = 0.0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- the request

    def send(self, head: bytes, body: bytes, read_timeout_s: float) -> None:
        assert self.transport is not None
        self._reset()
        self.in_flight = True
        self.read_timeout_s = read_timeout_s
        self.deadline = self.loop.time() + read_timeout_s
        self.timer = self.loop.call_at(self.deadline, self._watch)
        self.transport.writelines((head, body))

    async def wait_head(self) -> None:
        """Until the head has arrived, even if what came behind it broke (in the same read):
        the body's reader hears of the break after what came whole."""
        while self.headers is None:
            try:
                await self._wait()
            except (HttpError, TimeoutError):
                if self.headers is None:
                    raise

    async def read(self) -> bytes:
        self.whole = True  # read to the end: never paused
        self._resume()
        while not self.complete:
            await self._wait()
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    async def next_chunk(self) -> bytes | None:
        """What has arrived since the last call (never waiting for more), None at the end."""
        while not self.chunks:
            if self.complete:
                return None
            await self._wait()
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        self._resume()
        return data

    def _resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    @property
    def reusable(self) -> bool:
        """Answered whole, kept alive, and our request sent whole: an upstream that answered
        before reading it all would read the next request behind the rest of this one."""
        transport = self.transport
        return (
            self.complete
            and self.keep_alive
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        if self.failure is not None:
            raise self.failure
        self.waiter = self.loop.create_future()
        self.deadline = self.loop.time() + self.read_timeout_s  # the clock runs while someone waits
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.failure is not None:
            raise self.failure

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, failure: BaseException) -> None:
        if self.failure is None and not self.complete:
            self.failure = failure
        self._stop_timer()
        self._wake()

    def _watch(self) -> None:
        """One timer per request, not one per read: at the deadline, a reader still
        waiting fails; otherwise it looks again at the next deadline."""
        self.timer = None
        if self.complete or self.failure is not None:
            return
        now = self.loop.time()
        if self.waiter is None:  # the reader is busy (writing to its client): not our wait
            self.timer = self.loop.call_at(now + self.read_timeout_s, self._watch)
            return
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._watch)
            return
        self._fail(TimeoutError(f"no data from the upstream for {self.read_timeout_s:g} s"))
        self.abort()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:  # an answer no request asked for: what follows cannot be trusted
            self.abort()
            return
        self.deadline = self.loop.time() + self.read_timeout_s
        body_bytes = self.body_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # a callback's own failure came first, if any
            self._fail(self.failure or HttpError(f"the upstream's answer is not valid HTTP/1.1 ({exc})"))
            self.abort()
        except httptools.HttpParserUpgrade:  # 101: not an answer to a POST we sent
            self._fail(HttpError("the upstream switched protocols"))
            self.abort()
        else:
            # httptools holds a header's (or a trailer's) bytes until its line ends
            self.barren = 0 if self.body_bytes > body_bytes else self.barren + len(data)
            if self.barren > MAX_HEAD_BYTES and not self.complete:
                self._fail(HttpError(f"the upstream's headers or trailers exceed {MAX_HEAD_BYTES} bytes"))
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.headers is not None and self.until_eof and exc is None and not self.complete:
            self.on_message_complete()  # the end of the connection was the end of the body
        self._fail(HttpError("the upstream closed the connection before its answer ended"))

    # -- httptools callbacks (an exception raised in one stops the parse: data_received)

    def _broken(self, why: str) -> HttpError:
        self.failure = HttpError(why)
        return self.failure

    def on_message_begin(self) -> None:
        if not self.in_flight:  # a second answer behind the first: it would be the next request's
            raise HttpError("the upstream sent an answer no request asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise self._broken(f"the upstream's headers exceed {MAX_HEAD_BYTES} bytes")
        self.raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "replace")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits; 0 would read as "no answer yet"
            raise self._broken(f"the upstream's status {status} is not an HTTP status")
        if 100 <= status < 200:  # informational (100 Continue): the answer follows it
            self.raw_headers, self.head_bytes = [], 0
            return
        headers = CIMultiDict(self.raw_headers)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            # asked for identity; a server that compresses anyway is read as it meant
            self.decoder = Inflater(encoding)
        elif encoding not in ("identity", ""):  # br, zstd, ...: bytes no client could read, refused with the head
            raise self._broken(f"the upstream's answer is in an encoding we cannot read ({encoding[:40]})")
        self.status = status
        self.headers = CIMultiDictProxy(headers)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.until_eof = "content-length" not in headers and not chunked and status not in (204, 304)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.status == 0:
            return  # an informational answer has none
        self.body_bytes += len(body)  # as sent: inflating may give nothing yet
        if self.decoder is not None:
            try:
                body = self.decoder.feed(body)
            except zlib.error as exc:
                raise self._broken(f"the upstream's compressed body is corrupt ({exc})") from exc
            except HttpError as exc:  # a bomb
                raise self._broken(str(exc)) from None
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not (self.paused or self.whole) and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # a slow client: the upstream waits, memory stays bounded
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an informational answer
        self.in_flight = False
        if self.decoder is not None:
            try:
                self.chunks.append(self.decoder.finish())
            except HttpError as exc:  # not raised: connection_lost calls this too
                self._fail(exc)
                self.abort()
                return
        self.complete = True
        self.keep_alive = not self.until_eof and self.parser.should_keep_alive()
        self._stop_timer()
        self._wake()


class Response:
    """An answer whose head has arrived: status and headers; the body is read from it."""

    def __init__(self, client: Http1Client, origin: Origin, connection: Connection) -> None:
        assert connection.headers is not None
        self.status = connection.status
        self.headers = connection.headers
        self._client, self._origin, self._connection = client, origin, connection
        self.read, self.next_chunk = connection.read, connection.next_chunk  # no wrapper per chunk

    def close(self) -> None:
        self._connection.abort()

    def release(self) -> None:
        """The connection goes back to the pool if its answer was read to the end."""
        self._client.release(self._origin, self._connection)


class Resolver:
    """Host names resolved once per DNS_TTL_S, one lookup at a time per name, as aiohttp's
    connector did: a burst of new connections (a deploy, a spike) asks DNS once, not once
    each through the loop's few resolver threads."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._asking: dict[tuple[str, int], asyncio.Future[list[str]]] = {}

    async def addresses(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        known = self._known.get((host, port))
        if known is not None and known[0] > loop.time():
            return known[1]
        asking = self._asking.get((host, port))
        if asking is None:
            asking = self._asking[host, port] = asyncio.ensure_future(self._lookup(host, port))
            asking.add_done_callback(lambda _: self._asking.pop((host, port), None))
        return await asyncio.shield(asking)  # a caller that gives up leaves the lookup to the others

    async def _lookup(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(map(_address, infos)))  # in the resolver's order, once each
        self._known[host, port] = (loop.time() + DNS_TTL_S, addresses)
        return addresses


def _address(info: tuple[Any, ...]) -> str:
    sockaddr = info[4]
    if len(sockaddr) == 4 and sockaddr[3]:  # a link-local IPv6 address keeps its scope
        return f"{sockaddr[0]}%{sockaddr[3]}"
    return str(sockaddr[0])


class Http1Client:
    def __init__(self) -> None:
        self.idle: dict[Origin, deque[Connection]] = {}
        self.resolver = Resolver()

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> Response:
        origin = Origin.of(base_url)
        connection = self._idle(origin) or await self._connect(origin, connect_timeout_s)
        lines = [f"POST {origin.prefix}{path} HTTP/1.1\r\nhost: {origin.host_header}\r\ncontent-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        connection.send(("\r\n".join(lines) + "\r\n\r\n").encode(), body, read_timeout_s)
        try:
            await connection.wait_head()
        except BaseException:
            connection.abort()
            raise
        return Response(self, origin, connection)

    def release(self, origin: Origin, connection: Connection) -> None:
        if not connection.reusable:
            connection.abort()
            return
        now = connection.loop.time()
        connection.idle_since = now
        pool = self.idle.setdefault(origin, deque())
        pool.append(connection)
        # the least recently used sit at the left: after a burst, what idles past the
        # keep-alive is closed here, not left holding a socket until the upstream hangs up
        while pool and not (pool[0].reusable and now - pool[0].idle_since < KEEPALIVE_S):
            pool.popleft().abort()

    def _idle(self, origin: Origin) -> Connection | None:
        pool = self.idle.get(origin)
        while pool:
            connection = pool.pop()  # the most recently used: the least likely to be stale
            if connection.reusable and connection.loop.time() - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: Origin, timeout_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = tls_context() if origin.tls else None
        failure: OSError | None = None
        async with asyncio.timeout(timeout_s):
            for address in await self.resolver.addresses(origin.host, origin.port):
                try:
                    transport, connection = await loop.create_connection(
                        Connection, address, origin.port, ssl=tls, server_hostname=origin.host if tls else None
                    )
                except OSError as exc:  # the next address, as create_connection does with a name
                    failure = exc
                    continue
                connection.transport = transport  # uvloop may call connection_made only on the next loop turn
                return connection
        raise failure or OSError(f"{origin.host} has no address")

    async def close(self) -> None:
        for pool in self.idle.values():
            for connection in pool:
                connection.abort()
        self.idle.clear()
