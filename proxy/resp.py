"""A lean Redis client for the hot path: the two script calls of every metered request.

redis-py spends ~130 us of CPU per call here (connection pool checkout, retry and
observability layers); this client spends about half. It multiplexes every concurrent
call over one connection: Redis answers a connection's commands in order, so each call
only appends a future to a FIFO, and replies resolve them as hiredis parses them.
Under load, calls from concurrent requests share writes and reads for free.

It speaks only what the hot path needs (commands and pipelines over plain TCP or a unix
socket, with AUTH/SELECT). Everything else, and TLS or Cluster, uses redis-py. Failures
raise redis-py's own exception types, so callers handle one family of errors.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser


class Packed(bytes):
    """Arguments packed once and reused (an account's key names, the script context):
    `pack` splices them in without encoding them again."""

    arity: int  # how many arguments it holds

    def __new__(cls, *args: Any) -> Packed:
        packed = super().__new__(cls, b"".join(_bulk(arg) for arg in args))
        packed.arity = len(args)
        return packed


def _bulk(arg: Any) -> bytes:
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(args: tuple[Any, ...]) -> bytes:
    count = 0
    out = [b""]
    for arg in args:
        kind = type(arg)  # the hot path's own kinds first: what _bulk does, inline (~40% less CPU)
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif kind is Packed:
            out.append(arg)
            count += arg.arity
            continue
        else:
            out.append(_bulk(arg))
            count += 1
            continue
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
        count += 1
    out[0] = b"*%d\r\n" % count
    return b"".join(out)


def _mapped(reply: Any) -> Any:
    """Error replies become the exceptions redis-py raises for them, through redis-py's
    own table (NOSCRIPT -> NoScriptError, LOADING -> BusyLoadingError, ...)."""
    if isinstance(reply, hiredis.ReplyError):
        return BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        # (future, deadline): replies come in order, so the oldest waiter is the most overdue
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []  # queued in this turn of the loop (send)
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter, _ = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.watchdog is not None:
            self.watchdog.cancel()
        while self.waiters:
            waiter, _ = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(redis_errors.ConnectionError("connection to Redis lost"))

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, payload: bytes, replies: int, timeout_s: float) -> list[asyncio.Future[Any]]:
        """Queue `payload`; what every caller queued in this turn of the loop leaves in one
        write (one syscall instead of one per call under load). Replies that do not come
        within `timeout_s` fail with TimeoutError."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        deadline = loop.time() + timeout_s
        self.waiters.extend((future, deadline) for future in futures)
        if self.watchdog is None:
            self.watchdog = loop.call_at(deadline, self._watch)
        if not self.outgoing:
            loop.call_soon(self._flush)
        self.outgoing.append(payload)
        return futures

    def _watch(self) -> None:
        """One timer per connection instead of one per call (asyncio.timeout costs ~4 us
        a call): at the oldest waiting reply's deadline, a reply that has not come fails
        them all and the connection (replies would now arrive out of step)."""
        self.watchdog = None
        loop = asyncio.get_running_loop()
        waiting = next(((f, d) for f, d in self.waiters if not f.done()), None)
        if waiting is None:
            return
        if waiting[1] > loop.time():
            self.watchdog = loop.call_at(waiting[1], self._watch)
            return
        while self.waiters:
            waiter, _ = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(redis_errors.TimeoutError("Redis did not answer in time"))
        self.close()

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(outgoing))
        # else connection_lost fails the waiters

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RespClient:
    def __init__(self, url: str, timeout_s: float = 2.0, connect_timeout_s: float = 1.0) -> None:
        parts = urlsplit(url)
        self.unix_path = parts.path if parts.scheme == "unix" else None
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        self.db = int(db) if db.isdigit() else 0
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return urlsplit(url).scheme in ("redis", "unix")

    async def call(self, *args: Any) -> Any:
        (reply,) = await self.pipeline(args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send several commands in one write; replies (errors as exception objects) in order."""
        conn = await self._connection()
        futures = conn.send(b"".join(pack(c) for c in commands), len(commands), self.timeout_s)
        return [_mapped(await f) for f in futures]

    async def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.usable:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None or not self._conn.usable:
                self._conn = await self._open()
        return self._conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.unix_path:
                    transport, conn = await loop.create_unix_connection(_Connection, self.unix_path)
                else:
                    transport, conn = await loop.create_connection(_Connection, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to Redis: {exc}") from exc
        conn.transport = transport  # uvloop may call connection_made only on the next loop turn
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        if setup:
            futures = conn.send(b"".join(pack(c) for c in setup), len(setup), self.timeout_s)
            for future in futures:
                if isinstance(reply := _mapped(await future), Exception):
                    conn.close()
                    raise redis_errors.ConnectionError(f"Redis refused the connection setup: {reply}")
        return conn

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
