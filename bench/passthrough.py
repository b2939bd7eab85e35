"""A bare aiohttp pass-through proxy: the CPU baseline metering-proxy is compared with.

It forwards POST bodies to the upstream and answers the way metering-proxy does: a JSON
answer read whole and sent as one `web.Response`, a stream relayed chunk by chunk through
a `StreamResponse`; no auth, no parsing and no metering: a tight floor.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

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
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            if resp.content_type != "text/event-stream":
                return web.Response(status=resp.status, body=await resp.read(), headers=headers)
            out = web.StreamResponse(status=resp.status, headers=headers)
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application(client_max_size=64 * 1024 * 1024)  # bench/memory.py's 10 MB prompts
    app.router.add_post("/{tail:.*}", forward)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)
