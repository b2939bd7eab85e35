"""Prompt-token counts for the request bodies of the metered endpoints.

``measure_prompt`` walks a chat, completions, embeddings or responses body, collects
its prompt strings plus fixed per-message overheads (OpenAI cookbook), and counts them
once, bounded like ``tokens.measure``: an estimate (what an estimated charge uses) and
an upper bound (what a reservation uses). Parts that cannot be counted here (files,
audio, prompts stored upstream, hosted tools that inject retrieved input) are named in
``PromptCount.uncountable``: their size is knowable only to the upstream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

from .tokens import bound_text, measure

__all__ = [
    "IMAGE_TOKENS_HIGH",
    "IMAGE_TOKENS_LOW",
    "PromptCount",
    "estimate_prompt_tokens",
    "exact_prompt_tokens",
    "measure_prompt",
    "prediction_tokens",
]

# Image sizes are not knowable from a URL, so estimates take the model's worst case for
# the detail asked. gpt-4o: low is a flat 85; high/auto is 85 + 170 per 512-px tile, at
# most 8 tiles after scaling. A reservation must not be priced below the real cost.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 85 + 170 * 8


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """The most one image can cost a model, in tokens, at `detail: low` and otherwise."""

    low: int
    high: int


GPT_4O_IMAGES = ImageTokens(IMAGE_TOKENS_LOW, IMAGE_TOKENS_HIGH)
# Models that bill images at other rates (OpenAI's vision pricing): gpt-4o-mini at 2,833 +
# 5,667 per tile; the 32-px patch models at up to 1,536 patches times a multiplier
# (mini 1.62, nano 2.46, o4-mini 1.72) whatever the detail. Longest prefix wins.
_IMAGE_TOKENS_BY_MODEL = (
    ("gpt-4o-mini", ImageTokens(2833, 2833 + 5667 * 8)),
    ("gpt-4.1-mini", ImageTokens(2489, 2489)),
    ("gpt-4.1-nano", ImageTokens(3779, 3779)),
    ("gpt-5-mini", ImageTokens(2489, 2489)),
    ("gpt-5-nano", ImageTokens(3779, 3779)),
    ("o4-mini", ImageTokens(2642, 2642)),
)


def image_tokens_for(model: str) -> ImageTokens:
    """The image worst case of a model by its upstream name (config may override it)."""
    name = model.rsplit("/", 1)[-1].lower()
    found = [(len(prefix), tokens) for prefix, tokens in _IMAGE_TOKENS_BY_MODEL if name.startswith(prefix)]
    return max(found, key=lambda f: f[0])[1] if found else GPT_4O_IMAGES


def _image_tokens(part: dict[str, Any], images: ImageTokens) -> int:
    spec = part.get("image_url")
    detail = spec.get("detail") if isinstance(spec, dict) else part.get("detail")
    return images.low if detail == "low" else images.high


_TOOL_OVERHEAD = 8  # per tool/function definition, beyond its JSON
_MESSAGE_OVERHEAD = 3  # cookbook: <|start|>{role/name}\n{content}<|end|>
_NAME_OVERHEAD = 1  # cookbook: tokens_per_name
_REPLY_PRIMING = 3  # cookbook: <|start|>assistant<|message|>
_MAX_DEPTH = 32  # generic JSON walk depth cap (hostile nesting)
# Tools the upstream runs itself, feeding what they retrieve into the prompt.
_CLIENT_TOOLS = frozenset({"function", "custom"})
# Responses content whose size only the upstream knows.
_UNCOUNTABLE_TYPES = frozenset({"input_file", "input_audio", "item_reference"})
_STORED_UPSTREAM = ("previous_response_id", "conversation", "prompt")


@dataclass(frozen=True, slots=True)
class PromptCount:
    estimate: int  # what an estimated charge uses (exact when `exact`)
    bound: int  # never below tiktoken's count of the countable parts
    exact: bool
    uncountable: str | None  # the first part that cannot be counted here, as a param path
    hosted_tools: bool = False  # tools the upstream runs, each call re-reading the context


class _Tally:
    """Collects prompt strings plus fixed overhead, then tokenizes once, bounded."""

    def __init__(self, images: ImageTokens) -> None:
        self.texts: list[str] = []
        self.fixed = 0
        self.extra_bound = 0  # tokens at most, of what is not tokenized (opaque or too deep): its bytes
        self.images = images
        self.uncountable: str | None = None
        self.hosted_tools = False

    def text(self, value: Any) -> None:
        if isinstance(value, str) and value:
            self.texts.append(value)

    def cannot_count(self, param: str) -> None:
        self.uncountable = self.uncountable or param

    def json(self, value: Any) -> None:
        if value is None:
            return
        # Estimation must never fail a request, whatever the JSON holds. orjson writes
        # parsed JSON as json.dumps's compact form does, 15x faster (a 20-tool list:
        # 6 us, not 91); json.dumps takes what it refuses (ints past 64 bits).
        try:
            dumped = orjson.dumps(value).decode()
        except (orjson.JSONEncodeError, TypeError):
            try:
                dumped = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
            except (ValueError, TypeError, RecursionError):
                self.opaque(value)
                return
        self.text(dumped)

    def opaque(self, value: Any) -> None:
        """Something the upstream reads but we do not tokenize: its bytes bound its tokens."""
        try:
            self.extra_bound += len(orjson.dumps(value))
        except (orjson.JSONEncodeError, TypeError):
            pass  # it cannot be forwarded either (intake.upstream_body refuses it)

    def count(self, enc: tiktoken.Encoding, exact: bool = False) -> PromptCount:
        """Per-string counting, as in the OpenAI cookbook recipe; bounded unless `exact`."""
        m = measure(enc, self.texts, sys.maxsize, sys.maxsize) if exact else measure(enc, self.texts, remember=True)
        bound = self.fixed + m.bound + self.extra_bound
        return PromptCount(self.fixed + m.estimate, bound, m.exact, self.uncountable, self.hosted_tools)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _tools(tally: _Tally, body: dict[str, Any]) -> None:
    for key in ("tools", "functions"):
        for i, tool in enumerate(_as_list(body.get(key))):
            tally.json(tool)
            tally.fixed += _TOOL_OVERHEAD
            if key == "tools" and isinstance(tool, dict) and tool.get("type", "function") not in _CLIENT_TOOLS:
                tally.cannot_count(f"tools[{i}]")  # file_search, web_search, mcp, ...: input retrieved upstream
                tally.hosted_tools = True


def _token_array(tally: _Tally, value: Any) -> None:
    """Completions/embeddings input: str | [str] | [int] | [[int]] (mixed tolerated)."""
    if isinstance(value, str):
        tally.text(value)
        return
    for item in _as_list(value):
        if isinstance(item, str):
            tally.text(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            tally.fixed += 1
        elif isinstance(item, list):
            tally.fixed += sum(1 for t in item if isinstance(t, int) and not isinstance(t, bool))


# Chat ------------------------------------------------------------------------


def _chat_content(tally: _Tally, content: Any, param: str) -> None:
    if isinstance(content, str):
        tally.text(content)
        return
    for j, part in enumerate(_as_list(content)):
        if not isinstance(part, dict):
            tally.text(part)
            continue
        kind = part.get("type")  # classified by type alone: a stray `text` key hides nothing
        if kind in ("image_url", "input_image"):
            tally.fixed += _image_tokens(part, tally.images)
        elif kind == "refusal":
            tally.text(part.get("refusal"))
        elif kind in (None, "text", "input_text"):
            tally.text(part.get("text"))
        else:  # file, input_audio, ...: their size is knowable only upstream
            tally.cannot_count(f"{param}[{j}]")


def _tool_calls(tally: _Tally, calls: Any) -> None:
    for call in _as_list(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or call.get("custom")
        if isinstance(function, dict):
            tally.text(function.get("name"))
            tally.text(function.get("arguments") or function.get("input"))


def _chat_message(tally: _Tally, message: Any, param: str) -> None:
    tally.fixed += _MESSAGE_OVERHEAD
    if not isinstance(message, dict):
        return
    for key, value in message.items():
        if key == "content":
            _chat_content(tally, value, f"{param}.content")
        elif key == "audio" and value is not None:  # an earlier audio reply, by id
            tally.cannot_count(f"{param}.audio")
        elif key == "tool_calls":
            _tool_calls(tally, value)
        elif key == "function_call":  # legacy single call
            _tool_calls(tally, [{"function": value}])
        else:  # role, name, tool_call_id, refusal, ...: cookbook counts every string
            tally.text(value)
            if key == "name":
                tally.fixed += _NAME_OVERHEAD


def _response_format(tally: _Tally, fmt: Any) -> None:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return
    # Chat nests the schema under "json_schema"; Responses' text.format is flat.
    tally.json(fmt.get("json_schema", fmt))


def _chat(tally: _Tally, body: dict[str, Any]) -> None:
    for i, message in enumerate(_as_list(body.get("messages"))):
        _chat_message(tally, message, f"messages[{i}]")
    tally.fixed += _REPLY_PRIMING
    _tools(tally, body)
    if body.get("web_search_options") is not None:  # search results join the prompt upstream
        tally.cannot_count("web_search_options")
    _response_format(tally, body.get("response_format"))


# Responses -------------------------------------------------------------------

# Keys whose string values are identifiers, enums or opaque blobs, not prompt text.
_OPAQUE_KEYS = frozenset(
    {
        "id",
        "call_id",
        "type",
        "status",
        "role",
        "detail",
        "encrypted_content",
        "file_id",
        "file_data",
        "file_url",
        "image_url",
        "filename",
        "format",
        "data",
    }
)
_IMAGE_TYPES = frozenset({"input_image", "image_url", "computer_screenshot"})


def _walk_strings(tally: _Tally, value: Any, param: str) -> None:
    """Count prompt-like strings anywhere in ``value``; iterative and depth-capped."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            tally.text(node)
        elif depth >= _MAX_DEPTH:
            tally.opaque(node)  # not walked, still bounded
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in reversed(node))
        elif isinstance(node, dict):
            if node.get("type") in _IMAGE_TYPES:
                tally.fixed += _image_tokens(node, tally.images)
            elif node.get("type") in _UNCOUNTABLE_TYPES:
                tally.cannot_count(param)
            if isinstance(node.get("encrypted_content"), str):  # reasoning the upstream decrypts into the prompt
                tally.extra_bound += len(node["encrypted_content"])
            children: Iterable[tuple[Any, int]] = ((v, depth + 1) for k, v in node.items() if k not in _OPAQUE_KEYS)
            stack.extend(reversed(list(children)))


def _responses(tally: _Tally, body: dict[str, Any]) -> None:
    for key in _STORED_UPSTREAM:
        if body.get(key) is not None:
            tally.cannot_count(key)
    tally.text(body.get("instructions"))
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for i, item in enumerate(_as_list(items)):
        if isinstance(item, dict) and ("role" in item or item.get("type") == "message"):
            tally.fixed += _MESSAGE_OVERHEAD
            tally.text(item.get("role"))
        _walk_strings(tally, item, f"input[{i}]")
    tally.fixed += _REPLY_PRIMING
    _tools(tally, body)
    text_cfg = body.get("text")
    if isinstance(text_cfg, dict):
        _response_format(tally, text_cfg.get("format"))


def _completions(tally: _Tally, body: dict[str, Any]) -> None:
    _token_array(tally, body.get("prompt"))
    tally.text(body.get("suffix"))


def _embeddings(tally: _Tally, body: dict[str, Any]) -> None:
    _token_array(tally, body.get("input"))


_ENDPOINTS: dict[str, Callable[[_Tally, dict[str, Any]], None]] = {
    "chat": _chat,
    "completions": _completions,
    "embeddings": _embeddings,
    "responses": _responses,
}


def measure_prompt(
    endpoint: str, body: Any, enc: tiktoken.Encoding, exact: bool = False, images: ImageTokens = GPT_4O_IMAGES
) -> PromptCount:
    """Prompt tokens of a request body of the given endpoint.

    ``endpoint`` is "chat", "completions", "embeddings" or "responses"
    (ValueError otherwise). Never raises on odd-but-valid JSON: unexpected
    shapes and non-strings are ignored. Counting is bounded like ``tokens.measure``
    unless ``exact`` (which costs ~1 s of CPU per 5 MB of text).
    """
    walker = _ENDPOINTS.get(endpoint)
    if walker is None:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(_ENDPOINTS)}")
    tally = _Tally(images)
    if isinstance(body, dict):
        walker(tally, body)
    return tally.count(enc, exact)


def estimate_prompt_tokens(endpoint: str, body: Any, enc: tiktoken.Encoding) -> int:
    """The prompt as estimated in bounded CPU (exact up to ``tokens.EXACT_CHAR_BOUND``)."""
    return measure_prompt(endpoint, body, enc).estimate


def exact_prompt_tokens(endpoint: str, body: Any, enc: tiktoken.Encoding, images: ImageTokens = GPT_4O_IMAGES) -> int:
    """The prompt counted exactly, however long: run it off the event loop."""
    return measure_prompt(endpoint, body, enc, exact=True, images=images).estimate


def prediction_tokens(body: dict[str, Any], enc: tiktoken.Encoding) -> int:
    """An upper bound on a predicted output's tokens (chat `prediction`): rejected
    prediction tokens are billed as output, beyond the output cap."""
    prediction = body.get("prediction")
    content = prediction.get("content") if isinstance(prediction, dict) else None
    if isinstance(content, list):
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return bound_text(enc, content) if isinstance(content, str) else 0
