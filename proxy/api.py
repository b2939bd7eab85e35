"""The client listener: metered OpenAI routes plus models, credits, the caller's key, its
account's generations and usage, and health."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from . import errors, metrics, pages, relay, views
from .generations import recent
from .intake import ENDPOINTS
from .keys import KeyRecord
from .money import usd
from .schemas import GenerationsQuery, parse
from .scripts import KeyFigures
from .service import Service
from .state import STATE, State

log = structlog.get_logger("proxy.api")


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req_id = relay.request_id()
    try:
        key, figures = await own_key(request)
    except errors.ProxyError as err:
        return relay.error_response(err, req_id)
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": route.upstream_name}
        for name, route in state.catalog.routes.items()
        if key.allows(name) and figures.allows(name)
    ]
    return json_response({"object": "list", "data": data}, headers={"x-request-id": req_id})


async def credits(request: web.Request) -> web.Response:
    state = request.app[STATE]
    req_id = relay.request_id()
    try:
        key = await state.keys.authenticate(request.headers.get("Authorization"))
        view = await state.ledger.touch(key.account_id, key.key_id)
    except errors.ProxyError as err:
        return relay.error_response(err, req_id)
    body = views.balance(key.account_id, view)
    body.update(
        tier=view.fields.get("tier"),
        rate_limits={"rpm": view.rpm, "tpm": view.tpm},
        plan=view.fields.get("plan") or None,
        lifetime_paid_usd=usd(view.num("lifetime_paid")),
    )
    return json_response(body, headers={"x-request-id": req_id})


async def own(request: web.Request, read: Callable[[State, KeyRecord], Awaitable[object]]) -> web.Response:
    """A read of the caller's own account: `read` gets its authenticated key; errors in
    OpenAI's shape; `x-request-id` either way."""
    state = request.app[STATE]
    req_id = relay.request_id()
    try:
        key, _ = await own_key(request)  # a 401 once revoked or expired, on every route
        body = await read(state, key)
    except errors.ProxyError as err:
        return relay.error_response(err, req_id)
    return json_response(body, headers={"x-request-id": req_id})


async def generation(request: web.Request) -> web.Response:
    """One request of the caller's own account (generations.py); another account's id is
    the same 404 as an unknown one: the lookup only ever reads the caller's account's
    keys (`own` has refused a revoked or expired key already)."""
    return await own(request, lambda state, key: Service.of(state).generation(key.account_id, request.query))


async def usage(request: web.Request) -> web.Response:
    """The caller's own account's usage, in the admin route's shape (reports.py)."""

    async def read(state: State, key: KeyRecord) -> object:
        return await Service.of(state).usage(key.account_id, request.query)

    return await own(request, read)


async def generations(request: web.Request) -> web.Response:
    """The caller's account's latest requests with their cost, newest first."""

    async def read(state: State, key: KeyRecord) -> object:
        q = parse(GenerationsQuery, request.query)
        data, cursor = await recent(state.redis, key.account_id, q.limit, q.cursor)
        return {"object": "list", "data": data, "next_cursor": cursor}

    return await own(request, read)


async def key_info(request: web.Request) -> web.Response:
    """The caller's own key: its limit, spend, expiry, models and rate limits."""
    req_id = relay.request_id()
    try:
        key, figures = await own_key(request)
    except errors.ProxyError as err:
        return relay.error_response(err, req_id)
    return json_response(views.api_key(key.account_id, figures), headers={"x-request-id": req_id})


async def own_key(request: web.Request) -> tuple[KeyRecord, KeyFigures]:
    """The caller's key: its identity (cached) and its settings and spend as its account's
    slot has them now (a 401 if revoked or expired)."""
    state = request.app[STATE]
    key = await state.keys.authenticate(request.headers.get("Authorization"))
    [figures] = await state.ledger.key_figures(key.account_id, [key.key_id])
    figures.usable()
    return key, figures


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"}, headers={"x-request-id": relay.request_id()})


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error in OpenAI's shape: unknown routes too, and never a traceback."""
    try:
        return await handler(request)
    except errors.ProxyError as err:
        return relay.error_response(err, relay.request_id())
    except errors.REDIS_DOWN:  # a Redis call outside the ledger (a key's status, ...)
        metrics.child(metrics.REDIS_ERRORS, "other").inc()
        down = errors.StoreUnavailable("The metering store is unavailable.")
        return relay.error_response(down, relay.request_id())
    except RequestPayloadError as exc:  # an undecodable body (admin handlers read it themselves)
        bad = errors.InvalidRequest(f"The request body could not be decoded: {exc}.")
        return relay.error_response(bad, relay.request_id())
    except relay.CLIENT_GONE:  # hung up mid-request: not our error, no traceback
        log.info("client_gone", path=request.path, method=request.method)
        return relay.error_response(errors.ClientGone("The client closed the connection."), relay.request_id())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        http = errors.ProxyError(
            f"{exc.status} {exc.reason}: {request.method} {request.path}", type="invalid_request_error"
        )
        http.status = exc.status
        if "Allow" in exc.headers:  # a 405 names the methods the route takes (RFC 9110 15.5.6)
            http.headers["Allow"] = exc.headers["Allow"]
        return relay.error_response(http, relay.request_id())
    except Exception:
        # the traceback goes to the log, under the request id; the client gets a 500
        req_id = relay.request_id()
        log.exception("request_failed", path=request.path, method=request.method, request_id=req_id)
        internal = errors.ProxyError("The server had an error while processing your request.", code="internal_error")
        return relay.error_response(internal, req_id)


def client_app() -> web.Application:
    # client_max_size is enforced by relay.read_body with a clean 413 instead
    app = web.Application(client_max_size=2**62, middlewares=[openai_errors])
    for endpoint, (path, _, _) in ENDPOINTS.items():
        app.router.add_post(path, functools.partial(relay.metered, endpoint=endpoint))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/credits", credits)
    app.router.add_get("/v1/generation", generation)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/generations", generations)
    app.router.add_get("/v1/key", key_info)
    app.router.add_get("/healthz", healthz)
    pages.add_page(app, "usage", "/usage", guard=usage_page_on)
    return app


def usage_page_on(request: web.Request) -> bool:
    return request.app[STATE].config.server.usage_page
