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

import json
import re
from typing import Any

import orjson

from .money import Usage, usd
from .scripts import Settlement
from .sse import Event, data_event
from .usage import StreamTap

FIELD = "cost_usd"
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*(?=\{)')
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]')  # a JSON string (skipped whole) or a bracket
_UNICODE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u")  # a `\uXXXX` escape (not an escaped backslash, then `u`)
SCAN_LIMIT = 65_536  # bytes scanned for the usage object and what follows it


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
        return _dumps({**parsed, "usage": ours})
    usage = parsed.get("usage")
    if not isinstance(usage, dict):
        return raw
    if FIELD not in usage and (spliced := _splice_usage(raw, cost)):
        return spliced
    return _dumps({**parsed, "usage": {**usage, FIELD: cost}})


def _dumps(obj: Any) -> bytes:
    """orjson, else Python's json for what only it writes: a lone surrogate, in a body only
    Python's json read (usage.loads)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


def _splice_usage(raw: bytes, cost: str) -> bytes | None:
    """`"cost_usd":"…"` appended to the body's top-level `usage` object, found from the
    end (where every endpoint puts it) and checked to be a member of the top-level
    object; None when it is not (then the caller re-encodes)."""
    at = raw.rfind(b'"usage"')
    if at < 0 or _escaped(raw, at) or not (key := _USAGE_KEY.match(raw, at)):
        return None
    close = _closing(raw, key.end())  # of the usage object
    if close is None or _closing(raw, close + 1, depth=1) != len(raw.rstrip()) - 1:
        return None  # the rest of the body does not close the top-level object: nested
    if _UNICODE_ESCAPE.search(raw, close, len(raw)):  # may spell a later `usage` member, the one parsers keep
        return None
    return _insert(raw, close, f'"{FIELD}":"{cost}"'.encode())


def _append_member(raw: bytes, member: bytes) -> bytes | None:
    """`member` added last to the top-level object (whose `}` ends the body)."""
    end = len(raw.rstrip()) - 1
    return _insert(raw, end, member) if raw[end : end + 1] == b"}" else None


def _insert(raw: bytes, close: int, member: bytes) -> bytes:
    """`member` added last to the object whose `}` is at `close`."""
    at = close
    while raw[at - 1 : at] in (b" ", b"\n", b"\r", b"\t"):  # after the last member, before its whitespace
        at -= 1
    comma = b"" if raw[at - 1 : at] == b"{" else b","
    view = memoryview(raw)
    return b"".join((view[:at], comma, member, view[at:]))  # one copy of a body that may be megabytes


def _escaped(raw: bytes, at: int) -> bool:
    """The quote at `at` is escaped (inside a string): an odd run of backslashes before it."""
    run = 0
    while at - run > 0 and raw[at - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _closing(raw: bytes, start: int, depth: int = 0) -> int | None:
    """Where the nesting open at `start` (`depth` levels, or the object starting there)
    closes: the index of that `}` or `]`. None past SCAN_LIMIT bytes (the caller
    re-encodes instead: the work stays bounded whatever the body)."""
    for token in _TOKENS.finditer(raw, start, start + SCAN_LIMIT):
        mark = token.group()
        if mark in (b"{", b"["):
            depth += 1
        elif mark in (b"}", b"]"):
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
            out.append(data_event(_dumps(_with_cost(tap, tap.usage_payload, cost, estimate)), event.event))
            continue
        if cost is not None and estimate is not None and event.data.startswith(b"[DONE]") and tap.client_wants_usage:
            out.append(data_event(_dumps(_usage_chunk(tap, cost, estimate))))
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
