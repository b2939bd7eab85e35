"""The admin listener: the admin API behind `admin_token`, metrics and health."""

from __future__ import annotations

import hmac

from aiohttp import web

from . import errors, metrics, relay
from .api import json_response
from .state import STATE

PUBLIC = frozenset(("/healthz", "/readyz", "/metrics"))


@web.middleware
async def require_admin_token(request: web.Request, handler: relay.Handler) -> web.StreamResponse:
    if request.path in PUBLIC:
        return await handler(request)
    token = request.app[STATE].config.server.admin_token
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}" if token else ""
    if not token or not hmac.compare_digest(given.encode(), expected.encode()):
        err = errors.InvalidApiKey("A valid admin token is required (Authorization: Bearer <admin_token>).")
        return relay.error_response(err, relay.request_id())
    try:
        return await handler(request)
    except errors.ProxyError as err:
        return relay.error_response(err, relay.request_id())


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STATE].redis.ping()
    except Exception:
        return json_response({"status": "unavailable", "redis": "down"}, status=503)
    return json_response({"status": "ready"})


async def prometheus(_: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"content-type": content_type})


def admin_app() -> web.Application:
    app = web.Application(middlewares=[require_admin_token])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    return app
