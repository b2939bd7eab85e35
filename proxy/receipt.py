"""The charged cost in what the client receives: `usage.cost_usd`, a decimal string in
USD, the amount this request was charged (the same as `x-metering-cost-usd`).

- A non-streamed body gets it spliced into its `usage` object, byte for byte otherwise
  unchanged (an embeddings body can be megabytes of floats: it is not parsed twice nor
  re-encoded). Where the bytes cannot be spliced safely it is re-encoded from the parse
  the usage tap already made.
- A stream gets it in the event that carries the usage: the usage-only chunk of
  chat/completions (only for a client that asked for usage: the proxy forces it on and
  hides it otherwise) or the Responses API's final event. That event is held back until
  the settlement answers, then written with the cost; every other event is relayed as
  it arrives.
- When the upstream reported no usage, the request was charged our own count: the answer
  gets a `usage` in the endpoint's shape with those tokens, `estimated: true` and the
  cost (a stream asked for usage: a usage-only chunk before `[DONE]`).
- When the answer cannot know the charge (the settlement was journaled while Redis is
  away, or a retried settlement found it already settled) the cost is left out, as the
  `x-metering-cost-usd` header is: `GET /v1/generation` shows it once it is known.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .money import Usage, usd
from .scripts import Settlement
from .sse import Event, data_event
from .usage import StreamTap

FIELD = "cost_usd"
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*(?=\{)')
_BRACES = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}]')  # a JSON string (skipped whole) or a brace


def charged(settlement: Settlement | None) -> str | None:
    """The cost to show, or None when this answer cannot know it."""
    if settlement is None or settlement.duplicate:
        return None
    return usd(settlement.cost)


def wire_usage(endpoint: str, usage: Usage, cost: str) -> dict[str, Any]:
    """Our own count of a request, in its endpoint's usage shape, marked estimated."""
    total = usage.input_tokens + usage.output_tokens
    if endpoint == "responses":
        counts: dict[str, Any] = {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_input_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        }
    elif endpoint == "embeddings":
        counts = {"prompt_tokens": usage.input_tokens}
    else:
        counts = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens}
    return {**counts, "total_tokens": total, "estimated": True, FIELD: cost}


def body(raw: bytes, parsed: Any, cost: str, endpoint: str, estimate: Usage | None) -> bytes:
    """A non-streamed JSON body with the cost in its `usage` (`estimate`: the usage we
    charged when the upstream reported none)."""
    if not isinstance(parsed, dict):
        return raw  # not a JSON object: passed through as it came
    if estimate is not None:  # the upstream reported no usage: ours, in its place
        ours = wire_usage(endpoint, estimate, cost)
        if "usage" not in parsed and (spliced := _append_member(raw, b'"usage":' + orjson.dumps(ours))):
            return spliced
        return orjson.dumps({**parsed, "usage": ours})
    usage = parsed.get("usage")
    if not isinstance(usage, dict):
        return raw
    if FIELD not in usage and (spliced := _splice_usage(raw, cost)):
        return spliced
    return orjson.dumps({**parsed, "usage": {**usage, FIELD: cost}})


def _splice_usage(raw: bytes, cost: str) -> bytes | None:
    """`"cost_usd":"…"` appended to the body's one `usage` object; None when the body
    has more than one `"usage"` (a nested object, or the word as a value)."""
    if raw.count(b'"usage"') != 1 or not (key := _USAGE_KEY.match(raw, raw.find(b'"usage"'))):
        return None
    return _append_member(raw, f'"{FIELD}":"{cost}"'.encode(), key.end())


def _append_member(raw: bytes, member: bytes, start: int | None = None) -> bytes | None:
    """`member` added last to the JSON object opening at `start` (None: the top-level
    object, which ends the body)."""
    if start is None:
        stripped = raw.rstrip()
        end = len(stripped) - 1 if stripped.endswith(b"}") else None
    else:
        end = _closing_brace(raw, start)
    if end is None:
        return None
    at = len(raw[:end].rstrip())  # after the last member, before any whitespace
    comma = b"" if raw[at - 1 : at] == b"{" else b","
    return raw[:at] + comma + member + raw[at:]


def _closing_brace(raw: bytes, start: int) -> int | None:
    depth = 0
    for token in _BRACES.finditer(raw, start):
        if token.group() == b"{":
            depth += 1
        elif token.group() == b"}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


def stream_tail(held: list[Event], tap: StreamTap, cost: str | None, estimate: Usage | None) -> bytes:
    """The held end of a stream, the cost written into its usage event (`estimate`: the
    usage we charged when the upstream reported none)."""
    out: list[bytes] = []
    for event in held:
        if cost is not None and event is tap.usage_event and tap.usage_payload is not None:
            out.append(data_event(orjson.dumps(_with_cost(tap, tap.usage_payload, cost, estimate)), event.event))
            continue
        if cost is not None and estimate is not None and event.data == b"[DONE]" and tap.client_wants_usage:
            out.append(data_event(orjson.dumps(_usage_chunk(tap, cost, estimate))))
        out.append(event.raw)
    return b"".join(out)


def _with_cost(tap: StreamTap, payload: dict[str, Any], cost: str, estimate: Usage | None) -> dict[str, Any]:
    holder: dict[str, Any] = payload["response"] if tap.responses else payload
    usage = holder.get("usage")
    if estimate is not None:  # the upstream reported none: ours, in its place
        usage = wire_usage("responses" if tap.responses else "chat", estimate, cost)
    elif isinstance(usage, dict):
        usage = {**usage, FIELD: cost}
    holder = {**holder, "usage": usage}
    return {**payload, "response": holder} if tap.responses else holder


def _usage_chunk(tap: StreamTap, cost: str, estimate: Usage) -> dict[str, Any]:
    """The usage-only chunk OpenAI would have sent, with our count."""
    first = tap.first_chunk or {}
    base: dict[str, Any] = {name: first[name] for name in ("id", "object", "created", "model") if name in first}
    endpoint = "chat" if base.get("object") == "chat.completion.chunk" else "completions"
    return {**base, "choices": [], "usage": wire_usage(endpoint, estimate, cost)}
