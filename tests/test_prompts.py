"""Tests for proxy.prompts: prompt-token estimates for every endpoint's body shapes."""

from __future__ import annotations

import json

import pytest
import tiktoken

from proxy.prompts import _TOOL_OVERHEAD, IMAGE_TOKENS_HIGH, IMAGE_TOKENS_LOW, estimate_prompt_tokens
from proxy.tokens import get_encoding

from .sample_text import realistic_text

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


def _exact(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return get_encoding("cl100k_base")


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
    assert estimate_prompt_tokens("chat", parts, enc) == base + IMAGE_TOKENS_HIGH  # no detail: worst case
    parts["messages"][0]["content"][1]["image_url"]["detail"] = "low"  # type: ignore[index]
    assert estimate_prompt_tokens("chat", parts, enc) == base + IMAGE_TOKENS_LOW

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
    text = realistic_text(3_000_000)
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
    expected = 3 + _exact(enc, "user") + 2 + IMAGE_TOKENS_LOW
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
    count = estimate_prompt_tokens(endpoint, body, o200k)  # it must not raise, and stay sane
    assert isinstance(count, int) and 0 <= count < 20_000


def test_unknown_endpoint(o200k: tiktoken.Encoding) -> None:
    with pytest.raises(ValueError):
        estimate_prompt_tokens("images", {}, o200k)


def test_tool_schemas_count_as_their_compact_json(o200k: tiktoken.Encoding) -> None:
    """A tool's schema is counted as json.dumps's compact text (written by orjson), the
    same for non-ASCII and escapes, and for what orjson refuses (an int past 64 bits)."""
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": 'naïve "数据" \\ \n\t🙂'}}}
    for tool in (
        {"type": "function", "function": {"name": "find", "parameters": schema}},
        {"type": "function", "function": {"name": "big", "parameters": {"maximum": 2**70, "x": 1.5e-7}}},
    ):
        text = json.dumps(tool, separators=(",", ":"), ensure_ascii=False)
        alone = estimate_prompt_tokens("chat", {"messages": []}, o200k)
        counted = estimate_prompt_tokens("chat", {"messages": [], "tools": [tool]}, o200k)
        assert counted == alone + _TOOL_OVERHEAD + _exact(o200k, text)
