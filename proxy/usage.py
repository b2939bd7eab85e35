"""Reading real token usage from upstream responses, streamed or not.

`usage_from` understands both shapes OpenAI uses: chat/completions/embeddings
(`prompt_tokens`, `completion_tokens`, `*_details`) and the Responses API
(`input_tokens`, `output_tokens`, `*_details`). Input includes cached and audio
tokens and output includes reasoning and audio tokens, as OpenAI reports them. The
service tier the upstream served a request at sits beside the usage: `service_tier`
in a chat/completions body or chunk, `response.service_tier` in the Responses API.

`StreamTap` watches a relayed stream event by event: it keeps the usage when it
comes, collects output text cheaply for an estimate when it never does, and hides
the usage-only chunk from a client that did not ask for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from .money import Usage
from .sse import Event
from .tokens import OutputCounter


def _count(value: Any) -> int | None:
    """A token count as openai-python reads it (pydantic's lax int: 10, 10.0, "10"; a
    fraction rounded up, never below it); None when it is no count."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) <= 20:
        value = int(value)
    if isinstance(value, float) and math.isfinite(value) and abs(value) < 2**63:
        value = math.ceil(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


def _int(value: Any) -> int:
    return _count(value) or 0


def _detail(details: Any, name: str, limit: int) -> int:
    return min(_int(details.get(name)), limit) if isinstance(details, dict) else 0


def service_tier_of(obj: Any) -> str | None:
    tier = obj.get("service_tier") if isinstance(obj, dict) else None
    return tier if isinstance(tier, str) and tier else None


def usage_from(raw: Any, service_tier: str | None = None) -> Usage | None:
    """The usage reported, None when there is none: no input or output count it can read
    (`{}` charged as zero tokens would be a free request; it is estimated instead)."""
    if not isinstance(raw, dict):
        return None
    names = ("input_tokens", "output_tokens") if "input_tokens" in raw or "output_tokens" in raw else None
    if names:
        inp, out = raw.get("input_tokens_details"), raw.get("output_tokens_details")
    else:
        names = ("prompt_tokens", "completion_tokens")
        inp, out = raw.get("prompt_tokens_details"), raw.get("completion_tokens_details")
    if all(_count(raw.get(name)) is None for name in names):
        return None
    input_tokens, output_tokens = _int(raw.get(names[0])), _int(raw.get(names[1]))
    return Usage(
        input_tokens,
        _detail(inp, "cached_tokens", input_tokens),
        output_tokens,
        _detail(out, "reasoning_tokens", output_tokens),
        audio_input_tokens=_detail(inp, "audio_tokens", input_tokens),
        audio_output_tokens=_detail(out, "audio_tokens", output_tokens),
        service_tier=service_tier,
    )


def loads(raw: bytes) -> Any:
    """Upstream JSON as openai-python reads it (Python's json): orjson, fast, else Python's
    json for what only it takes (a lone surrogate escape: half an emoji); None if not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def usage_from_body(body: Any) -> Usage | None:
    """Usage of a non-streamed response (every endpoint keeps it under `usage`)."""
    return usage_from(body.get("usage"), service_tier_of(body)) if isinstance(body, dict) else None


def output_of_body(body: Any) -> OutputCounter:
    """The output text of a non-streamed body (chat, completions, Responses), for an
    estimate when the upstream reported no usage."""
    output = OutputCounter()
    if not isinstance(body, dict):
        return output
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            output.add(message.get("content") or "" if isinstance(message, dict) else "")
            output.add(choice.get("text") or "")
    for item in body.get("output") or ():
        for part in (item.get("content") or ()) if isinstance(item, dict) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                output.add(part["text"])
    return output


FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")
_DELTA_TEXTS = frozenset({"content", "refusal", "reasoning_content"})  # a chat delta's billed text


class StreamTap:
    def __init__(self, endpoint: str, client_wants_usage: bool) -> None:
        self.responses = endpoint == "responses"
        self.client_wants_usage = client_wants_usage
        self.usage: Usage | None = None
        self.output = OutputCounter()
        self.finished = False  # saw [DONE] or the final Responses event
        self.error: str | None = None
        self.service_tier: str | None = None  # as the upstream reported it in any chunk
        # the event that carries the usage the client sees (the usage-only chunk it asked
        # for, or the final Responses event) and its JSON: the relay writes the charged
        # cost into it once the request is settled (receipt.py)
        self.usage_event: Event | None = None
        self.usage_payload: dict[str, Any] | None = None
        self.first_chunk: dict[str, Any] | None = None  # a chat/completions stream's first chunk

    def forward(self, event: Event) -> bool:
        """Observe one event; False when the client must not see it."""
        data = event.data
        if not data:
            return True
        if data.startswith(b"[DONE]"):  # where openai-python stops
            self.finished = True
            return True
        payload = loads(data)
        if not isinstance(payload, dict):
            return True
        if self.responses:
            self._responses_event(event, payload)
            return True
        return self._chat_event(event, payload)

    def _chat_event(self, event: Event, payload: dict[str, Any]) -> bool:
        if self.first_chunk is None:
            self.first_chunk = payload
        if "error" in payload:
            self.error = str(payload.get("error"))[:500]
        choices = payload.get("choices")
        for choice in choices or ():
            if type(choice) is not dict:
                continue
            delta = choice.get("delta")
            if type(delta) is dict and len(delta) == 1 and "text" not in choice:  # most chunks: one content delta
                content = delta.get("content")
                if type(content) is str:
                    self.output.add(content)
                    continue
            self._collect_choice(choice)
        self.service_tier = service_tier_of(payload) or self.service_tier
        raw_usage = payload.get("usage")
        if raw_usage:
            self.usage = usage_from(raw_usage, self.service_tier)
            if choices:
                return True
            # the usage-only chunk we forced on: shown only to clients that asked
            if self.client_wants_usage:
                self.usage_event, self.usage_payload = event, payload
            return self.client_wants_usage
        return True

    def _collect_choice(self, choice: dict[str, Any]) -> None:
        text = choice.get("text")
        if isinstance(text, str):
            self.output.add(text)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        for name, value in delta.items():  # a delta holds a field or two: cheaper than asking for each
            if name in _DELTA_TEXTS:
                if isinstance(value, str):
                    self.output.add(value)
            elif name == "tool_calls" and value:
                self._collect_tool_calls(value)

    def _collect_tool_calls(self, calls: Any) -> None:
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for name in ("name", "arguments"):
                    if isinstance(function.get(name), str):
                        self.output.add(function[name])

    def _responses_event(self, event: Event, payload: dict[str, Any]) -> None:
        kind = payload.get("type")
        if kind in FINAL_RESPONSE_EVENTS:
            self.finished = True
            response = payload.get("response")
            if isinstance(response, dict):
                self.usage = usage_from(response.get("usage"), service_tier_of(response))
                self.usage_event, self.usage_payload = event, payload
        elif isinstance(kind, str) and kind.endswith(".delta"):
            delta = payload.get("delta")
            if isinstance(delta, str):
                self.output.add(delta)
        elif kind == "error":
            self.error = str(payload.get("message") or payload)[:500]
