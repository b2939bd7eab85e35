"""A bare aiohttp pass-through proxy: the CPU baseline metering-proxy is compared with.

It forwards POST bodies to the upstream and answers the way metering-proxy does: a JSON
answer read whole and sent as one `web.Response`, a stream relayed chunk by chunk through
a `StreamResponse`; no auth, no parsing and no metering: a tight floor.

`--client http1` forwards through the proxy's own upstream client (proxy/http1.py)
instead of aiohttp's: the floor of the proxy's transport, so that what the proxy spends
above it is metering alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy import http1

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "upgrade"}


def make_app(upstream: str) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def start(_: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(_: web.Application) -> None:
        assert session is not None
        await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        async with session.post(
            upstream + request.path.removeprefix("/v1"), data=body, headers={"content-type": "application/json"}
        ) as resp:
            streamed = resp.content_type == "text/event-stream"
            return await answer(request, resp.status, resp.headers, streamed, resp.read, resp.content.iter_any())

    app = web.Application(client_max_size=64 * 1024 * 1024)  # bench/memory.py's 10 MB prompts
    app.router.add_post("/{tail:.*}", forward)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def make_lean_app(upstream: str) -> web.Application:
    """The same answers, through http1.py."""
    client = http1.Http1Client()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path.removeprefix("/v1")
        resp = await client.post(upstream, path, body, {"content-type": "application/json"}, 10.0, 600.0)
        try:
            streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
            return await answer(request, resp.status, resp.headers, streamed, resp.read, chunks(resp))
        finally:
            resp.release()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", forward)
    return app


async def chunks(resp: http1.Response) -> AsyncIterator[bytes]:
    while (chunk := await resp.next_chunk()) is not None:
        yield chunk


async def answer(
    request: web.Request,
    status: int,
    headers: Mapping[str, str],
    streamed: bool,
    read: Callable[[], Awaitable[bytes]],
    body: AsyncIterator[bytes],
) -> web.StreamResponse:
    """As the proxy answers: a JSON body read whole, one `web.Response`; a stream chunk by chunk."""
    kept = {k: v for k, v in headers.items() if k.lower() not in HOP}
    if not streamed:
        return web.Response(status=status, body=await read(), headers=kept)
    out = web.StreamResponse(status=status, headers=kept)
    await out.prepare(request)
    async for chunk in body:
        await out.write(chunk)
    await out.write_eof()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=("aiohttp", "http1"), default="aiohttp")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = make_lean_app(args.upstream) if args.client == "http1" else make_app(args.upstream)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
