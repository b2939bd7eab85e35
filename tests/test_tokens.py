"""Tests for proxy.tokens: offline encodings, bounded counting, prompt estimates."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

# Point tiktoken's cache at an empty dir before anything loads, to prove the
# encodings come from the packaged files, not a cache or a download.
_EMPTY_CACHE = tempfile.mkdtemp(prefix="tiktoken-empty-cache-")
os.environ["TIKTOKEN_CACHE_DIR"] = _EMPTY_CACHE

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public  # type: ignore[import-untyped]

from proxy import tokens
from proxy.tokens import (
    EXACT_CHAR_BOUND,
    IMAGE_TOKENS,
    EncodingIntegrityError,
    OutputCounter,
    count_text,
    encoding_for_model,
    estimate_prompt_tokens,
    get_encoding,
)

# Hashes as published in tiktoken_ext/openai_public.py.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# From OpenAI's cookbook "How to count tokens with tiktoken".
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "metering",
    "proxy",
    "request",
    "response",
    "token",
    "budget",
    "latency",
    "upstream",
    "stream",
    "chunk",
    "billing",
    "account",
    "configuration",
    "deployment",
    "kubernetes",
    "database",
    "transaction",
    "serialization",
    "concurrency",
    "def",
    "return",
    "class",
    "import",
    "None",
    "self",
    "async",
    "await",
    "yield",
    "lambda",
    "{}",
    "[]",
    "()",
    "==",
    "!=",
    "<=",
    ">=",
    "+=",
    "->",
    "::",
    "Über",
    "café",
    "naïve",
    "résumé",
    "東京",
    "数据",
    "テスト",
    "42",
    "3.14159",
    "2024-01-01",
    "0x1F",
    "user@example.com",
]


def _realistic_text(n_chars: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25)))
        sentence = sentence.capitalize() + rng.choice([". ", ".\n", "? ", "!\n\n", ", "])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


def _exact(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return get_encoding("cl100k_base")


# ---------------------------------------------------------------- encodings


def test_expected_hashes_come_from_tiktoken() -> None:
    source = Path(openai_public.__file__).read_text(encoding="utf-8")
    assert O200K_SHA256 in source
    assert CL100K_SHA256 in source


def test_offline_loader_checks_tiktoken_hash() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    ranks = tokens._offline_load_bpe(url, expected_hash=CL100K_SHA256)
    assert len(ranks) == 100256
    with pytest.raises(EncodingIntegrityError, match="sha256"):
        tokens._offline_load_bpe(url, expected_hash="0" * 64)
    with pytest.raises(EncodingIntegrityError):
        tokens._offline_load_bpe(url.replace("cl100k", "p50k"), expected_hash="0" * 64)


def test_build_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network/cache access attempted")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    get_encoding.cache_clear()
    try:
        enc = get_encoding("cl100k_base")
    finally:
        get_encoding.cache_clear()
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe  # swap restored
    assert os.listdir(_EMPTY_CACHE) == []


@pytest.mark.parametrize(
    ("name", "ids", "n_vocab"),
    [("o200k_base", [24912, 2375], 200019), ("cl100k_base", [15339, 1917], 100277)],
)
def test_hello_world_ids(name: str, ids: list[int], n_vocab: int) -> None:
    enc = get_encoding(name)
    assert enc.name == name
    assert enc.n_vocab == n_vocab
    assert enc.encode_ordinary("hello world") == ids
    assert enc.decode(ids) == "hello world"
    assert [enc.decode_single_token_bytes(i) for i in ids] == [b"hello", b" world"]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]
    assert get_encoding(name) is enc  # cached
    assert os.listdir(_EMPTY_CACHE) == []


def test_unknown_encoding_name() -> None:
    with pytest.raises(ValueError):
        get_encoding("p50k_base")
    with pytest.raises(ValueError):
        get_encoding("nope")


# ---------------------------------------------------------------- models


def test_model_mapping() -> None:
    assert encoding_for_model("gpt-4o").name == "o200k_base"
    assert encoding_for_model("gpt-4o-mini-2024-07-18").name == "o200k_base"
    assert encoding_for_model("gpt-4").name == "cl100k_base"
    assert encoding_for_model("openai/gpt-4").name == "cl100k_base"
    assert encoding_for_model("gpt-4o", configured="cl100k_base").name == "o200k_base"
    assert encoding_for_model("gpt-4o") is encoding_for_model("gpt-4o")


def test_unknown_model_falls_back() -> None:
    assert encoding_for_model("llama-3-70b").name == "o200k_base"
    assert encoding_for_model("llama-3-70b", configured="cl100k_base").name == "cl100k_base"
    assert encoding_for_model("llama-3-70b", configured="o200k_harmony").name == "o200k_base"
    assert encoding_for_model("").name == "o200k_base"
    assert encoding_for_model(None).name == "o200k_base"  # type: ignore[arg-type]
    assert encoding_for_model("x" * 1_000_000).name == "o200k_base"
    with pytest.raises(ValueError):
        encoding_for_model("llama-3-70b", configured="typo_base")


def test_unshipped_model_encodings_map_to_shipped() -> None:
    assert encoding_for_model("davinci").name == "cl100k_base"  # r50k_base
    assert encoding_for_model("text-davinci-003").name == "cl100k_base"  # p50k_base
    assert encoding_for_model("gpt-oss-120b").name == "o200k_base"  # o200k_harmony


# ---------------------------------------------------------------- count_text


def test_count_text_exact_below_bound(o200k: tiktoken.Encoding) -> None:
    text = _realistic_text(EXACT_CHAR_BOUND)
    assert count_text(o200k, text) == _exact(o200k, text)
    assert count_text(o200k, "") == 0
    assert count_text(o200k, "<|endoftext|>") == _exact(o200k, "<|endoftext|>")  # no raise


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_huge_prompt_is_bounded_upper_estimate(name: str) -> None:
    enc = get_encoding(name)
    text = _realistic_text(5_000_000)
    exact = _exact(enc, text)
    estimate = count_text(enc, text)
    assert exact <= estimate <= 2 * exact


def test_dense_tail_not_undercounted(o200k: tiktoken.Encoding) -> None:
    # Cheap English prefix, then token-dense noise: spot samples must catch it.
    rng = random.Random(3)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789+/=") for _ in range(2_000_000))
    text = _realistic_text(EXACT_CHAR_BOUND) + noise
    exact = _exact(o200k, text)
    estimate = count_text(o200k, text)
    assert exact <= estimate <= 2 * exact


def test_extrapolation_capped_by_utf8_bytes(o200k: tiktoken.Encoding) -> None:
    text = "a" * (EXACT_CHAR_BOUND + 10) + "\ud800"  # lone surrogate is valid JSON
    head = _exact(o200k, text[:EXACT_CHAR_BOUND])
    assert head <= count_text(o200k, text) <= head + 13


# ---------------------------------------------------------------- chat


def _cookbook_formula(enc: tiktoken.Encoding, messages: list[dict[str, str]]) -> int:
    total = 3  # reply priming
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value))
            if key == "name":
                total += 1
    return total


def test_cookbook_example_cl100k(cl100k: tiktoken.Encoding) -> None:
    body = {"model": "gpt-4", "messages": COOKBOOK_MESSAGES}
    # The notebook reports 129 prompt tokens for gpt-3.5-turbo/gpt-4.
    assert estimate_prompt_tokens("chat", body, cl100k) == 129
    assert _cookbook_formula(cl100k, COOKBOOK_MESSAGES) == 129


def test_cookbook_example_o200k(o200k: tiktoken.Encoding) -> None:
    body = {"model": "gpt-4o", "messages": COOKBOOK_MESSAGES}
    count = estimate_prompt_tokens("chat", body, o200k)
    assert count == _cookbook_formula(o200k, COOKBOOK_MESSAGES)
    assert count > 0
    longer = [
        *COOKBOOK_MESSAGES,
        {"role": "user", "content": "And one more thing, please."},
    ]
    assert estimate_prompt_tokens("chat", {"messages": longer}, o200k) > count


def test_chat_content_parts_and_tools(o200k: tiktoken.Encoding) -> None:
    enc = o200k
    base = estimate_prompt_tokens("chat", {"messages": [{"role": "user", "content": "hi"}]}, enc)
    assert base == 3 + _exact(enc, "user") + _exact(enc, "hi") + 3

    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AAAA"},
                    },
                    {
                        "type": "input_audio",
                        "input_audio": {"data": "AAAA", "format": "wav"},
                    },
                ],
            }
        ]
    }
    assert estimate_prompt_tokens("chat", parts, enc) == base + IMAGE_TOKENS

    call = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    tool_msgs = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with_calls = estimate_prompt_tokens("chat", {"messages": tool_msgs}, enc)
    expected = base + 3 + _exact(enc, "assistant") + _exact(enc, "get_weather")
    expected += _exact(enc, call["arguments"])
    expected += 3 + _exact(enc, "tool") + _exact(enc, "c1") + _exact(enc, "sunny")
    assert with_calls == expected

    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
            },
        },
    }
    with_tools = estimate_prompt_tokens("chat", {"messages": tool_msgs, "tools": [tool]}, enc)
    assert with_tools > with_calls + _exact(enc, "Get the weather for a city")

    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}},
    }
    with_fmt = estimate_prompt_tokens("chat", {"messages": tool_msgs, "response_format": fmt}, enc)
    assert with_fmt > with_calls


def test_huge_chat_is_bounded(o200k: tiktoken.Encoding) -> None:
    text = _realistic_text(3_000_000)
    body = {"messages": [{"role": "user", "content": text}]}
    exact = _exact(o200k, text)
    assert exact <= estimate_prompt_tokens("chat", body, o200k) <= 2 * exact


def test_many_small_messages(o200k: tiktoken.Encoding) -> None:
    messages = [{"role": "user", "content": f"message number {i}"} for i in range(10_000)]
    exact = _cookbook_formula(o200k, messages)
    estimate = estimate_prompt_tokens("chat", {"messages": messages}, o200k)
    assert exact * 0.9 <= estimate <= 2 * exact


# ---------------------------------------------------------------- completions / embeddings


@pytest.mark.parametrize(("endpoint", "key"), [("completions", "prompt"), ("embeddings", "input")])
def test_prompt_shapes(o200k: tiktoken.Encoding, endpoint: str, key: str) -> None:
    enc = o200k

    def est(value: object) -> int:
        return estimate_prompt_tokens(endpoint, {key: value}, enc)

    assert est("hello world") == 2
    assert est(["hello world", "hello"]) == 3
    assert est([1, 2, 3]) == 3
    assert est([[1, 2], [3, 4, 5]]) == 5
    assert est([]) == 0
    assert est(None) == 0


def test_completions_n_not_multiplied(o200k: tiktoken.Encoding) -> None:
    assert estimate_prompt_tokens("completions", {"prompt": "hello world", "n": 5}, o200k) == 2


# ---------------------------------------------------------------- responses


def test_responses_shapes(o200k: tiktoken.Encoding) -> None:
    enc = o200k
    plain = estimate_prompt_tokens("responses", {"input": "hello world"}, enc)
    assert plain == 3 + _exact(enc, "user") + 2 + 3

    with_instr = estimate_prompt_tokens("responses", {"input": "hello world", "instructions": "Be terse."}, enc)
    assert with_instr == plain + _exact(enc, "Be terse.")

    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
        {
            "type": "input_image",
            "image_url": "data:image/png;base64,AAAA",
            "detail": "low",
        },
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "lookup",
            "arguments": '{"q":"x"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "found it"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "ok"}],
            "encrypted_content": "Z" * 10_000,
        },
        {"type": "item_reference", "id": "msg_1"},
    ]
    count = estimate_prompt_tokens("responses", {"input": items}, enc)
    expected = 3 + _exact(enc, "user") + 2 + IMAGE_TOKENS
    expected += _exact(enc, "lookup") + _exact(enc, '{"q":"x"}') + _exact(enc, "found it")
    expected += _exact(enc, "ok") + 3
    assert count == expected

    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    assert estimate_prompt_tokens("responses", {"input": items, "tools": tools}, enc) > count


# ---------------------------------------------------------------- robustness


WEIRD_BODIES = [
    {},
    {"messages": "not a list"},
    {"messages": [None, 1, "x", [], {"content": None}, {"content": 5}]},
    {
        "messages": [
            {
                "role": 1,
                "name": None,
                "content": [
                    None,
                    1,
                    "s",
                    {"type": "text", "text": 5},
                    {"type": "image_url"},
                    {"foo": "bar"},
                ],
            }
        ]
    },
    {
        "messages": [
            {"tool_calls": "x"},
            {"tool_calls": [None, {"function": "x"}, {"function": {}}]},
        ]
    },
    {
        "messages": [{"function_call": None}],
        "tools": "x",
        "functions": [None, {"a": float("nan")}],
    },
    {"messages": [], "response_format": {"type": "json_schema"}, "tools": [{1, 2}]},
    {"prompt": {"a": 1}, "input": {"b": 2}},
    {
        "prompt": [None, True, 1.5, [None, "a", 2], {"x": 1}],
        "input": [[True], "\ud800"],
    },
    {
        "input": [
            {"content": [{"type": "input_text", "text": None}]},
            None,
            3,
            "loose string",
        ]
    },
    {"input": [{"type": "message", "content": {"nested": ["a", {"b": ["c"]}]}}]},
    {"instructions": 5, "text": "x", "tools": [None]},
    {"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
]


def _deep(depth: int) -> list[object]:
    node: list[object] = ["leaf"]
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize("body", [*WEIRD_BODIES, {"input": _deep(5_000)}, "not a dict", None, []])
@pytest.mark.parametrize("endpoint", ["chat", "completions", "embeddings", "responses"])
def test_weird_shapes_do_not_raise(o200k: tiktoken.Encoding, endpoint: str, body: object) -> None:
    assert estimate_prompt_tokens(endpoint, body, o200k) >= 0


def test_unknown_endpoint(o200k: tiktoken.Encoding) -> None:
    with pytest.raises(ValueError):
        estimate_prompt_tokens("images", {}, o200k)


# ---------------------------------------------------------------- output counter


def test_output_counter(o200k: tiktoken.Encoding) -> None:
    counter = OutputCounter()
    assert counter.count(o200k) == 0
    assert counter.chars == 0
    for chunk in ["Hel", "lo", ", wor", "ld!", "", '{"city":', '"Paris"}']:
        counter.add(chunk)
    full = 'Hello, world!{"city":"Paris"}'
    assert counter.chars == len(full)
    assert counter.count(o200k) == _exact(o200k, full)
    assert counter.count(o200k) == _exact(o200k, full)  # idempotent
    counter.add(" more")
    assert counter.count(o200k) == _exact(o200k, full + " more")


def test_output_counter_huge_is_bounded(o200k: tiktoken.Encoding) -> None:
    text = _realistic_text(2_000_000)
    counter = OutputCounter()
    for i in range(0, len(text), 7):
        counter.add(text[i : i + 7])
    exact = _exact(o200k, text)
    assert counter.chars == len(text)
    assert exact <= counter.count(o200k) <= 2 * exact
