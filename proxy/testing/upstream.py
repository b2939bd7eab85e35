"""Fake OpenAI API speaking the real wire format, with fault injection.

Used as the upstream in tests and as a zero-cost demo upstream
(`metering-proxy demo-upstream --port 9999`). Replies are deterministic:
N visible tokens "tok0 tok1 ...", N = min(request max tokens, fault.output_tokens)
(or fault.uncapped_output_tokens when the request sends no cap).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import itertools
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

Json = dict[str, Any]
# An SSE event to write: (event name or None, JSON object or raw bytes like b"[DONE]").
Event = tuple[str | None, Json | bytes]

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
MODELS = ("gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small")
EMBED_DIMS = 8
BODY_KEY: web.RequestKey[Json] = web.RequestKey("json_body", dict)
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


@dataclass
class Fault:
    """Mutable knobs; tests flip them between requests."""

    status: int | None = None  # answer with this HTTP error status (OpenAI error body)
    error_message: str = "Injected fault from demo upstream"
    omit_usage: bool = False  # never report usage, even when asked
    output_tokens: int = 5  # visible tokens, capped by the request's max tokens
    uncapped_output_tokens: int | None = None  # visible tokens when no cap is sent (None: output_tokens)
    ignore_max_tokens: bool = False  # write output_tokens whatever cap is sent
    prompt_tokens: int = 10
    count_prompt: bool = False  # report the prompt's real tiktoken count instead of prompt_tokens
    cached_tokens: int = 0  # part of prompt_tokens, as OpenAI reports it
    audio_prompt_tokens: int = 0  # part of prompt_tokens
    reasoning_tokens: int = 0  # added on top of visible tokens in completion_tokens
    audio_completion_tokens: int = 0  # added on top of visible tokens in completion_tokens
    service_tier: str | None = None  # reported as the tier that served the request
    cut_after_chunks: int | None = None  # stream: drop the connection after this many data events
    # stream: after this many events, half of the next one, then a clean end of the body
    # (a server that closed mid-event; clients discard the unfinished event)
    end_mid_event_after: int | None = None
    # a non-streamed chat reply whose text holds half an emoji, a lone UTF-16 surrogate
    # escape (`\ud83d`): JSON that Python's json (openai-python) reads but orjson refuses
    lone_surrogate: bool = False
    chunk_delay_s: float = 0.0  # sleep between stream events
    hold_after_chunks: int | None = None  # stream: wait for `DemoUpstream.release` after this many events
    delay_before_headers_s: float = 0.0  # sleep before answering at all
    responses_final_event: str = "response.completed"  # or response.incomplete / response.failed
    stream_error_event: bool = False  # emit an error event halfway through the stream
    echo_key: bool = False  # a careless upstream: the reply text quotes the key it was sent
    # Knobs that make this upstream bill like the real OpenAI where the defaults simplify
    # (tests/test_attacks.py): each says what OpenAI does and how sure we are.
    # OpenAI returns `n` choices (chat, completions; `best_of` generated for completions)
    # and, for a completions `prompt` that is a batch (an array of strings or of token
    # arrays), that many choices PER PROMPT, all billed in completion_tokens (sure: the
    # API reference of `prompt`, and the legacy batching guide).
    real_choices: bool = False
    # OpenAI bills each image input in tokens at the model's own rates (docs, "Images and
    # vision" > "Calculating costs"): tile models base + per 512-px tile, at most 8 tiles
    # for a high-detail image (a 768x2048 image), the base alone for `detail: low`;
    # gpt-4o-mini's rates are ~33x gpt-4o's (2833 + 5667 per tile), so that an image costs
    # the same dollars on both (sure); 32-px patch models (gpt-4.1-mini, o4-mini, ...) bill
    # up to 1536 patches x a multiplier (1.62-2.46). Added on top of the prompt count.
    bill_images: bool = False
    # The max-tokens fields this upstream honours (None: all it knows). OpenAI-compatible
    # providers that predate `max_completion_tokens` read only `max_tokens` and write past
    # a cap sent in a field they ignore (fairly sure: why `max_tokens_field` exists).
    max_fields_read: tuple[str, ...] | None = None
    # Predicted Outputs: rejected prediction tokens "are still counted in the total
    # completion tokens for purposes of billing" (sure: the usage reference). Worst case:
    # the whole prediction is rejected, billed beyond the visible output the cap allows.
    bill_rejected_prediction: bool = False
    # Responses `background: true` (not streamed): OpenAI answers at once with `status:
    # queued`, no output and `usage: null`, then generates (and bills) up to the output cap
    # in the background, where only GET /v1/responses/{id} shows it (sure: the background
    # mode guide). Bills land in `deferred_usage`.
    honour_background: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]  # case-insensitive: headers["authorization"] works too
    body: Any  # parsed JSON, or None when absent/invalid


@dataclass
class _Reply:
    """What one generation produced, shared by all endpoint formats."""

    model: str
    tokens: list[str]  # text deltas; "".join(tokens) is the full text
    finish_reason: str
    usage: Json | None  # chat-style usage, None when omitted
    copies: int = 1  # choices returned (fault.real_choices): n, per prompt of a batch

    @property
    def text(self) -> str:
        return "".join(self.tokens)


_ACTIVE: contextvars.ContextVar[Fault | None] = contextvars.ContextVar("demo_upstream_fault", default=None)


class _Cut(Exception):
    """Raised by the SSE writer once fault.cut_after_chunks events went out."""


class _EndMidEvent(Exception):
    """Raised by the SSE writer once fault.end_mid_event_after events went out."""


class DemoUpstream:
    def __init__(self) -> None:
        self.fault = Fault()
        self.requests: list[RecordedRequest] = []
        self.stream_chunks_sent = 0
        self.chunks_by_request: dict[str, int] = {}  # the proxy's x-request-id -> data events sent
        self.deferred_usage: list[Json] = []  # what background responses bill once they finish
        self.client_disconnected = False
        self.stream_closed = asyncio.Event()  # set whenever a stream ends, for any reason
        self.holding = asyncio.Event()  # a stream waits at `hold_after_chunks`
        self.release = asyncio.Event()  # set by a test: held streams go on
        # per-request faults (concurrent traffic): a request's own Fault, else `fault`
        self.fault_for: Callable[[RecordedRequest], Fault | None] | None = None
        self.served: list[str] = []  # x-request-ids of 2xx answers started on an open connection
        self._ids = itertools.count(1)
        self._streaming: dict[int, web.Request] = {}  # streams in flight (by id: requests are unhashable)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def reset(self) -> None:
        """A clean upstream for the next test: the last test's streams end now (each a
        broken stream to its proxy) and record nothing more here."""
        for request in self._streaming.values():
            if request.transport is not None:
                request.transport.abort()
        self._streaming.clear()
        self.release.set()  # wakes streams held by the last test: they find themselves ended
        self.fault = Fault()
        self.holding, self.release = asyncio.Event(), asyncio.Event()
        self.requests.clear()
        self.stream_chunks_sent = 0
        self.chunks_by_request.clear()
        self.deferred_usage.clear()
        self.client_disconnected = False
        self.stream_closed.clear()
        self.fault_for = None
        self.served.clear()

    @property
    def active(self) -> Fault:
        """The fault of the request being answered (`fault_for`), else the global one."""
        return _ACTIVE.get() or self.fault

    def _mark_served(self, request: web.Request) -> None:
        """A 2xx answer starts; one the proxy gave up on (closed) was not served."""
        if request.transport is not None and not request.transport.is_closing():
            self.served.append(request.headers.get("x-request-id", ""))

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app[UPSTREAM_KEY] = self
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]  # resolves port=0
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Record first so tests see the request even when a fault answers it.
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        request[BODY_KEY] = body if isinstance(body, dict) else {}
        headers = CIMultiDict(request.headers)
        record = RecordedRequest(request.method, request.path, headers, body)
        self.requests.append(record)
        token = _ACTIVE.set(self.fault_for(record) if self.fault_for is not None else None)
        try:
            response = await self._answer(request, handler, body)
        finally:
            _ACTIVE.reset(token)
        if response.status < 300 and not response.prepared:  # streams are marked as they start
            self._mark_served(request)
        return response

    async def _answer(self, request: web.Request, handler: Handler, body: Any) -> web.StreamResponse:
        if self.active.delay_before_headers_s:
            await asyncio.sleep(self.active.delay_before_headers_s)
        if self.active.status is not None:
            return _error(self.active.status, self.active.error_message)
        if request.method == "POST" and handler != self._not_found and not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        return await handler(request)

    def _reply(self, body: Json, *max_fields: str) -> _Reply:
        f = self.active
        read = [m for m in max_fields if f.max_fields_read is None or m in f.max_fields_read]
        caps = [body[field] for field in read if isinstance(body.get(field), int)]
        limit = None if f.ignore_max_tokens or not caps else min(caps)
        wanted = f.output_tokens if caps or f.uncapped_output_tokens is None else f.uncapped_output_tokens
        n = wanted if limit is None else max(0, min(limit, wanted))
        finish = "length" if limit is not None and limit < wanted else "stop"
        tokens = [f"tok{i}" if i == 0 else f" tok{i}" for i in range(n)]
        if self.active.echo_key and tokens and self.requests:
            tokens[0] = f"your key is {self.requests[-1].headers.get('authorization', '')} " + tokens[0]
        prompt = real_prompt_tokens(body) if f.count_prompt else f.prompt_tokens
        if f.bill_images:
            prompt += image_tokens(body)
        rejected = prediction_tokens(body) if f.bill_rejected_prediction else 0
        copies = choice_count(body) if f.real_choices else 1
        usage = self._usage(prompt, n, rejected, copies)
        return _Reply(str(body.get("model", "demo-model")), tokens, finish, usage, copies)

    def _usage(self, prompt: int, visible: int, rejected: int = 0, copies: int = 1) -> Json | None:
        if self.active.omit_usage:
            return None
        f = self.active
        completion = (visible + f.reasoning_tokens + f.audio_completion_tokens + rejected) * copies
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": f.cached_tokens, "audio_tokens": f.audio_prompt_tokens},
            "completion_tokens_details": {
                "reasoning_tokens": f.reasoning_tokens,
                "audio_tokens": f.audio_completion_tokens,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": rejected * copies,
            },
        }

    def _tier(self) -> Json:
        return {"service_tier": self.active.service_tier} if self.active.service_tier else {}

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    async def _stream(self, request: web.Request, events: Iterator[Event]) -> web.StreamResponse:
        self.stream_chunks_sent, self.client_disconnected = 0, False  # of the latest stream
        self.stream_closed.clear()
        resp = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await resp.prepare(request)
        except ConnectionError:  # the client gave up before we answered: nothing served
            self.client_disconnected = True
            return resp
        self._mark_served(request)
        request_id = request.headers.get("x-request-id", "")
        sent = 0  # this stream's own count: concurrent streams each cut at their own
        self._streaming[id(request)] = request
        try:
            for name, data in events:
                await self._send(resp, name, data, sent)
                if id(request) not in self._streaming:  # ended by `reset` while it waited
                    return resp  # the last test's: it must not touch this test's records
                sent = self.stream_chunks_sent = sent + 1
                self.chunks_by_request[request_id] = self.chunks_by_request.get(request_id, 0) + 1
            await resp.write_eof()
        except _EndMidEvent:
            await resp.write_eof()
        except _Cut:
            # Close (not abort) so already-written bytes are flushed first, but the
            # chunked body never terminates: the client sees an incomplete read.
            if request.transport is not None:
                request.transport.close()
        except (ConnectionError, asyncio.CancelledError) as exc:  # client went away mid-stream
            if id(request) in self._streaming:
                self.client_disconnected = True
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if self._streaming.pop(id(request), None) is not None:
                self.stream_closed.set()
        return resp

    async def _send(self, resp: web.StreamResponse, name: str | None, data: Json | bytes, sent: int) -> None:
        f = self.active
        if f.cut_after_chunks is not None and sent >= f.cut_after_chunks:
            raise _Cut
        if f.chunk_delay_s and sent:
            await asyncio.sleep(f.chunk_delay_s)
        if f.hold_after_chunks is not None and sent == f.hold_after_chunks:
            self.holding.set()
            await self.release.wait()
        payload = data if isinstance(data, bytes) else orjson.dumps(data)
        head = f"event: {name}\n".encode() if name else b""
        frame = head + b"data: " + payload + b"\n\n"
        if f.end_mid_event_after is not None and sent >= f.end_mid_event_after:
            await resp.write(frame[: len(frame) // 2])
            raise _EndMidEvent
        await resp.write(frame)

    def _mid_stream_error(self, i: int, n: int) -> bool:
        return self.active.stream_error_event and i == n // 2

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY_KEY]
        r = self._reply(body, "max_completion_tokens", "max_tokens")
        base: Json = {
            "id": self._id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": r.model,
            **self._tier(),
        }
        if body.get("stream"):
            choices: list[Json] = [{"delta": {"role": "assistant", "content": "", "refusal": None}}]
            choices += [{"delta": {"content": tok}} for tok in r.tokens]
            choices.append({"delta": {}, "finish_reason": r.finish_reason})
            base["object"] = "chat.completion.chunk"
            return await self._stream(request, self._chunk_events(body, r, base, choices))
        message: Json = {"role": "assistant", "content": r.text, "refusal": None, "annotations": []}
        choice = {"message": message, "logprobs": None, "finish_reason": r.finish_reason}
        choices = [{"index": i, **choice} for i in range(r.copies)]
        reply = _json(_with_usage({**base, "choices": choices}, r.usage))
        if self.active.lone_surrogate:
            reply.body = bytes(reply.body).replace(b'"content":"', b'"content":"\\ud83d')  # type: ignore[arg-type]
        return reply

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY_KEY]
        r = self._reply(body, "max_tokens")
        base: Json = {
            "id": self._id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": r.model,
            **self._tier(),
        }
        if body.get("stream"):
            choices: list[Json] = [{"text": tok} for tok in r.tokens]
            choices.append({"text": "", "finish_reason": r.finish_reason})
            return await self._stream(request, self._chunk_events(body, r, base, choices))
        choice = {"text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        return _json(_with_usage({**base, "choices": [{"index": i, **choice} for i in range(r.copies)]}, r.usage))

    def _chunk_events(self, body: Json, r: _Reply, base: Json, choices: list[Json]) -> Iterator[Event]:
        """One `data:` chunk per choice delta, then the optional usage chunk and [DONE]."""
        opts = body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        for i, choice in enumerate(choices):
            if self._mid_stream_error(i, len(choices)):
                yield None, _error_body(500, "Injected mid-stream error")  # OpenAI style: no [DONE]
                return
            chunk = {**base, "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **choice}]}
            # With include_usage OpenAI puts "usage": null on every regular chunk.
            yield None, ({**chunk, "usage": None} if with_usage else chunk)
        if with_usage and r.usage is not None:
            yield None, {**base, "choices": [], "usage": r.usage}
        yield None, b"[DONE]"

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body: Json = request[BODY_KEY]
        r = self._reply(body, "max_output_tokens")
        rid, mid, created = self._id("resp_"), self._id("msg_"), int(time.time())
        final = self._response_obj(r, rid, mid, created)
        if self.active.honour_background and body.get("background") is True and not body.get("stream"):
            self.deferred_usage.append(final["usage"])  # billed when the background job is done
            return _json({**final, "status": "queued", "output": [], "usage": None, "background": True})
        if body.get("stream"):
            return await self._stream(request, self._response_events(r, final, mid))
        return _json(final)

    def _response_obj(self, r: _Reply, rid: str, mid: str, created: int) -> Json:
        """The final Response object; its status follows fault.responses_final_event."""
        status = self.active.responses_final_event.removeprefix("response.")
        failed = status == "failed"
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": r.model,
            "error": {"code": "server_error", "message": "Injected failure"} if failed else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "output": [] if failed else [_message_item(mid, r.text, status)],  # status: completed|incomplete
            "usage": None if failed else _responses_usage(r.usage),
            "instructions": None,
            "metadata": {},
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "reasoning": {"effort": None, "summary": None},
            "truncation": "disabled",
            **self._tier(),
        }

    def _response_events(self, r: _Reply, final: Json, mid: str) -> Iterator[Event]:
        seq = itertools.count()
        start = {
            **final,
            "status": "in_progress",
            "output": [],
            "usage": None,
            "error": None,
            "incomplete_details": None,
        }
        loc = {"item_id": mid, "output_index": 0, "content_index": 0}
        part: Json = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

        def ev(kind: str, **fields: Any) -> Event:
            return kind, {"type": kind, "sequence_number": next(seq), **fields}

        yield ev("response.created", response=start)
        yield ev("response.in_progress", response=start)
        yield ev("response.output_item.added", output_index=0, item=_message_item(mid, "", "in_progress"))
        yield ev("response.content_part.added", **loc, part=part)
        for i, tok in enumerate(r.tokens):
            if self._mid_stream_error(i, len(r.tokens)):
                yield ev("error", code="server_error", message="Injected mid-stream error", param=None)
                return
            yield ev("response.output_text.delta", **loc, delta=tok, logprobs=[])
        yield ev("response.output_text.done", **loc, text=r.text, logprobs=[])
        yield ev("response.content_part.done", **loc, part={**part, "text": r.text})
        done_item = _message_item(mid, r.text, "completed" if final["status"] == "completed" else "incomplete")
        yield ev("response.output_item.done", output_index=0, item=done_item)
        yield ev(self.active.responses_final_event, response=final)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body: Json = request[BODY_KEY]
        items = _embedding_inputs(body.get("input"))
        if not items:
            return _error(400, "'input' must be a non-empty string, array of strings or token arrays.")
        as_b64 = body.get("encoding_format") == "base64"  # the SDK asks for base64 by default
        vectors = [_vector(i, as_b64) for i in range(len(items))]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        out: Json = {"object": "list", "data": data, "model": str(body.get("model", "demo-embedding"))}
        if not self.active.omit_usage:
            p = self.active.prompt_tokens
            out["usage"] = {"prompt_tokens": p, "total_tokens": p}
        return _json(out)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "demo"} for m in MODELS]
        return _json({"object": "list", "data": data})

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return _error(404, f"Invalid URL ({request.method} {request.path})")


UPSTREAM_KEY = web.AppKey("demo_upstream", DemoUpstream)


def _json(obj: Json, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error_body(status: int, message: str) -> Json:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": ERROR_CODES.get(status)}}


def _error(status: int, message: str) -> web.Response:
    return _json(_error_body(status, message), status)


def _with_usage(obj: Json, usage: Json | None) -> Json:
    return {**obj, "usage": usage} if usage is not None else obj


def _responses_usage(u: Json | None) -> Json | None:
    if u is None:
        return None
    cached = {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"], "cache_write_tokens": 0}
    reasoning = {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]}
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": cached,
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": reasoning,
        "total_tokens": u["total_tokens"],
    }


def real_prompt_tokens(body: Json) -> int:
    """The prompt's tiktoken count (o200k_base), as an upstream would bill it: every
    message's text counted exactly, plus 4 tokens of template per message and 3 of
    reply priming."""
    from .. import tokens  # the proxy's offline tiktoken; imported only when asked for

    prompt = body.get("messages", body.get("input", body.get("prompt")))
    messages = [{"content": prompt}] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        texts += [p if isinstance(p, str) else p.get("text") for p in parts if isinstance(p, (str, dict))]
    enc = tokens.get_encoding("o200k_base")
    counted = sum(len(enc.encode_ordinary(t)) for t in texts if isinstance(t, str))
    return counted + 4 * len(messages) + 3


# (base, per tile) image tokens of tile-billed models, longest prefix first; see Fault.bill_images
IMAGE_RATES = (("gpt-4o-mini", 2833, 5667), ("gpt-4o", 85, 170), ("o1", 75, 150), ("o3", 75, 150))
MAX_TILES = 8  # a high-detail image scaled to fit 2048x2048, then its short side to 768 px: 2 x 4 tiles


def image_tokens(body: Json) -> int:
    """The image inputs of a chat or Responses body at OpenAI's rates for its model, each
    at the largest size its detail allows (the URL or base64 data is not decoded)."""
    model = str(body.get("model", ""))
    base, tile = next(((b, t) for prefix, b, t in IMAGE_RATES if model.startswith(prefix)), (85, 170))
    total = 0
    for message in body.get("messages") or body.get("input") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                spec = part.get("image_url")
                detail = spec.get("detail") if isinstance(spec, dict) else part.get("detail")
                total += base if detail == "low" else base + tile * MAX_TILES
    return total


def prediction_tokens(body: Json) -> int:
    """A chat `prediction`'s tokens (o200k_base): what a wholly rejected one bills."""
    from .. import tokens

    prediction = body.get("prediction")
    content = prediction.get("content") if isinstance(prediction, dict) else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return len(tokens.get_encoding("o200k_base").encode_ordinary(content)) if isinstance(content, str) else 0


def choice_count(body: Json) -> int:
    """Choices OpenAI generates and bills: max(n, best_of), per prompt of a completions batch."""
    per_prompt = max([v for v in (body.get("n"), body.get("best_of")) if isinstance(v, int)] + [1])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return per_prompt * len(prompt)
    return per_prompt


def _message_item(mid: str, text: str, status: str) -> Json:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else []
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}


def _embedding_inputs(value: Any) -> list[Any]:
    # A string or a flat token list is ONE input; a list of those is many.
    is_token_list = isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or is_token_list:
        return [value]
    return list(value) if isinstance(value, list) else []


def _vector(index: int, as_b64: bool) -> list[float] | str:
    # Multiples of 1/8 survive the float32 base64 round trip exactly.
    floats = [((index + 1) * (d + 1) % 8) / 8 for d in range(EMBED_DIMS)]
    if as_b64:
        return base64.b64encode(struct.pack(f"<{EMBED_DIMS}f", *floats)).decode()
    return floats


def make_app() -> web.Application:
    """Standalone app backed by a fresh DemoUpstream (reachable via app[UPSTREAM_KEY])."""
    return DemoUpstream().make_app()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metering-proxy demo-upstream", description="Run a fake OpenAI-compatible API for demos and tests."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args(argv)
    print(f"Demo upstream listening on http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
