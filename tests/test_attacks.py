"""Attacks on the money: a hostile client with a valid key, and an operator's accidents.

The promise under attack: in `billing.on_insufficient: reject` mode without overage no
request of any shape takes an account's balance below zero, on any number of instances,
under any concurrency; every forwarded request is settled exactly once for its exact cost;
bad input is an OpenAI-shaped 4xx, never a 500 and never a charge.

Real parts only: the proxy on loopback, real Redis, the fake OpenAI upstream (whose fault
knobs model what the real OpenAI bills: see `proxy/testing/upstream.py`), the openai SDK or
raw aiohttp for what the SDK cannot send. No mocks, no sleeps.

The findings' tests failed on the code they were written against, each one a way past
the promise ("before:" comments say what happened then); the fixes made them pass. The
`REGRESSION TABLE` at the end holds attacks that were tried and broke nothing, kept so
they never do.

Prices (micro-USD per token): gpt-4o 2.5 in / 10 out, gpt-4o-mini 0.15 / 0.60,
o3-mini 1.10 / 4.40, text-embedding-3-small 0.02 (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from proxy import intake
from proxy.money import usd
from proxy.testing.upstream import DemoUpstream, real_prompt_tokens

from .conftest import Running
from .helpers import entries, last_entry_id, next_entry, post

USER = [{"role": "user", "content": "Describe it."}]
IMAGE = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * 3000).decode()


def reservation_of(running: Running, endpoint: str, body: dict[str, Any]) -> int:
    """What the proxy reserves for `body`, in micro-USD (its own arithmetic)."""
    r = running.state.catalog.route(body["model"]).reservation(intake.parse(endpoint, orjson.dumps(body)))
    return r.prompt_cost + r.output_cost


async def usage_entries(redis: Redis, account_id: str = "acme") -> list[dict[str, Any]]:
    return [e for e in await entries(redis, account_id) if e.get("type") == "usage"]


def charged(entry: dict[str, Any]) -> int:
    return -int(entry["amount"])


# ---------------------------------------------------------------------------------------
# Findings (fail on the current code)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [["Say hi."] * 100, [[9906, 13]] * 100], ids=["strings", "token-arrays"])
async def test_a_completions_prompt_batch_cannot_overrun_a_balance(
    proxy: Running, upstream: DemoUpstream, prompt: list[Any]
) -> None:
    """Guarantee: a reservation is a true upper bound. OpenAI's legacy completions take a
    batch of prompts (an array of strings or of token arrays) and write `n` choices for
    EACH; the proxy reserves `max_tokens x n` once, whatever the batch size."""
    key = await proxy.account("acme", "0.002")
    upstream.fault.real_choices = True
    upstream.fault.prompt_tokens = 300
    upstream.fault.output_tokens = 50
    body = {"model": "gpt-4o", "prompt": prompt, "max_tokens": 50}
    status, reply = await post(proxy, key, "completions", body)
    view = await proxy.balance("acme")
    print(f"reserved {reservation_of(proxy, 'completions', body)} micro; status {status}; balance {view.balance}")
    # before: reserved ~1,300 micro (50 output tokens), served 100 x 50 = 5,000 output tokens
    # ($0.05), balance -$0.048
    assert status != 200 or len(reply["choices"]) == 100  # served: 100 prompts, 100 choices
    assert view.reserved == 0
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


@pytest.mark.parametrize(("detail", "funds"), [("high", "0.001"), ("low", "0.0001")])
async def test_images_on_gpt_4o_mini_cannot_overrun_a_balance(
    proxy: Running, upstream: DemoUpstream, detail: str, funds: str
) -> None:
    """Guarantee: a reservation is a true upper bound. An image is reserved at gpt-4o's
    worst case (85 + 170 x 8 = 1,445 tokens; 85 at `detail: low`) for every model, but
    gpt-4o-mini bills 2,833 + 5,667 per tile (48,169 tokens at most; 2,833 at low), and
    the 32-px patch models (gpt-4.1-mini, o4-mini, gpt-5-mini) up to 1,536 x 1.62-2.46."""
    key = await proxy.account("acme", funds)
    upstream.fault.bill_images = True
    image = {"type": "image_url", "image_url": {"url": IMAGE, "detail": detail}}
    body = {"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]}  # fmt: skip
    status, _ = await post(proxy, key, "chat/completions", body)
    view = await proxy.balance("acme")
    print(f"reserved {reservation_of(proxy, 'chat', body)} micro; status {status}; balance {view.balance}")
    # before (high): reserved 234 micro, charged 7,230: balance -$0.006230 (low: 20 vs 429)
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


async def test_a_background_response_is_charged_what_the_upstream_bills(proxy: Running, upstream: DemoUpstream) -> None:
    """Guarantee: every forwarded request is settled for its exact cost, and no account
    obtains more than its balance. A non-streamed Responses request with `background:
    true` is answered `queued` with `usage: null`; OpenAI then generates up to
    `max_output_tokens` and bills the operator. The proxy charges a prompt estimate and
    releases the output it reserved, so the same $0.20 buys any number of 10k-token essays."""
    key = await proxy.account("acme", "0.2")
    upstream.fault.honour_background = True
    upstream.fault.output_tokens = 10_000
    body = {"model": "gpt-4o", "input": "Write a long essay.", "background": True, "max_output_tokens": 10_000}
    results = [await post(proxy, key, "responses", body) for _ in range(5)]
    view = await proxy.balance("acme")
    billed = sum(u["input_tokens"] * Decimal("2.5") + u["output_tokens"] * 10 for u in upstream.deferred_usage)
    print(f"statuses {[s for s, _ in results]}; charged {200_000 - view.balance} micro; upstream bills {billed}")
    # before: 5 x 200, charged 150 micro in all, the upstream bills 500,125 micro ($0.50)
    assert 200_000 - view.balance >= billed, "served below its cost"
    assert view.balance >= 0


async def test_a_dearer_tier_reported_than_asked_cannot_overrun_a_balance(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    """Guarantee: a reservation is a true upper bound. A request that names no tier (or
    `auto`) is reserved at the standard price, but charged at the tier the upstream
    reports. OpenAI serves `auto` at the project's default tier, which the project can set
    to `priority` (docs: "processed with the service tier configured in the Project
    settings"), and reports `service_tier: priority`: 1.7x the reservation."""
    priority = {"input": "4.25", "cached_input": "2.125", "output": "17.00"}
    running: Running = await start_proxy({"models": {"gpt-4o": {"price": {"service_tiers": {"priority": priority}}}}})
    body = {"model": "gpt-4o", "messages": USER, "max_tokens": 1000}
    reserve = reservation_of(running, "chat", body)
    key = await running.account("acme", usd(reserve))  # exactly one worst case at the standard price
    upstream.fault.service_tier = "priority"
    upstream.fault.output_tokens = 1000
    for tier in (None, "auto"):
        status, _ = await post(running, key, "chat/completions", {**body, **({"service_tier": tier} if tier else {})})
        if status != 200:
            break
    view = await running.balance("acme")
    # before: reserved 10,048 micro at the standard price, charged 17,043 at priority: -$0.006995
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


async def test_the_cap_reaches_a_provider_that_reads_only_max_tokens(start_proxy: Any, upstream: DemoUpstream) -> None:
    """Guarantee: the reserved cap is forwarded in the field the model takes. With
    `max_tokens_field: max_tokens` (a provider without `max_completion_tokens`), a client
    that names `max_completion_tokens: 5` (what the openai SDK sends today) is reserved 5
    tokens, and the body goes upstream with that field only: the provider ignores it and
    writes as much as it likes."""
    running: Running = await start_proxy({"models": {"gpt-4o-mini": {"max_tokens_field": "max_tokens"}}})
    key = await running.account("acme", "0.001")
    upstream.fault.max_fields_read = ("max_tokens",)
    upstream.fault.uncapped_output_tokens = 16_384
    await running.client(key).chat.completions.create(model="gpt-4o-mini", messages=USER, max_completion_tokens=5)  # type: ignore[arg-type]
    sent = upstream.requests[-1].body
    view = await running.balance("acme")
    print(f"sent { ({k: v for k, v in sent.items() if 'max' in k}) }; balance {view.balance}")
    # before: sent {max_completion_tokens: 5} only; 16,384 tokens charged, balance -$0.0088
    assert sent.get("max_tokens") == 5
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


async def test_clamp_mode_reserves_a_predictions_tokens(start_proxy: Any, upstream: DemoUpstream) -> None:
    """Guarantee: clamp mode lowers the cap to what the balance affords, never below zero.
    A `prediction` is reserved on top of the cap in reject mode (rejected prediction tokens
    are billed as output, beyond the visible output), but admit.lua's clamp divides the
    balance by the output price as if every reserved token were a capped one: it forwards
    a cap that uses the whole balance and the prediction is billed on top."""
    running: Running = await start_proxy({"billing": {"on_insufficient": "clamp"}})
    key = await running.account("acme", "0.001")  # 1,000 micro: ~95 gpt-4o output tokens
    upstream.fault.bill_rejected_prediction = True
    upstream.fault.output_tokens = 16_384
    prediction = " ".join(f"line {i}" for i in range(1000))  # ~3,000 tokens the model may reject
    body = {"model": "gpt-4o", "messages": USER, "prediction": {"type": "content", "content": prediction}}
    status, _ = await post(running, key, "chat/completions", body)
    view = await running.balance("acme")
    print(f"status {status}; balance {view.balance}")
    assert status in (200, 402)  # served within the balance, or the prediction alone does not fit
    # before: clamped to 95 tokens, 95 + ~3,000 rejected prediction tokens charged: -$0.029975
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


@pytest.mark.parametrize("endpoint", ["chat/completions", "responses"])
async def test_an_interrupted_reasoning_stream_is_charged_its_reasoning(
    proxy: Running, upstream: DemoUpstream, redis: Redis, endpoint: str
) -> None:
    """Guarantee: a forwarded request is charged what it cost. A reasoning model bills its
    (invisible) reasoning tokens as output before it writes a visible word; when its stream
    ends without usage (the upstream cut, or a client that hangs up once it has the answer
    and before the usage chunk), the proxy charges tiktoken's count of the visible deltas
    only: 900 reasoning tokens, reserved and billed upstream, are never charged."""
    key = await proxy.account("acme", "1")
    upstream.fault.reasoning_tokens = 900  # within the forwarded cap (1,000: the default)
    upstream.fault.output_tokens = 5
    # chat: role + 5 deltas + finish, then the usage chunk is lost; responses: 4 opening
    # events + 5 deltas + 3 closing ones, then response.completed is lost
    upstream.fault.cut_after_chunks = 7 if endpoint == "chat/completions" else 12
    body: dict[str, Any] = {"model": "o3-mini", "stream": True}
    body.update({"messages": USER} if endpoint == "chat/completions" else {"input": "Describe it."})
    status, text = await post(proxy, key, endpoint, body)
    assert status == 200 and "tok4" in str(text)  # the client got the whole answer
    (entry,) = await usage_entries(redis)
    billed = 10 * Decimal("1.1") + 905 * Decimal("4.4")  # what OpenAI bills: 3,993 micro
    print(f"charged {charged(entry)} micro (estimated={entry['estimated']}); upstream bills {billed}")
    # before: charged 55 micro, estimated
    assert charged(entry) >= billed


async def test_hosted_tool_loops_cannot_overrun_a_balance(start_proxy: Any, upstream: DemoUpstream) -> None:
    """Guarantee: a reservation is a true upper bound. A Responses request with a hosted
    tool (web_search, file_search, mcp, code_interpreter) is reserved at one context window
    of input, but the upstream runs the model once per tool call, each turn re-reading the
    context, and bills the sum (deep-research models report millions of input tokens on a
    200k window). Tool-call fees (web search $10-25/1k calls) are not charged at all."""
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_input_tokens": 2000, "max_tool_calls": 2}}})
    body = {"model": "gpt-4o", "input": "Research this.", "tools": [{"type": "web_search"}], "max_output_tokens": 16}
    reserve = reservation_of(running, "responses", body)  # a window per model turn: 2 tool calls, 3 turns
    key = await running.account("acme", usd(reserve))  # exactly the worst case the proxy sees
    upstream.fault.prompt_tokens = 6000  # three model turns over a 2,000-token context
    upstream.fault.output_tokens = 16
    status, _ = await post(running, key, "responses", body)
    view = await running.balance("acme")
    print(f"reserved {reserve} micro; status {status}; balance {view.balance}")
    # before: reserved 5,160 micro (one window), charged 15,160: balance -$0.01
    assert upstream.requests[-1].body["max_tool_calls"] == 2  # the turns reserved are the turns allowed
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


async def test_hosted_tools_are_refused_where_the_operator_allowed_none(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    """Guarantee: what cannot be bounded is refused, free. Without `max_tool_calls` on the
    model, a hosted tool's calls are unbounded: a 400, nothing forwarded or charged."""
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_input_tokens": 2000}}})
    key = await running.account("acme", "1")
    body = {"model": "gpt-4o", "input": "Research this.", "tools": [{"type": "web_search"}]}
    status, reply = await post(running, key, "responses", body)
    assert status == 400 and reply["error"]["param"] == "tools[0]", reply
    assert upstream.requests == [] and (await running.balance("acme")).balance == 1_000_000


async def test_encrypted_reasoning_passed_back_is_reserved(proxy: Running, upstream: DemoUpstream) -> None:
    """Guarantee: a reservation is a true upper bound. A Responses `reasoning` item passed
    back (stateless multi-turn with `include: ["reasoning.encrypted_content"]`) carries the
    earlier reasoning encrypted; the upstream decrypts it into the context and bills it as
    input (medium confidence: reasoning kept in context between a function call and its
    output is input). prompts.py skips `encrypted_content` as opaque: 0 tokens. Its byte
    length is an upper bound of what it can decrypt to."""
    key = await proxy.account("acme", "0.001")
    upstream.fault.prompt_tokens = 8000  # the reasoning decrypted: ~32k chars of text
    encrypted = base64.b64encode(bytes(range(256)) * 120).decode()  # 40,960 chars
    body = {"model": "o3-mini", "max_output_tokens": 16, "input": [
        {"role": "user", "content": "What is 6 x 7? Use the tool."},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": encrypted},
        {"type": "function_call", "call_id": "call_1", "name": "multiply", "arguments": '{"a":6,"b":7}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    ]}  # fmt: skip
    status, _ = await post(proxy, key, "responses", body)
    view = await proxy.balance("acme")
    print(f"reserved {reservation_of(proxy, 'responses', body)} micro; status {status}; balance {view.balance}")
    # before: reserved 115 micro, charged 8,822: balance -$0.007822
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "file", "file": {"file_id": "file-abc123"}, "text": ""},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}, "text": None},
    ],
    ids=["file", "input_audio"],
)
async def test_a_stray_text_key_does_not_hide_an_uncountable_part(
    start_proxy: Any, upstream: DemoUpstream, part: dict[str, Any]
) -> None:
    """Guarantee: parts that cannot be counted are reserved at the context window. The chat
    walker classifies a part as text when it has a `text` key, before looking at its type:
    a PDF by `file_id` with `"text": ""` is counted as 0 tokens. (OpenAI itself likely
    rejects the unknown key; lenient OpenAI-compatible servers such as vLLM accept and
    ignore it: low-medium confidence that a real upstream serves it.)"""
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_input_tokens": 200_000}}})
    key = await running.account("acme", "0.01")
    upstream.fault.prompt_tokens = 50_000  # the PDF (or the audio) as the upstream bills it
    body = {"model": "gpt-4o", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Summarise."}, part]}]}  # fmt: skip
    status, _ = await post(running, key, "chat/completions", body)
    view = await running.balance("acme")
    print(f"reserved {reservation_of(running, 'chat', body)} micro; status {status}; balance {view.balance}")
    # before: reserved ~100 micro, charged 125,050: balance -$0.115 (without the key: 402)
    assert view.balance >= 0, f"balance went to {usd(view.balance)}"


async def test_an_unpriced_service_tier_is_not_forwarded_at_the_standard_price(
    proxy: Running, upstream: DemoUpstream
) -> None:
    """Guarantee: a request is reserved at the prices of the tier it asks for. An operator
    who configured no `service_tiers` (the default) forwards `service_tier: priority`
    unchanged, OpenAI serves and bills it at ~1.7-2x, and the proxy charges the standard
    price: every priority request loses the operator money. It should be a 400 (param
    `service_tier`) or be sent at a tier the proxy can price."""
    key = await proxy.account("acme", "1")
    upstream.fault.service_tier = "priority"
    status, reply = await post(proxy, key, "chat/completions", {"model": "gpt-4o", "messages": USER,
                                                                 "service_tier": "priority"})  # fmt: skip
    forwarded = upstream.requests[-1].body.get("service_tier") if upstream.requests else None
    # before: 200, forwarded as priority, charged at the standard price
    assert (status == 400 and reply["error"]["param"] == "service_tier") or forwarded != "priority"


@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
async def test_a_max_tokens_past_the_exact_range_is_a_400(proxy: Running, upstream: DemoUpstream, value: int) -> None:
    """Guarantee: bad input gets an OpenAI-shaped 400. A max-tokens field above 2^53 leaves
    the range Lua computes exactly in; past 2^63 the TPM check's reply wraps to
    -9223372036854775808 and the client gets a *retryable* 429 "Rate limit reached ...
    Requested -9223372036854775808 ... try again in 1m0s" (the SDK retries it twice)."""
    key = await proxy.account("acme", "1")
    body = {"model": "o3-mini", "messages": USER, "max_completion_tokens": value}  # o3-mini: no output limit
    status, reply = await post(proxy, key, "chat/completions", body)
    print(status, reply)
    assert upstream.requests == []
    assert status == 400 and reply["error"]["param"] == "max_completion_tokens"


async def test_a_funded_account_cannot_opt_into_free_downgrades(start_proxy: Any, upstream: DemoUpstream) -> None:
    """Guarantee: `on_exhausted.downgrade_to` serves an account whose money is gone, free.
    admit.lua downgrades whenever THIS request's reservation exceeds the balance, so an
    account holding its whole $20 allocation asks for `n: 128` (128 x 16,384 gpt-4o tokens
    = $21 reserved) and is served gpt-4o-mini at up to 128 x 16,384 tokens, at no charge,
    as often as it likes, with its $20 untouched."""
    plans = {"plans": {"plus": {"allocation": {"amount_usd": "20", "every": "month"},
                                "on_exhausted": {"downgrade_to": "gpt-4o-mini"}}}}  # fmt: skip
    running: Running = await start_proxy(plans)
    key = await running.account("acme", None, plan="plus")
    upstream.fault.real_choices = True
    upstream.fault.output_tokens = 1000
    status, reply = await post(running, key, "chat/completions", {"model": "gpt-4o", "messages": USER, "n": 128})
    view = await running.balance("acme")
    served = status == 200 and len(reply["choices"]) == 128
    print(f"status {status}; forwarded {[r.body['model'] for r in upstream.requests]}; balance {usd(view.balance)}")
    # before: 128 x 1,000 gpt-4o-mini tokens ($0.077 of upstream cost) served free; balance $20
    assert not served or view.balance < 20_000_000, "served free while the account could pay"


async def test_a_prompt_above_the_configured_window_cannot_overrun_a_balance(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    """Guarantee: a reservation is a true upper bound. `_reserved_prompt` caps a counted
    prompt's reservation at the model's `max_input_tokens` but never refuses a prompt that
    is longer: an operator whose `max_input_tokens` is below the real window (a typo, a
    stale catalog entry, a model whose window grew: gpt-4.1 is 1M) reserves a 14k-token
    prompt at 1,000 tokens, and the upstream bills all 14k."""
    running: Running = await start_proxy({"models": {"gpt-4o": {"max_input_tokens": 1000}}})
    text = " ".join(f"word{i}" for i in range(5000))
    body = {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}
    key = await running.account("acme", "0.0026")  # before: the 1,000-token reservation (2,550 micro) fit
    upstream.fault.count_prompt = True
    status, reply = await post(running, key, "chat/completions", body)
    view = await running.balance("acme")
    print(f"real prompt {real_prompt_tokens(body)} tokens; status {status}; {view.balance}")
    # before: reserved 2,550 micro (1,000 prompt tokens), charged 35,068: balance -$0.032518
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
    assert upstream.requests == [] and view.balance == 2_600


# ---------------------------------------------------------------------------------------
# REGRESSION TABLE: attacks tried that held on this code (they pass, and must keep passing)
# ---------------------------------------------------------------------------------------


async def test_regression_concurrency_on_two_instances_and_many_keys(start_proxy: Any, upstream: DemoUpstream) -> None:
    """HOLDS. 100 concurrent requests through two instances and five keys of one nearly
    empty account: the balance never goes below zero, nothing stays reserved and every
    charge is the upstream's exact bill."""
    first: Running = await start_proxy()
    second: Running = await start_proxy()
    body = {"model": "gpt-4o", "messages": USER, "max_tokens": 100}
    reserve = reservation_of(first, "chat", body)
    keys = [await first.account("acme", usd(3 * reserve + reserve - 1))]
    keys += [(await first.state.key_store.create_key("acme", name=f"k{i}"))[1] for i in range(4)]
    upstream.fault.output_tokens = 100  # each bills 10 x 2.5 + 100 x 10 = 1,025 micro

    async def one(i: int) -> int:
        return (await post((first, second)[i % 2], keys[i % 5], "chat/completions", body))[0]

    results = await asyncio.gather(*(one(i) for i in range(100)))
    view = await first.balance("acme")
    served = results.count(200)
    assert set(results) <= {200, 402} and served >= 3
    assert view.reserved == 0 and view.balance >= 0
    assert view.balance == 4 * reserve - 1 - served * 1025


@pytest.mark.parametrize(("raw_cap", "kept"), [(b'"max_tokens":5,"max_tokens":100000', 16384),
                                                (b'"max_tokens":100000,"max_tokens":5', 5)])  # fmt: skip
async def test_regression_duplicate_keys_reserve_what_is_forwarded(
    proxy: Running, upstream: DemoUpstream, redis: Redis, raw_cap: bytes, kept: int
) -> None:
    """HOLDS. A JSON object naming `max_tokens` twice: orjson keeps the last, and the body
    is re-serialised before it goes upstream, so the upstream reads exactly the value
    reserved (lowered to the model's limit), whichever one a different parser would keep."""
    key = await proxy.account("acme", "1")
    raw = b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],' + raw_cap + b"}"
    status, _ = await post(proxy, key, "chat/completions", None, raw=raw)
    assert status == 200 and upstream.requests[-1].body["max_tokens"] == kept
    (entry,) = await usage_entries(redis)
    assert int(entry["reserved"]) >= kept * 10


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 5.0), ("max_tokens", "5"), ("max_tokens", True),
     ("max_tokens", [5]), ("max_completion_tokens", 2**64), ("max_completion_tokens", 0.5), ("n", 0), ("n", 129),
     ("n", 2.0), ("n", "2"), ("stream", "true"), ("model", 5), ("messages", {}), ("messages", [])],
)  # fmt: skip
async def test_regression_bad_fields_are_free_400s(
    proxy: Running, upstream: DemoUpstream, field: str, value: Any
) -> None:
    """HOLDS. Max-token fields and `n` that are not positive integers in range (floats
    like 5.0, strings, booleans, 2^64 which orjson reads as a float), and malformed core
    fields: an OpenAI-shaped 400 before anything is reserved or forwarded."""
    key = await proxy.account("acme", "1")
    status, reply = await post(proxy, key, "chat/completions", {"model": "gpt-4o", "messages": USER, field: value})
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []
    view = await proxy.balance("acme")
    assert (view.balance, view.reserved) == (1_000_000, 0)


async def test_regression_explicit_null_caps_still_forward_the_reserved_cap(
    proxy: Running, upstream: DemoUpstream
) -> None:
    """HOLDS. `max_tokens: null` and `max_completion_tokens: null` count as absent: the
    reserved cap (the model's limit) is still forwarded."""
    key = await proxy.account("acme", "1")
    body = {"model": "gpt-4o", "messages": USER, "max_tokens": None, "max_completion_tokens": None}
    status, _ = await post(proxy, key, "chat/completions", body)
    assert status == 200 and upstream.requests[-1].body["max_completion_tokens"] == 16384


async def test_regression_tiny_charges_with_a_long_markup_sum_exactly(
    start_proxy: Any, upstream: DemoUpstream, redis: Redis
) -> None:
    """HOLDS. 300 embeddings of 1-13 tokens at $0.02/1M with a 33.333333% markup
    (0.02666666666 micro-USD per token; markups take at most 6 decimals): the charges add up to the exact sum within one
    micro-dollar (the sub-micro remainder is carried per account)."""
    running: Running = await start_proxy({"billing": {"markup_percent": "33.333333"}})
    key = await running.account("acme", "1")
    client = running.client(key)
    exact = Decimal(0)
    rate = Decimal("0.02") * (1 + Decimal("33.333333") / 100)
    for i in range(300):
        upstream.fault.prompt_tokens = 1 + i % 13
        exact += upstream.fault.prompt_tokens * rate
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    view = await running.balance("acme")
    assert abs(Decimal(1_000_000 - view.balance) - exact) <= 1
    logged = [e for e in await usage_entries(redis)]
    assert len(logged) == 300 and sum(charged(e) for e in logged) == 1_000_000 - view.balance


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("affords", [1, 7, 99])
async def test_regression_clamp_at_the_boundary(start_proxy: Any, upstream: DemoUpstream, n: int, affords: int) -> None:
    """HOLDS. Clamp mode with a balance of exactly the prompt's reservation plus `affords`
    output tokens per choice: the forwarded cap is what the balance affords, and an
    upstream that writes every token of it (n choices, all billed) leaves the balance >= 0."""
    running: Running = await start_proxy({"billing": {"on_insufficient": "clamp"}})
    body = {"model": "gpt-4o", "messages": USER, "max_tokens": 10_000, "n": n}
    r = running.state.catalog.route("gpt-4o").reservation(intake.parse("chat", orjson.dumps(body)))
    key = await running.account("acme", usd(r.prompt_cost + affords * n * 10))
    upstream.fault.real_choices = True
    upstream.fault.output_tokens = 10_000
    upstream.fault.prompt_tokens = r.reserved_prompt_tokens  # the prompt at its worst case
    status, _ = await post(running, key, "chat/completions", body)
    view = await running.balance("acme")
    assert status == 200 and 1 <= upstream.requests[-1].body["max_tokens"] <= affords
    assert view.balance >= 0 and view.reserved == 0


@pytest.mark.parametrize("read", [0, 1, 3])
async def test_regression_a_stream_abandoned_is_settled_once(
    proxy: Running, upstream: DemoUpstream, redis: Redis, read: int
) -> None:
    """HOLDS. A client that hangs up after 0, 1 or 3 events of a stream: exactly one usage
    entry, nothing left reserved, the balance the sum of the ledger."""
    key = await proxy.account("acme", "1")
    upstream.fault.output_tokens = 50
    after = await last_entry_id(redis, "acme")
    body = {"model": "gpt-4o", "messages": USER, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{proxy.url}/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        for _ in range(read):
            await resp.content.readline()
            await resp.content.readline()
        resp.close()  # drop the connection
    entry = await next_entry(redis, "acme", after)
    assert entry["type"] == "usage"
    view = await proxy.balance("acme")
    assert view.reserved == 0 and view.balance == 1_000_000 - charged(entry) >= 0
    assert len(await usage_entries(redis)) == 1


async def test_regression_images_on_gpt_4o_hold_at_the_worst_case(proxy: Running, upstream: DemoUpstream) -> None:
    """HOLDS for gpt-4o (a tile model with 85 + 170/tile): ten high-detail images billed at
    their largest size (1,445 tokens each) fit the reservation exactly funded."""
    upstream.fault.bill_images = True
    image = {"type": "image_url", "image_url": {"url": IMAGE}}
    body = {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": [image] * 10}]}
    key = await proxy.account("acme", usd(reservation_of(proxy, "chat", body)))
    status, _ = await post(proxy, key, "chat/completions", body)
    view = await proxy.balance("acme")
    assert status == 200 and view.balance >= 0


async def test_regression_n_choices_and_input_text_parts_are_reserved(proxy: Running, upstream: DemoUpstream) -> None:
    """HOLDS. `n: 4` is reserved 4 x the cap (the upstream writes and bills all four), and
    an `input_text` part inside a chat message (a Responses shape) is counted as text."""
    text = " ".join(f"word{i}" for i in range(3000))
    body = {"model": "gpt-4o", "max_tokens": 100, "n": 4,
            "messages": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}  # fmt: skip
    key = await proxy.account("acme", usd(reservation_of(proxy, "chat", body)))
    upstream.fault.real_choices = True
    upstream.fault.output_tokens = 100
    upstream.fault.count_prompt = True
    assert real_prompt_tokens(body) > 3000
    status, reply = await post(proxy, key, "chat/completions", body)
    view = await proxy.balance("acme")
    assert status == 200 and len(reply["choices"]) == 4
    assert view.balance >= 0 and view.reserved == 0


async def test_regression_a_flat_token_array_is_one_prompt(proxy: Running, upstream: DemoUpstream) -> None:
    """HOLDS. A completions `prompt` of token ids ([int], not a batch) is one prompt of as
    many tokens, reserved exactly."""
    body = {"model": "gpt-4o", "prompt": list(range(1000, 5000)), "max_tokens": 5}
    key = await proxy.account("acme", usd(reservation_of(proxy, "completions", body)))
    upstream.fault.real_choices = True
    upstream.fault.prompt_tokens = 4000
    status, _ = await post(proxy, key, "completions", body)
    view = await proxy.balance("acme")
    assert status == 200 and view.balance >= 0
