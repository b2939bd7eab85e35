"""The admin listener: the admin API behind `admin_token`, metrics and health.

Every route is one row of `ROUTES`; the router and the OpenAPI document are both built
from that table and from the request models the service validates with, so the
document cannot drift from the handlers. Handlers are thin: `service` does the work.
"""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.asyncio import RedisCluster

from . import errors, metrics, openapi, pages
from .api import json_response, openai_errors
from .gauges import StoreGauges
from .generations import Generation
from .openapi import PUBLIC, Operation
from .schemas import (
    AccountCreate,
    AccountPatch,
    AccountQuery,
    AdjustmentCreate,
    DeadLetterQuery,
    ExportQuery,
    GrantCreate,
    GrantVoid,
    KeyCreate,
    KeyPatch,
    LedgerQuery,
    UsageQuery,
    WebhookReplay,
    loads,
)
from .service import Service
from .state import STATE

log = structlog.get_logger("proxy.admin")


class StreamCut(Exception):
    """A streamed response failed after its headers were sent: drop the connection."""


@web.middleware
async def require_admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC and not pages.serves(request) and not _authorized(request):
        raise errors.InvalidApiKey("A valid admin token is required (Authorization: Bearer <admin_token>).")
    try:
        return await handler(request)
    except StreamCut:
        log.exception("admin_stream_cut", path=request.path)
        raise
    except errors.STORE_DOWN as exc:
        raise errors.StoreUnavailable("The metering store is unavailable.") from exc


def _authorized(request: web.Request) -> bool:
    token = request.app[STATE].config.server.admin_token
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}" if token else ""
    # non-ASCII bytes in a header are never a valid token (and would not encode cleanly)
    return bool(token) and given.isascii() and hmac.compare_digest(given.encode(), expected.encode())


async def _body(request: web.Request) -> dict[str, Any]:
    return loads(await request.read())


def _svc(request: web.Request) -> Service:
    return Service.of(request.app[STATE])


def _id(request: web.Request, name: str = "account_id") -> str:
    return request.match_info[name]


# -- handlers ----------------------------------------------------------------------


async def list_accounts(request: web.Request) -> web.Response:
    return json_response(await _svc(request).list_accounts(request.query))


async def create_account(request: web.Request) -> web.Response:
    return json_response(await _svc(request).create_account(await _body(request)), status=201)


async def get_account(request: web.Request) -> web.Response:
    return json_response(await _svc(request).get_account(_id(request)))


async def update_account(request: web.Request) -> web.Response:
    return json_response(await _svc(request).update_account(_id(request), await _body(request)))


async def create_key(request: web.Request) -> web.Response:
    return json_response(await _svc(request).create_key(_id(request), await _body(request)), status=201)


async def list_keys(request: web.Request) -> web.Response:
    return json_response(await _svc(request).list_keys(_id(request)))


async def get_key(request: web.Request) -> web.Response:
    return json_response(await _svc(request).get_key(_id(request, "key_id")))


async def update_key(request: web.Request) -> web.Response:
    return json_response(await _svc(request).update_key(_id(request, "key_id"), await _body(request)))


async def revoke_key(request: web.Request) -> web.Response:
    return json_response(await _svc(request).revoke_key(_id(request, "key_id")))


async def grant(request: web.Request) -> web.Response:
    created, body = await _svc(request).grant(_id(request), await _body(request))
    return json_response(body, status=201 if created else 200)


async def adjust(request: web.Request) -> web.Response:
    created, entry = await _svc(request).adjust(_id(request), await _body(request))
    return json_response(entry, status=201 if created else 200)


async def void(request: web.Request) -> web.Response:
    body = await _body(request)
    return json_response(await _svc(request).void(_id(request), _id(request, "grant_id"), body))


async def balance(request: web.Request) -> web.Response:
    return json_response(await _svc(request).balance(_id(request)))


async def grants(request: web.Request) -> web.Response:
    return json_response(await _svc(request).grants(_id(request)))


async def ledger(request: web.Request) -> web.Response:
    return json_response(await _svc(request).ledger_page(_id(request), request.query))


async def export(request: web.Request) -> web.StreamResponse:
    content_type, chunks = await _svc(request).export_ledger(_id(request), request.query)
    response = web.StreamResponse(headers={"content-type": content_type})
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk.encode())
    except Exception as exc:
        # the status is sent: cut the stream (no final chunk) so a client sees it incomplete
        raise StreamCut from exc
    await response.write_eof()
    return response


async def usage(request: web.Request) -> web.Response:
    return json_response(await _svc(request).usage(_id(request), request.query))


async def generation(request: web.Request) -> web.Response:
    return json_response(await _svc(request).generation(_id(request), {"id": _id(request, "request_id")}))


async def account_webhooks(request: web.Request) -> web.Response:
    return json_response(await _svc(request).account_webhooks(_id(request)))


async def dead_letters(request: web.Request) -> web.Response:
    return json_response(await _svc(request).dead_letters(request.query))


async def replay_dead(request: web.Request) -> web.Response:
    return json_response(await _svc(request).replay_dead(await _body(request)))


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi.document(ROUTES))


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:  # load balancers stop sending; requests in flight finish
        return json_response({"status": "draining"}, status=503)
    redis = request.app[STATE].redis
    try:
        await redis.ping()
        # a Cluster node answers PING even while its cluster is down (a master failed)
        if isinstance(redis, RedisCluster) and (await redis.cluster_info()).get("cluster_state") != "ok":
            return json_response({"status": "unavailable", "redis": "cluster_down"}, status=503)
    except Exception:
        return json_response({"status": "unavailable", "redis": "down"}, status=503)
    return json_response({"status": "ready"})


GAUGES = web.AppKey("gauges", StoreGauges)


async def prometheus(request: web.Request) -> web.Response:
    await request.app[GAUGES].refresh(request.app[STATE])
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"content-type": content_type})


# -- the route table ---------------------------------------------------------------


A = "/admin/v1/accounts/{account_id}"
K = "/admin/v1/keys/{key_id}"
ROUTES = (
    Operation(
        "GET",
        "/admin/v1/accounts",
        list_accounts,
        "A page of accounts in id order (settings, tier, balance; no grants); `query` filters ids",
        query=AccountQuery,
    ),
    Operation("POST", "/admin/v1/accounts", create_account, "Create an account", 201, AccountCreate),
    Operation("GET", A, get_account, "Get an account: settings, tier, balance and grants"),
    Operation("PATCH", A, update_account, "Change an account's settings", body=AccountPatch),
    Operation("POST", f"{A}/keys", create_key, "Create an API key (the key is shown once)", 201, KeyCreate),
    Operation("GET", f"{A}/keys", list_keys, "List an account's API keys with their limits and spend"),
    Operation("GET", K, get_key, "An API key: its settings, spend limit and spend (total, day, week, month)"),
    Operation("PATCH", K, update_key, "Change an API key's settings (at once, on every instance)", body=KeyPatch),
    Operation("DELETE", K, revoke_key, "Revoke an API key"),
    Operation(
        "POST",
        f"{A}/credits",
        grant,
        "Grant credits (201; 200 for a seen idempotency_key)",
        201,
        GrantCreate,
        idempotent=True,
    ),
    Operation("POST", f"{A}/credits/{{grant_id}}/void", void, "Void a grant's remainder", body=GrantVoid),
    Operation(
        "POST",
        f"{A}/adjustments",
        adjust,
        "Settle overage debt (positive) or charge by hand (negative); 200 for a seen idempotency_key",
        201,
        AdjustmentCreate,
        idempotent=True,
    ),
    Operation("GET", f"{A}/balance", balance, "Balance, availability and live grants"),
    Operation("GET", f"{A}/grants", grants, "Every grant, live or not (expired, voided, depleted), oldest first"),
    Operation("GET", f"{A}/ledger", ledger, "A page of ledger entries, oldest first", query=LedgerQuery),
    Operation(
        "GET",
        f"{A}/ledger/export",
        export,
        "The whole ledger as CSV or JSON lines",
        query=ExportQuery,
        content_type="text/csv, application/x-ndjson",
    ),
    Operation("GET", f"{A}/usage", usage, "Usage grouped by model, UTC day and/or API key", query=UsageQuery),
    Operation(
        "GET",
        f"{A}/generations/{{request_id}}",
        generation,
        "One request (an x-request-id): status, model, usage and the cost charged",
        response=Generation,
    ),
    Operation(
        "GET",
        f"{A}/webhooks",
        account_webhooks,
        "Webhook events waiting in the outbox, the latest delivery attempts, dead letters",
    ),
    Operation("GET", "/admin/v1/webhooks/dead", dead_letters, "Dead-lettered webhook events", query=DeadLetterQuery),
    Operation(
        "POST",
        "/admin/v1/webhooks/dead/replay",
        replay_dead,
        "Send dead-lettered events again (one account's, or all)",
        body=WebhookReplay,
    ),
    Operation("GET", "/admin/v1/openapi.json", openapi_json, "This document"),
    Operation("GET", "/healthz", healthz, "Liveness"),
    Operation("GET", "/readyz", readyz, "Readiness: Redis reachable and not draining (503 otherwise)"),
    Operation("GET", "/metrics", prometheus, "Prometheus metrics", content_type="text/plain"),
)


def admin_app() -> web.Application:
    app = web.Application(middlewares=[openai_errors, require_admin_token])
    app[GAUGES] = StoreGauges()
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    pages.add_page(app, "console", "/")  # the operator console; its API calls carry the token
    return app
