"""What metering needs from a client request, validated before anything is reserved.

A body that lacks what metering needs (a `model` string; `messages`, `input` or
`prompt`; a positive integer in each max-tokens field given) is a 400 here. Everything
else in the body is the upstream's business and passes through unchanged, but for the
model, usage in streams and the output cap (`upstream_body`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidRequest

# endpoint -> (route path, field that carries the prompt, max-tokens fields in order)
ENDPOINTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "chat": ("/v1/chat/completions", "messages", ("max_completion_tokens", "max_tokens")),
    "completions": ("/v1/completions", "prompt", ("max_tokens",)),
    "embeddings": ("/v1/embeddings", "input", ()),
    "responses": ("/v1/responses", "input", ("max_output_tokens",)),
}
MAX_CHOICES = 128
MAX_TOKENS_FIELD = 2**31 - 1  # far beyond any model's output, and exact wherever it travels


@dataclass(frozen=True, slots=True)
class Rewrite:
    """What the proxy changes in a body it forwards, so the upstream cannot exceed what
    was reserved: the per-choice output cap (into every max-tokens field given, and
    `cap_field` when none was, or always when the model's provider reads only that
    field), and the hosted-tool calls allowed (Responses `max_tool_calls`)."""

    cap: int | None = None
    cap_field: str = ""
    always_cap_field: bool = False
    max_tool_calls: int | None = None


@dataclass(slots=True)
class ClientRequest:
    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens_fields: tuple[str, ...]  # the max-tokens fields the client gave
    max_tokens: int | None  # the largest of them
    choices: int  # n or best_of, times the prompts of a completions batch: output is multiplied by it
    wants_usage: bool  # the client asked for the usage chunk itself

    @property
    def service_tier(self) -> str | None:
        """The service tier asked for (`auto`, `default`, `flex`, `priority`, ...)."""
        tier = self.body.get("service_tier")
        return tier if isinstance(tier, str) else None

    def upstream_body(self, upstream_model: str, rewrite: Rewrite | None = None) -> bytes:
        """The body to forward: unchanged but for the model, usage in streams and what
        `rewrite` bounds (the output cap, hosted-tool calls)."""
        body = self.body
        body["model"] = upstream_model
        if self.stream and self.endpoint in ("chat", "completions"):
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if rewrite is not None and rewrite.cap is not None:
            fields = set(self.max_tokens_fields)
            if rewrite.always_cap_field or not fields:
                fields.add(rewrite.cap_field)
            for field in fields:
                body[field] = min(body.get(field) or rewrite.cap, rewrite.cap)
        if rewrite is not None and rewrite.max_tool_calls is not None:
            body["max_tool_calls"] = min(body.get("max_tool_calls") or rewrite.max_tool_calls, rewrite.max_tool_calls)
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError as exc:  # e.g. nesting deeper than the encoder allows
            raise InvalidRequest(f"The request body cannot be forwarded: {exc}.") from None


def parse(endpoint: str, raw: bytes) -> ClientRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    _, prompt_field, max_fields = ENDPOINTS[endpoint]
    _require_prompt(endpoint, body, prompt_field)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) or (stream and endpoint == "embeddings"):
        raise InvalidRequest("'stream' must be a boolean (and is not supported for embeddings).", param="stream")
    fields, max_tokens = _max_tokens(body, max_fields)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    if endpoint == "responses" and body.get("background"):
        raise InvalidRequest(
            "Background responses are not supported: the upstream bills them after the response, "
            "beyond what this proxy can meter.",
            param="background",
        )
    choices = _choices(body) * _prompts(endpoint, body)
    return ClientRequest(endpoint, body, model, stream, fields, max_tokens, choices, wants_usage)


def _require_prompt(endpoint: str, body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if endpoint == "chat":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages")
    elif endpoint == "responses":
        stored = any(body.get(k) is not None for k in ("previous_response_id", "conversation", "prompt"))
        if not isinstance(value, (str, list)) and not stored:  # a prompt stored upstream may stand alone
            raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    elif value is None or isinstance(value, (bool, int, float, dict)) or value in ("", []):
        raise InvalidRequest(f"'{field}' must be a non-empty string or array.", param=field)


def _max_tokens(body: dict[str, Any], fields: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """The max-tokens fields given, and the largest: the upstream may honour any of them."""
    given = tuple(field for field in fields if body.get(field) is not None)
    for field in given:
        value = body[field]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_TOKENS_FIELD:
            raise InvalidRequest(
                f"'{field}' must be a positive integer up to {MAX_TOKENS_FIELD}.", param=field, code="invalid_value"
            )
    return given, max((body[field] for field in given), default=None)


def _prompts(endpoint: str, body: dict[str, Any]) -> int:
    """A completions batch (an array of strings or of token arrays) gets its choices for
    each prompt; a flat token array is one prompt."""
    prompt = body.get("prompt")
    if endpoint != "completions" or not isinstance(prompt, list):
        return 1
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return 1
    return max(1, len(prompt))


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    best_of = body.get("best_of", 1)
    for name, value in (("n", n), ("best_of", best_of)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHOICES:
            raise InvalidRequest(f"'{name}' must be an integer from 1 to {MAX_CHOICES}.", param=name)
    return max(n or 1, best_of or 1)
