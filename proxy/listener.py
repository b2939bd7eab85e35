"""The listeners' HTTP server: aiohttp's, with deadlines on connections that do nothing.

aiohttp (as of 3.14.5, the floor in pyproject.toml) closes a connection that has no
request in progress (just opened, or idle after a response) once `keepalive_timeout`
passes, and has no deadline of its own for a request head that trickles in.
`TimedHandler` adds one: from the first byte of a head, the whole head must arrive within
`header_timeout_s`, else the client gets a 408 in OpenAI's error shape and the connection
is closed. Bodies have their own deadline (`relay.read_body`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import errors, relay


def _timeout_response() -> bytes:
    body = errors.RequestTimeout("The request headers did not arrive in time.").to_body()
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nx-request-id: {relay.request_id()}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class TimedHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline on each request head."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        if self._waiter is not None:  # aiohttp waits on it for the next request head
            return not self._waiter.done()
        return self._request_count == 0  # bytes before the protocol's loop even started

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a head arrived whole
            self._disarm()
        elif data and self.head_deadline is None and self._awaiting_head():
            self.head_deadline = self._loop.call_later(self.header_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        if self.transport is not None:
            self.transport.write(_timeout_response())
        self.force_close()


class TimedServer(web.Server):
    def __call__(self) -> RequestHandler:
        return TimedHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose server speaks through `TimedHandler`."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app's startup, freezing and handler options
        return TimedServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout_s=self.header_timeout_s,
            **made._kwargs,
        )
