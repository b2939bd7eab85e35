"""`GET /v1/generation?id=` and the admin's `.../generations/{request_id}`: one request of
an account, its figures the ledger's own, never another account's."""

from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal
from typing import Any

import openai
import orjson
from redis.asyncio import Redis

from proxy import keyspace
from proxy.config import Config
from proxy.ledger import Checkpoint, Ledger, SettleCall
from proxy.money import usd
from proxy.service import Service
from proxy.testing.upstream import DemoUpstream
from proxy.views import rfc3339

from .conftest import Running
from .helpers import entries, get

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


async def generation(client: openai.AsyncOpenAI, request_id: str) -> Any:
    """Through the official SDK, as a customer would."""
    return await client.get("/generation", cast_to=object, options={"params": {"id": request_id}})


async def settlement_of(redis: Redis, account_id: str, request_id: str) -> tuple[str, dict[str, Any]]:
    """The ledger entry a request's settlement wrote: (stream id, entry)."""
    rows = await redis.xrange(keyspace.account(account_id, "ledger"))
    (found,) = [(i, orjson.loads(f["e"])) for i, f in rows if orjson.loads(f["e"]).get("request_id") == request_id]
    return found


def assert_matches_entry(found: dict[str, Any], entry_id: str, entry: dict[str, Any]) -> None:
    assert found["ledger_entry_id"] == entry_id
    assert found["status"] == ("released" if entry["type"] == "release" else "settled")
    assert found["model"] == entry["model"] and found["key_id"] == entry["key_id"]
    assert found["usage"] == entry.get("usage")
    assert found["cost_usd"] == usd(-int(entry["amount"]))
    assert found["estimated"] is bool(entry.get("estimated"))
    assert found["reserved_usd"] == usd(int(entry["reserved"]))
    assert found["settled_at"] == rfc3339(entry["ts"])
    assert found["created_at"] == rfc3339(entry["admitted"]) and entry["admitted"] <= entry["ts"]


async def test_a_chat_request_shows_its_ledger_entrys_figures(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens = 100, 40
    upstream.fault.output_tokens, upstream.fault.reasoning_tokens = 6, 3
    client = proxy.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    found = await generation(client, request_id)
    entry_id, entry = await settlement_of(proxy.state.redis, "acme", request_id)
    assert_matches_entry(found, entry_id, entry)
    # (100-40) x 2.50 + 40 x 1.25 + 9 x 10.00 = 150 + 50 + 90 micro-USD
    assert found["cost_usd"] == raw.headers["x-metering-cost-usd"] == "0.000290"
    assert found["usage"] == {"input_tokens": 100, "cached_input_tokens": 40, "output_tokens": 9,
                              "reasoning_tokens": 3}  # fmt: skip
    assert (found["id"], found["object"], found["account_id"]) == (request_id, "generation", "acme")


async def test_a_stream_and_an_embedding_show_theirs(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 30, 4
    client = proxy.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    streamed = raw.headers["x-request-id"]
    [chunk async for chunk in raw.parse()]
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    embedded = raw.headers["x-request-id"]
    for request_id in (streamed, embedded):
        found = await generation(client, request_id)
        assert_matches_entry(found, *await settlement_of(proxy.state.redis, "acme", request_id))
    assert (await generation(client, streamed))["usage"]["output_tokens"] == 4
    # 30 x 0.02 micro-USD: 0.6, rounded half-up with the account's carry
    assert (await generation(client, embedded))["cost_usd"] == raw.headers["x-metering-cost-usd"] == "0.000001"


async def test_another_accounts_request_is_the_same_404_as_an_unknown_one(
    proxy: Running, upstream: DemoUpstream
) -> None:
    mine, theirs = await proxy.account("acme", "10"), await proxy.account("globex", "10")
    raw = await proxy.client(theirs).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    their_id = raw.headers["x-request-id"]
    unknown_id = "req_" + secrets.token_hex(12)
    status, body = await get(proxy, mine, "generation", {"id": their_id})
    status_unknown, body_unknown = await get(proxy, mine, "generation", {"id": unknown_id})
    assert status == status_unknown == 404
    assert body["error"]["code"] == "not_found" and body["error"]["type"] == "invalid_request_error"
    assert orjson.dumps(body).replace(their_id.encode(), b"ID") == orjson.dumps(body_unknown).replace(
        unknown_id.encode(), b"ID"
    )
    assert (await get(proxy, theirs, "generation", {"id": their_id}))[0] == 200  # it exists: for its owner
    code, _ = await proxy.admin("GET", f"/admin/v1/accounts/acme/generations/{their_id}")
    assert code == 404  # nor through the admin API under another account


async def test_a_request_in_flight_is_in_progress_then_settled(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.hold_after_chunks = 2
    client = proxy.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, stream=True)
    request_id = raw.headers["x-request-id"]
    await asyncio.wait_for(upstream.holding.wait(), 10)
    running = await generation(client, request_id)
    view = await proxy.balance("acme")
    assert running["status"] == "in_progress" and view.reserved > 0
    assert running["reserved_usd"] == usd(view.reserved)
    assert (running["usage"], running["cost_usd"], running["estimated"], running["settled_at"]) == (None,) * 4
    assert running["model"] == "gpt-4o" and running["created_at"] is not None
    upstream.release.set()
    [chunk async for chunk in raw.parse()]
    done = await generation(client, request_id)
    assert done["status"] == "settled" and done["created_at"] == running["created_at"]
    assert_matches_entry(done, *await settlement_of(proxy.state.redis, "acme", request_id))


async def test_an_upstream_error_is_released_at_no_charge(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.status = 500
    client = proxy.client(key)
    try:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        raise AssertionError("the upstream's 500 must reach the client")
    except openai.InternalServerError as exc:
        request_id = exc.response.headers["x-request-id"]
    found = await generation(client, request_id)
    assert (found["status"], found["cost_usd"], found["usage"]) == ("released", "0.000000", None)
    assert found["description"] == "nothing charged: upstream status 500"
    assert_matches_entry(found, *await settlement_of(proxy.state.redis, "acme", request_id))


async def test_a_downgraded_request_costs_nothing_and_names_the_model_asked(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    plans = {"plans": {"plus": {"allocation": {"amount_usd": "20", "every": "month"},
                                "on_exhausted": {"downgrade_to": "gpt-4o-mini"}}}}  # fmt: skip
    running: Running = await start_proxy(plans)
    key = await running.account("acme", None, plan="plus")
    await running.state.ledger.adjust("acme", {"amount": "-20000000", "description": "used up", "idem": "used"})
    client = running.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    found = await generation(client, raw.headers["x-request-id"])
    assert (found["model"], found["downgraded_from"], found["cost_usd"]) == ("gpt-4o-mini", "gpt-4o", "0.000000")
    assert raw.parse().usage.model_extra["cost_usd"] == "0.000000"  # type: ignore[union-attr]


async def test_the_admin_api_and_the_cli_show_the_same(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    client = proxy.client(key)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    status, admin = await proxy.admin("GET", f"/admin/v1/accounts/acme/generations/{request_id}")
    assert status == 200 and admin == await generation(client, request_id)
    assert (await proxy.admin("GET", f"/admin/v1/accounts/nobody/generations/{request_id}"))[0] == 404
    status, bad = await proxy.admin("GET", "/admin/v1/accounts/acme/generations/req_x!y")
    assert status == 400 and bad["error"]["param"] == "id"
    shown = await Service.of(proxy.state).generation("acme", {"id": request_id})  # what the CLI prints
    assert shown == admin


async def test_bad_ids_and_revoked_keys(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    for params in ({}, {"id": ""}, {"id": "chatcmpl-123"}, {"id": "req_" + "a" * 65}, {"id": "req_1", "x": "1"}):
        status, body = await get(proxy, key, "generation", params)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (params, body)
    (key_id,) = await proxy.state.redis.hkeys(keyspace.account("acme", "keys"))
    await proxy.state.key_store.revoke_key(key_id)
    status, body = await get(proxy, key, "generation", {"id": "req_" + "0" * 24})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_a_request_of_a_dead_proxy_shows_its_checkpoint_then_its_late_settlement(
    proxy: Running, redis: Redis
) -> None:
    """Reaped at its checkpoint: settled, estimated, at what the reaper charged; a late
    settlement charges the rest, and the generation shows both together."""
    key = await proxy.account("acme", "10")
    config: Config = proxy.state.config
    ledger = Ledger(redis, config)  # a clock of its own: the proxy's worker keeps real time
    (key_id,) = await redis.hkeys(keyspace.account("acme", "keys"))
    request_id = "req_" + secrets.token_hex(12)
    await ledger.admit("acme", key_id, "gpt-4o", request_id, prompt_cost=5000, output_cost=5000, output_pico=0,
                       prompt_tokens=100, max_output_tokens=500, choices=1)  # fmt: skip
    usage_so_far = {"input_tokens": 100, "cached_input_tokens": 0, "output_tokens": 20, "reasoning_tokens": 0}
    await ledger.extend("acme", [Checkpoint(request_id, Decimal(450), usage_so_far)])
    ledger.clock_offset_ms = (config.billing.reservation_ttl_s + 1) * 1000
    assert (await ledger.reap("acme")).closed == 1
    reaped = await generation(proxy.client(key), request_id)
    assert (reaped["status"], reaped["cost_usd"], reaped["estimated"]) == ("settled", "0.000450", True)
    assert reaped["usage"] == usage_so_far and reaped["key_id"] == key_id and reaped["ledger_entry_id"] is None
    usage = {**usage_so_far, "output_tokens": 30}
    entry = {"model": "gpt-4o", "key_id": key_id, "usage": usage, "estimated": False}
    await ledger.settle(SettleCall("acme", "gpt-4o", request_id, Decimal(550), 130, entry))
    late = await generation(proxy.client(key), request_id)
    assert (late["status"], late["cost_usd"], late["estimated"], late["usage"]) == ("settled", "0.000550", False, usage)
    charged = [int(e["amount"]) for e in await entries(redis, "acme") if e.get("request_id") == request_id]
    assert charged == [-450, -100] and usd(-sum(charged)) == late["cost_usd"]
