"""Reading usage, and the output text an estimate counts when usage is missing."""

from __future__ import annotations

from typing import Any

import orjson

from proxy import tokens
from proxy.money import Usage
from proxy.sse import Event
from proxy.testing.upstream import DemoUpstream
from proxy.usage import StreamTap, output_of_body, usage_from

from .conftest import Running
from .helpers import entries


def test_both_usage_shapes() -> None:
    chat = {"prompt_tokens": 10, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    responses = {"input_tokens": 10, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 4},
                 "output_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    assert usage_from(chat) == usage_from(responses) == Usage(10, 4, 7, 3)
    assert usage_from({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0, 0, 0)
    assert usage_from(None) is None


def test_counts_are_read_as_openai_python_reads_them_and_unreadable_usage_is_none() -> None:
    """Counts written as 10.0 or "10" are what the SDK shows as 10 (pydantic's lax int):
    they are charged, not read as 0. A usage with no readable count is no usage at all:
    the request is charged our own count (an estimate), never served free."""
    assert usage_from({"prompt_tokens": 10.0, "completion_tokens": "7"}) == Usage(10, 0, 7, 0)
    assert usage_from({"input_tokens": 10.5, "output_tokens": 7}) == Usage(11, 0, 7, 0)  # never below it
    for unreadable in ({}, {"total_tokens": 15}, {"prompt_tokens": -5, "completion_tokens": "x"},
                       {"prompt_tokens": None, "completion_tokens": True}, {"input_tokens": float("nan")},
                       {"prompt_tokens": "9" * 5000, "completion_tokens": 1e300}):  # fmt: skip
        assert usage_from(unreadable) is None, unreadable


def test_output_of_every_body_shape() -> None:
    enc = tokens.get_encoding("o200k_base")
    chat = {"choices": [{"message": {"content": "hello there"}}]}
    legacy = {"choices": [{"text": "hello there"}]}
    responses = {"output": [{"content": [{"type": "output_text", "text": "hello there"}]}]}
    counts = {output_of_body(body).count(enc) for body in (chat, legacy, responses)}
    assert counts == {len(enc.encode("hello there"))}
    assert output_of_body("not a body").count(enc) == 0


async def test_non_streamed_reply_without_usage_is_estimated(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.omit_usage, upstream.fault.output_tokens = True, 6
    await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    (entry,) = [e for e in await entries(proxy.state.redis, "acme") if e["type"] == "usage"]
    enc = tokens.get_encoding("o200k_base")
    assert entry["estimated"] is True
    assert entry["usage"]["output_tokens"] == len(enc.encode("tok0 tok1 tok2 tok3 tok4 tok5"))


def test_a_stream_tap_collects_every_billed_text_of_a_chat_delta() -> None:
    """What a cut stream is charged for: content, refusals, reasoning, tool names and
    arguments, legacy `text`; odd shapes are skipped, never raised on."""
    tap = StreamTap("chat", client_wants_usage=False)
    deltas: list[Any] = [
        {"role": "assistant", "content": "Hel"},
        {"content": "lo", "refusal": None},
        {"refusal": " no"},
        {"reasoning_content": " think"},
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":'}}]},
        {"tool_calls": [{"function": {"arguments": "1}"}}, "odd", {"function": "odd"}]},
        {"tool_calls": "odd", "content": 5},
        "odd",
    ]
    chunks: list[Any] = [{"choices": [{"index": 0, "delta": d}]} for d in deltas]
    chunks += [{"choices": [{"text": " legacy"}, "odd"]}, {"choices": "odd"}, ["odd"]]
    for chunk in chunks:
        assert tap.forward(Event(None, orjson.dumps(chunk), b""))
    assert "".join(tap.output._parts) == 'Hello no thinkf{"a":1} legacy'
    assert tap.usage is None and not tap.finished
