"""intake.py: what metering needs from a request, refused with a 400 before anything is
reserved, and what the forwarded body may say."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy import errors, intake
from proxy.intake import Rewrite

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(endpoint: str, body: Any) -> intake.ClientRequest:
    return intake.parse(endpoint, orjson.dumps(body))


def test_the_largest_of_several_max_fields_is_the_one_that_counts() -> None:
    client = parse("chat", {**CHAT, "max_completion_tokens": 5, "max_tokens": 100_000})
    assert client.max_tokens == 100_000 and set(client.max_tokens_fields) == {"max_completion_tokens", "max_tokens"}


@pytest.mark.parametrize("value", [0, -1, 5.0, "5", True, 2**31, None])
def test_max_fields_must_be_positive_integers_in_range(value: Any) -> None:
    if value is None:  # an explicit null is no cap at all: the reserved one is forwarded
        assert parse("chat", {**CHAT, "max_tokens": None}).max_tokens is None
        return
    with pytest.raises(errors.InvalidRequest) as caught:
        parse("chat", {**CHAT, "max_tokens": value})
    assert caught.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("prompt", "choices"),
    [("one", 1), ([1, 2, 3], 1), (["a", "b", "c"], 3), ([[1, 2], [3]], 2)],
)
def test_a_completions_batch_has_its_choices_per_prompt(prompt: Any, choices: int) -> None:
    assert parse("completions", {"model": "m", "prompt": prompt, "n": 2}).choices == 2 * choices


def test_a_background_response_is_refused() -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        parse("responses", {"model": "m", "input": "hi", "background": True})
    assert caught.value.param == "background"


def test_the_forwarded_body_carries_the_reserved_bounds() -> None:
    client = parse("chat", {**CHAT, "max_completion_tokens": 50_000})
    body = orjson.loads(client.upstream_body("up", Rewrite(cap=100, cap_field="max_completion_tokens")))
    assert body["model"] == "up" and body["max_completion_tokens"] == 100
    # a provider that reads only max_tokens gets the cap there too
    body = orjson.loads(client.upstream_body("up", Rewrite(cap=100, cap_field="max_tokens", always_cap_field=True)))
    assert body["max_tokens"] == 100 and body["max_completion_tokens"] == 100
    responses = parse("responses", {"model": "m", "input": "hi", "max_tool_calls": 50})
    body = orjson.loads(responses.upstream_body("up", Rewrite(cap=10, cap_field="max_output_tokens", max_tool_calls=2)))
    assert body["max_output_tokens"] == 10 and body["max_tool_calls"] == 2


def test_streams_always_ask_for_usage() -> None:
    client = parse("chat", {**CHAT, "stream": True})
    assert orjson.loads(client.upstream_body("up"))["stream_options"] == {"include_usage": True}
    assert not client.wants_usage  # the usage chunk is hidden from this client
