"""What metering needs from a client request, validated before anything is reserved.

A body that lacks what metering needs (a `model` string; `messages`, `input` or
`prompt`; a positive integer max-tokens field if given) is a 400 here. Everything
else in the body is the upstream's business and passes through unchanged.
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


@dataclass(slots=True)
class ClientRequest:
    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens_field: str | None  # the field the client used, if any
    max_tokens: int | None
    choices: int  # n (chat, completions) or best_of: output is multiplied by it
    wants_usage: bool  # the client asked for the usage chunk itself

    def upstream_body(self, upstream_model: str, clamp_tokens: int = 0) -> bytes:
        """The body to forward: unchanged but for the model, usage in streams and a clamp."""
        body = self.body
        body["model"] = upstream_model
        if self.stream and self.endpoint in ("chat", "completions"):
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if clamp_tokens:
            body[self.max_tokens_field or _default_max_field(self.endpoint)] = clamp_tokens
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
    field, max_tokens = _max_tokens(body, max_fields)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
        )
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ClientRequest(endpoint, body, model, stream, field, max_tokens, _choices(body), wants_usage)


def _require_prompt(endpoint: str, body: dict[str, Any], field: str) -> None:
    value = body.get(field)
    if endpoint == "chat":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise InvalidRequest("'messages' must be a non-empty array of message objects.", param="messages")
    elif endpoint == "responses":
        if not isinstance(value, (str, list)) and body.get("previous_response_id") is None:
            raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    elif value is None or isinstance(value, (bool, int, float, dict)) or value in ("", []):
        raise InvalidRequest(f"'{field}' must be a non-empty string or array.", param=field)


def _max_tokens(body: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, int | None]:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidRequest(f"'{field}' must be a positive integer.", param=field, code="invalid_value")
        return field, value
    return None, None


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    best_of = body.get("best_of", 1)
    for name, value in (("n", n), ("best_of", best_of)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHOICES:
            raise InvalidRequest(f"'{name}' must be an integer from 1 to {MAX_CHOICES}.", param=name)
    return max(n or 1, best_of or 1)


def _default_max_field(endpoint: str) -> str:
    fields = ENDPOINTS[endpoint][2]
    return fields[-1] if endpoint == "chat" else fields[0]
