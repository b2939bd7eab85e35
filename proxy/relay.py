"""The metered request path, top to bottom:

    authenticate -> parse -> admit (one Lua call) -> forward -> tap usage
                 -> settle (one Lua call, in `finally`) -> respond

A request that was admitted is settled exactly once whatever happens after: upstream
errors release the reservation at no charge; a client that vanishes mid-stream is
charged for what was streamed; a handler cancelled while settling hands its settlement
to a task that finishes it (meter.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from . import errors, intake, logs, metrics, receipt
from .meter import Meter
from .money import usd
from .scripts import Settlement
from .sse import Event, SSEParser, data_event
from .state import STATE, State
from .upstream import Scrubber, UpstreamResponse, passthrough_headers
from .usage import StreamTap, loads, output_of_body, usage_from_body

BODY_TIMEOUT_S = 60
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
STREAM_INTERRUPTED = orjson.dumps(
    {
        "error": {
            "message": "The upstream stream ended unexpectedly.",
            "type": "upstream_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }
)


@dataclasses.dataclass
class Known:
    """What a request showed of itself before it was refused: its log line says who
    (account, key) and what (the model asked for) as far as admission got."""

    account_id: str | None = None
    key_id: str | None = None
    model: str | None = None

    def fields(self) -> dict[str, str]:
        shown = {"account_id": self.account_id, "key_id": self.key_id, "model": self.model}
        return {name: value[:MAX_LOGGED_MODEL] for name, value in shown.items() if value is not None}


MAX_LOGGED_MODEL = 200  # a client's string, logged as given but not without end


def request_id() -> str:
    return "req_" + secrets.token_hex(12)


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise errors.BodyTooLarge(f"Request body too large: the limit is {limit} bytes.")
    body = bytearray()
    try:
        if request.content.is_eof():  # it came with the headers (most do): no timer, no chunk loop
            whole = request.content.read_nowait()
            if len(whole) > limit:  # decompressed
                raise errors.BodyTooLarge(f"Request body too large: the limit is {limit} bytes.")
            return whole
        async with asyncio.timeout(BODY_TIMEOUT_S):  # a trickled body must not hold a connection forever
            async for chunk in request.content.iter_chunked(65536):
                body += chunk
                if len(body) > limit:
                    raise errors.BodyTooLarge(f"Request body too large: the limit is {limit} bytes.")
    except TimeoutError:
        raise errors.RequestTimeout(f"The request body did not arrive within {BODY_TIMEOUT_S} s.") from None
    except RequestPayloadError as exc:  # e.g. a body that claims gzip and is not
        raise errors.InvalidRequest(f"The request body could not be decoded: {exc}.") from None
    except CLIENT_GONE:
        raise errors.ClientGone("The client closed the connection while sending its request.") from None
    return bytes(body)


def error_response(err: errors.ProxyError, req_id: str) -> web.Response:
    headers = {**err.headers, "x-request-id": req_id}
    return web.Response(status=err.status, body=err.to_body(), content_type="application/json", headers=headers)


async def metered(request: web.Request, endpoint: str) -> web.StreamResponse:
    state = request.app[STATE]
    req_id = request_id()
    started = time.perf_counter()
    known = Known()
    try:
        meter = await admit(state, request, endpoint, req_id, known)
        model = meter.client.model
    except errors.ProxyError as err:
        label = metrics.model_label(known.model, state.config.models)
        metrics.child(metrics.REJECTIONS, type(err).__name__ if err.code is None else err.code, label).inc()
        response: web.StreamResponse = error_response(err, req_id)
        if isinstance(err, errors.BodyTooLarge):
            response.force_close()  # the unread rest of the body makes the connection unusable
        after_response(access_log, request, req_id, label, response.status, started, None, reason=err.code, known=known)
        return response
    status = 499  # what the log says if the handler is cancelled mid-flight
    try:
        response = await forward(state, request, meter)
        status = response.status
        return response
    except Exception:
        status, meter.outcome = 500, "proxy error"  # the middleware answers 500; the log says so
        raise
    except asyncio.CancelledError:  # a shutdown past its grace: charged for what was relayed
        meter.outcome = cut_off(meter)
        raise
    finally:
        settlement = await meter.settle()
        after_response(access_log, request, req_id, model, status, started, meter, settlement=settlement)


def cut_off(meter: Meter) -> str:
    """The outcome of a request a shutdown cancelled: cut while its settlement was under
    way (finished by a task of its own: meter.py), or at any other point (even writing
    the end of a stream it had settled)."""
    settling = meter.settled is not None and not meter.settled.done()
    return "cut off by shutdown" + (" while settling (a task finishes it)" if settling else "")


async def admit(state: State, request: web.Request, endpoint: str, req_id: str, known: Known) -> Meter:
    key = await state.keys.authenticate(request.headers.get("Authorization"))
    known.account_id, known.key_id = key.account_id, key.key_id
    client = intake.parse(endpoint, await read_body(request, state.config.server.max_body_bytes))
    known.model = client.model
    route = state.catalog.route(client.model)
    if not key.allows(client.model):  # a record from before key settings; admission checks the rest
        raise errors.model_not_allowed(client.model)
    reservation = route.reservation(client)
    # built before admitting: an unsendable body is a 400
    body = client.upstream_body(route.upstream_model, reservation.rewrite)
    admission = await state.ledger.admit(
        key.account_id,
        key.key_id,
        client.model,
        req_id,
        prompt_cost=reservation.prompt_cost,
        output_cost=reservation.output_cost,
        output_pico=reservation.output_pico,
        prompt_tokens=reservation.reserved_prompt_tokens,
        max_output_tokens=reservation.reserved_output_tokens,
        choices=client.choices,
    )
    metrics.RESERVATIONS_OPEN.inc()
    cap = reservation.cap
    if admission.downgrade_to:
        route = state.catalog.route(admission.downgrade_to)
        cap = route.output_cap(client)
        body = client.upstream_body(route.upstream_model, route.rewrite(client, cap))
    if admission.clamp_tokens:
        cap = admission.clamp_tokens
        body = client.upstream_body(route.upstream_model, dataclasses.replace(reservation.rewrite, cap=cap))
    meter = Meter(state, key.account_id, key.key_id, req_id, route, client, admission, reservation.prompt_tokens, body)
    meter.prompt_exact = reservation.prompt_exact
    meter.output_bound = (cap or 0) * client.choices
    state.inflight[req_id] = meter  # checkpointed while it runs (app.py)
    return meter


def our_headers(meter: Meter) -> dict[str, str]:
    headers = {"x-request-id": meter.request_id, **meter.admission.rate.headers()}
    if meter.admission.clamp_tokens:
        headers["x-metering-clamped-max-tokens"] = str(meter.admission.clamp_tokens)
    if meter.downgraded:
        headers["x-metering-downgraded-from"] = meter.client.model
    return headers


async def forward(state: State, request: web.Request, meter: Meter) -> web.StreamResponse:
    route, client = meter.route, meter.client
    path = intake.ENDPOINTS[client.endpoint][0].removeprefix("/v1")
    upstream_started = time.perf_counter()
    try:
        upstream = await state.upstream.post(route.upstream, path, meter.body, meter.request_id)
    except errors.ProxyError as err:
        meter.outcome = f"upstream failed ({err.code})"
        return error_response(err, meter.request_id)
    async with upstream:
        if upstream.status >= 400:
            return await pass_error(upstream, meter)
        meter.answered = True
        if client.stream and upstream.content_type == "text/event-stream":
            return await relay_stream(request, upstream, meter, upstream_started)
        return await relay_body(upstream, meter, upstream_started)


async def pass_error(upstream: UpstreamResponse, meter: Meter) -> web.Response:
    """Upstream errors pass through as they came, and cost nothing."""
    meter.outcome = f"upstream status {upstream.status}"
    try:
        body = meter.state.upstream.scrub.error(await upstream.read())
    except errors.UpstreamBroken:
        body = errors.UpstreamUnavailable("The upstream failed while answering.").to_body()
    headers = {**passthrough_headers(upstream.headers), **our_headers(meter)}
    return web.Response(status=upstream.status, body=body, headers=headers)


async def relay_body(upstream: UpstreamResponse, meter: Meter, started: float) -> web.Response:
    try:
        body = await upstream.read()
    except errors.UpstreamBroken:
        meter.outcome = "upstream broke before its body ended"
        err = errors.UpstreamUnavailable("The upstream failed while answering; nothing was charged.")
        return error_response(err, meter.request_id)
    meter.timing["upstream_ms"] = observe(metrics.UPSTREAM_SECONDS, meter, started)
    parsed = loads(body)  # as openai-python will read it
    usage = usage_from_body(parsed)
    meter.charge(usage, None if usage is not None else output_of_body(parsed))
    settlement = await meter.settle()
    headers = {**passthrough_headers(upstream.headers), **our_headers(meter)}
    if settlement is not None and (cost := receipt.charged(settlement)) is not None:  # a retried settle knows none
        headers["x-metering-cost-usd"] = cost
        headers["x-metering-balance-usd"] = usd(settlement.balance)
        body = receipt.body(body, parsed, cost, meter.client.endpoint, meter.usage if meter.estimated else None)
    return web.Response(status=upstream.status, body=meter.state.upstream.scrub(body), headers=headers)


async def relay_stream(
    request: web.Request, upstream: UpstreamResponse, meter: Meter, started: float
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream.status,
        headers={
            **passthrough_headers(upstream.headers),
            **our_headers(meter),
            "cache-control": "no-cache",
            "x-accel-buffering": "no",
        },
    )
    try:
        await response.prepare(request)
    except CLIENT_GONE:  # gone before our headers: the upstream has already started work
        upstream.close()
        meter.outcome = "client disconnected before the response started"
        meter.charge(None)  # the prompt, estimated
        return response
    parser, scrub = SSEParser(), meter.state.upstream.scrub
    tap = meter.tap = StreamTap(meter.client.endpoint, meter.client.wants_usage)
    held: list[Event] = []  # the stream's end: sent once settled (read-your-writes), with the cost
    first = True
    broken = gone = False
    try:
        while (chunk := await upstream.next_chunk()) is not None:
            if first:
                meter.timing["ttft_ms"] = observe(metrics.TTFT_SECONDS, meter, started)
                first = False
            out = forwardable(parser.feed(chunk), tap, scrub, held)
            if out and not await write(response, out):
                gone = True
                break
            if tap.finished:
                break
    except errors.UpstreamBroken:
        broken = True
    finally:
        if gone or broken:
            upstream.close()  # stop the upstream generating what nobody will pay for
        meter.timing["upstream_ms"] = observe(metrics.UPSTREAM_SECONDS, meter, started)
    if not (gone or broken or tap.finished):  # upstream EOF: a last event may lack its blank line
        # an unfinished last event is dropped: clients discard it (WHATWG), and the error
        # event written after it would run into its bytes (openai-python fails to parse)
        events, _ = parser.finish()
        out = forwardable(events, tap, scrub, held)
        if not tap.finished:  # no end after all: what was held goes out as it came
            out, held = out + scrub(b"".join(e.raw for e in held)), []
        gone = bool(out) and not await write(response, out)
    if not (tap.finished or gone):
        broken = True
        lost_end, held = scrub(b"".join(e.raw for e in held)), []
        gone = not await write(response, lost_end + data_event(STREAM_INTERRUPTED))
    meter.outcome = "client disconnected" if gone else ("upstream stream broken" if broken else "ok")
    meter.charge(tap.usage, tap.output)
    if not gone:
        settlement = await meter.settle()  # before the client sees the end: its next balance read includes it
        estimate = meter.usage if meter.estimated else None
        tail = scrub(receipt.stream_tail(held, tap, receipt.charged(settlement), estimate))
        if not tail or await write(response, tail):
            with contextlib.suppress(*CLIENT_GONE):
                await response.write_eof()
    return response


def forwardable(events: list[Event], tap: StreamTap, scrub: Scrubber, held: list[Event]) -> bytes:
    """Bytes to send now; the stream's end (its usage event and what follows) goes to
    `held`, sent once settled. Whole events, so `scrub` sees every secret whole however
    the network split it."""
    if len(events) == 1 and not held:  # a model's stream: an event per read
        event = events[0]
        if not tap.forward(event):
            return b""
        if tap.finished or event is tap.usage_event:
            held.append(event)
            return b""
        return scrub(event.raw)
    now: list[bytes] = []
    for event in events:
        if not tap.forward(event):
            continue
        if tap.finished or event is tap.usage_event or (held and not event.data):
            held.append(event)
            continue
        if held:  # a usage chunk that was not the end after all: it goes as it came
            now += [e.raw for e in held]
            held.clear()
        now.append(event.raw)
    return scrub(b"".join(now))


def observe(histogram: Any, meter: Meter, started: float) -> float:
    """Record a latency per model; returns it in ms for the access log."""
    elapsed = time.perf_counter() - started
    metrics.child(histogram, meter.client.model).observe(elapsed)
    return round(elapsed * 1000, 2)


async def write(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when the client has gone away."""
    try:
        await response.write(data)
    except CLIENT_GONE:
        return False
    return True


def after_response(work: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run `work` (the log line, the metrics) once the handler's answer has been written:
    aiohttp writes a returned response before this task yields, so nothing that can
    wait delays the client."""
    asyncio.get_running_loop().call_soon(functools.partial(work, *args, **kwargs))


def access_log(
    request: web.Request,
    req_id: str,
    model: str,
    status: int,
    started: float,
    meter: Meter | None,
    *,
    reason: str | None = None,
    settlement: Settlement | None = None,
    known: Known | None = None,
) -> None:
    """One line per request, and the request metrics. Never a key or a secret."""
    elapsed = time.perf_counter() - started
    route = request.path
    metrics.child(metrics.REQUESTS, route, model, str(status)).inc()
    metrics.child(metrics.REQUEST_SECONDS, route, model).observe(elapsed)
    fields: dict[str, Any] = {
        "request_id": req_id,
        "route": route,
        "model": model,
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
    }
    if reason:
        fields["reason"] = reason
    if known is not None:
        fields.update(known.fields())
    if meter is not None:
        fields.update(account_id=meter.account_id, key_id=meter.key_id, outcome=meter.outcome, **meter.timing)
        if "upstream_ms" in meter.timing:  # forwarded: what the proxy itself added
            overhead = max(0.0, elapsed - meter.timing["upstream_ms"] / 1000)
            metrics.child(metrics.OVERHEAD_SECONDS, route).observe(overhead)
        if meter.usage is not None:
            fields.update(meter.usage.as_dict(), estimated=meter.estimated)
            record_usage(meter)
        if settlement is not None and settlement.duplicate:  # an earlier attempt charged it; its reply was lost
            fields["duplicate"] = True
        elif settlement is not None:
            fields["cost_usd"] = usd(settlement.cost)
            # metrics are not money: a float is fine here
            metrics.child(metrics.SPEND_USD, meter.route.model).inc(settlement.cost / 1_000_000)
            if meter.state.config.metrics.per_account_labels:  # high cardinality: opt-in
                metrics.child(metrics.ACCOUNT_SPEND_USD, meter.account_id).inc(settlement.cost / 1_000_000)
    logs.access(fields)


def record_usage(meter: Meter) -> None:
    usage, model = meter.usage, meter.route.model
    assert usage is not None
    for kind, count in (
        ("input", usage.input_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("output", usage.output_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if count:
            metrics.child(metrics.TOKENS, model, kind).inc(count)
    if meter.estimated:
        metrics.child(metrics.USAGE_ESTIMATED, model).inc()
