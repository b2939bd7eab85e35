"""The admin API over HTTP: token, accounts, keys, credits, ledger, usage, OpenAPI."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import openai
import pytest

from proxy import admin, keyspace, money, pages, service
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import entries

PLANS = {
    "plans": {
        "free": {"allocation": {"amount_usd": "5", "every": "month"}},
        "pro": {"overage": {"limit_usd": None}},
    }
}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def new_account(proxy: Running, account_id: str = "acme", **body: Any) -> dict[str, Any]:
    status, created = await proxy.admin("POST", "/admin/v1/accounts", {"id": account_id, **body})
    assert status == 201, created
    return created  # type: ignore[no-any-return]


async def grant(proxy: Running, usd: Any, account_id: str = "acme", **body: Any) -> tuple[int, Any]:
    return await proxy.admin(
        "POST", f"/admin/v1/accounts/{account_id}/credits", {"amount_usd": usd, "kind": "paid", **body}
    )


async def raw_request(proxy: Running, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{proxy.admin_url}{path}", **kwargs) as resp:
            return resp.status, await resp.text()


async def test_admin_token_is_required(proxy: Running) -> None:
    status, text = await raw_request(proxy, "GET", "/admin/v1/accounts")
    assert status == 401 and '"code":"invalid_api_key"' in text
    status, body = await proxy.admin("GET", "/admin/v1/accounts", token="wrong-token")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = await proxy.admin("GET", "/admin/v1/accounts", token="test-admin-token-123x")
    assert status == 401
    for public in ("/healthz", "/readyz", "/metrics"):
        assert (await raw_request(proxy, "GET", public))[0] == 200
    status, body = await proxy.admin("GET", "/admin/v1/accounts")
    assert status == 200 and body == {"object": "list", "data": [], "next_cursor": None}


async def test_create_account_and_duplicate(proxy: Running) -> None:
    created = await new_account(proxy, metadata={"crm": "c_1", "seats": 3.5}, overage_limit_usd="2.5")
    assert created["id"] == "acme" and created["status"] == "active" and created["plan"] is None
    assert created["balance_usd"] == "0.000000" and created["grants"] == []
    assert created["overage_limit_usd"] == "2.500000" and created["metadata"] == {"crm": "c_1", "seats": 3.5}
    status, body = await proxy.admin("POST", "/admin/v1/accounts", {"id": "acme"})
    assert status == 400 and body["error"]["code"] == "account_exists"
    status, body = await proxy.admin("POST", "/admin/v1/accounts", {"id": "no spaces"})
    assert status == 400 and body["error"]["param"] == "id"
    status, body = await proxy.admin("POST", "/admin/v1/accounts", {"id": "b", "colour": "red"})
    assert status == 400 and "colour: unknown field" in body["error"]["message"]
    status, body = await proxy.admin("GET", "/admin/v1/accounts/nobody")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert [a["id"] for a in (await proxy.admin("GET", "/admin/v1/accounts"))[1]["data"]] == ["acme"]


async def test_default_plan_applies_unless_null(start_proxy: Any) -> None:
    running = await start_proxy({**PLANS, "default_plan": "free"})
    created = await new_account(running, "a")
    assert created["plan"] == "free" and created["balance_usd"] == "5.000000"  # the month's allocation
    assert (await new_account(running, "b", plan=None))["plan"] is None
    assert (await new_account(running, "c", plan="pro"))["plan"] == "pro"
    status, body = await running.admin("POST", "/admin/v1/accounts", {"id": "d", "plan": "gold"})
    assert status == 400 and body["error"]["param"] == "plan"


async def test_key_shown_once_works_and_revokes(proxy: Running, upstream: DemoUpstream) -> None:
    await new_account(proxy)
    await grant(proxy, "10")
    status, key = await proxy.admin("POST", "/admin/v1/accounts/acme/keys", {"name": "ci"})
    assert status == 201 and key["key"].startswith("sk-mp-") and key["id"].startswith("key_")
    completion = await proxy.client(key["key"]).chat.completions.create(model="gpt-4o-mini", **CHAT)
    assert completion.usage is not None
    status, listed = await proxy.admin("GET", "/admin/v1/accounts/acme/keys")
    (shown,) = listed["data"]
    assert {name: shown[name] for name in ("id", "name", "status", "allowed_models", "limit_usd")} == {
        "id": key["id"], "name": "ci", "status": "active", "allowed_models": None, "limit_usd": None}  # fmt: skip
    spent = -sum(int(e["amount"]) for e in await entries(proxy.state.redis, "acme") if e.get("key_id") == key["id"])
    assert "key" not in shown and spent > 0 and shown["usage_usd"]["total"] == money.usd(spent)
    for name in await proxy.state.redis.keys("*"):  # only the hash is stored
        kind = await proxy.state.redis.type(name)
        assert kind != "string" or key["key"] not in (await proxy.state.redis.get(name) or "")
    status, revoked = await proxy.admin("DELETE", f"/admin/v1/keys/{key['id']}")
    assert status == 200 and revoked["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(key["key"]).chat.completions.create(model="gpt-4o-mini", **CHAT)
    assert (await proxy.admin("DELETE", "/admin/v1/keys/key_nope"))[0] == 404
    status, body = await proxy.admin("POST", "/admin/v1/accounts/acme/keys", {"allowed_models": ["gpt-5"]})
    assert status == 400 and body["error"]["param"] == "allowed_models"


async def test_grant_is_idempotent_by_key(proxy: Running) -> None:
    await new_account(proxy)
    status, first = await grant(proxy, "10", idempotency_key="order-1", description="pack")
    assert status == 201 and first["amount_usd"] == "10.000000" and first["status"] == "active"
    status, again = await grant(proxy, "10", idempotency_key="order-1", description="pack")
    assert status == 200 and again == first
    status, body = await grant(proxy, "11", idempotency_key="order-1")
    assert status == 400 and body["error"]["code"] == "idempotency_key_reused"
    status, balance = await proxy.admin("GET", "/admin/v1/accounts/acme/balance")
    assert balance["balance_usd"] == "10.000000" and len(balance["grants"]) == 1


async def test_grant_idempotent_under_20_concurrent_posts(proxy: Running) -> None:
    await new_account(proxy)
    results = await asyncio.gather(*(grant(proxy, "7.5", idempotency_key="same") for _ in range(20)))
    assert sorted(status for status, _ in results) == [200] * 19 + [201]
    assert len({body["id"] for _, body in results}) == 1
    status, balance = await proxy.admin("GET", "/admin/v1/accounts/acme/balance")
    assert status == 200 and balance["balance_usd"] == "7.500000"
    assert [e["type"] for e in await entries(proxy.state.redis, "acme")] == ["grant"]


@pytest.mark.parametrize(
    ("amount", "param"),
    [
        ("1.0000001", "amount_usd"),
        ("-1", "amount_usd"),
        ("0", "amount_usd"),
        ("abc", "amount_usd"),
        (True, "amount_usd"),
    ],
)
async def test_grant_rejects_bad_amounts(proxy: Running, amount: Any, param: str) -> None:
    await new_account(proxy)
    status, body = await grant(proxy, amount)
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


async def test_grant_numbers_are_exact_and_times_checked(proxy: Running) -> None:
    await new_account(proxy)
    # a JSON number is parsed as a decimal, never through a float
    status, text = await raw_request(
        proxy, "POST", "/admin/v1/accounts/acme/credits", data=b'{"amount_usd": 0.1, "kind": "promotional"}',
        headers={"Authorization": "Bearer test-admin-token-123"},
    )  # fmt: skip
    assert status == 201 and '"amount_usd":"0.100000"' in text
    status, body = await grant(proxy, "1", expires_at="2001-01-01T00:00:00Z")
    assert status == 400 and "expires_at" in body["error"]["message"]
    status, body = await grant(proxy, "1", expires_at="next tuesday")
    assert status == 400 and body["error"]["param"] == "expires_at"
    status, body = await grant(proxy, "1", expires_at="1960-01-01T00:00:00Z")  # 0 or less means "never"
    assert status == 400 and body["error"]["param"] == "expires_at"
    status, future = await grant(
        proxy, "2", effective_at="2999-01-01T00:00:00Z", priority=-1, per_unit_cost_basis="0.9"
    )
    assert status == 201 and future["status"] == "pending" and future["effective_at"] == "2999-01-01T00:00:00.000Z"
    assert future["per_unit_cost_basis"] == "0.9" and future["priority"] == -1
    status, balance = await proxy.admin("GET", "/admin/v1/accounts/acme/balance")
    assert balance["balance_usd"] == "0.100000"


async def test_bad_json_and_unexpected_errors_are_openai_shaped(
    proxy: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = {"Authorization": "Bearer test-admin-token-123"}
    for data in (b"{nope", b"[1, 2]", b'{"id": NaN}'):
        status, text = await raw_request(proxy, "POST", "/admin/v1/accounts", data=data, headers=auth)
        assert status == 400 and '"type":"invalid_request_error"' in text
    status, body = await proxy.admin("GET", "/admin/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = await proxy.admin("PUT", "/admin/v1/accounts")
    assert status == 405 and "error" in body

    async def boom(*_: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.Service, "balance", boom)
    await new_account(proxy)
    status, text = await raw_request(proxy, "GET", "/admin/v1/accounts/acme/balance", headers=auth)
    assert status == 500 and '"code":"internal_error"' in text
    assert "Traceback" not in text and "secret internals" not in text


async def test_void_twice_is_a_noop(proxy: Running) -> None:
    await new_account(proxy)
    await grant(proxy, "10")
    _, refund = await grant(proxy, "5")
    path = f"/admin/v1/accounts/acme/credits/{refund['id']}/void"
    status, voided = await proxy.admin("POST", path, {"reason": "refund"})
    assert status == 200 and voided["status"] == "voided" and voided["void_reason"] == "refund"
    status, again = await proxy.admin("POST", path, {"reason": "again"})
    assert status == 200 and again == voided
    _, balance = await proxy.admin("GET", "/admin/v1/accounts/acme/balance")
    assert balance["balance_usd"] == "10.000000"
    types = [e["type"] for e in await entries(proxy.state.redis, "acme")]
    assert types == ["grant", "grant", "void"]
    assert (await proxy.admin("POST", "/admin/v1/accounts/acme/credits/grant_nope/void", {}))[0] == 404


@pytest.mark.parametrize("count", [7, 9])
async def test_ledger_cursor_walks_every_entry_once(proxy: Running, count: int) -> None:
    await new_account(proxy)
    for i in range(count):
        await grant(proxy, f"{i + 1}")
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"?limit=3&cursor={cursor}" if cursor else "?limit=3"
        status, page = await proxy.admin("GET", f"/admin/v1/accounts/acme/ledger{query}")
        assert status == 200 and len(page["entries"]) <= 3
        seen += [e["id"] for e in page["entries"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == (count + 2) // 3 + (count % 3 == 0)  # a full last page is followed by an empty one
    full = await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?limit=1000")
    assert seen == [e["id"] for e in full[1]["entries"]] and len(seen) == count
    assert [e["amount_usd"] for e in full[1]["entries"]][:2] == ["1.000000", "2.000000"]  # newest last
    assert full[1]["entries"][-1]["balance_usd"] == f"{count * (count + 1) // 2}.000000"
    assert (await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?cursor=bogus"))[0] == 400
    assert (await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?limit=0"))[0] == 400


async def test_ledger_newest_first_pages_back_in_time(proxy: Running) -> None:
    await new_account(proxy)
    for i in range(7):
        await grant(proxy, f"{i + 1}")
    _, full = await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?limit=1000")
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await proxy.admin("GET", f"/admin/v1/accounts/acme/ledger?order=desc&limit=3{cursor}")
        assert status == 200 and len(page["entries"]) <= 3
        seen += [e["id"] for e in page["entries"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [e["id"] for e in reversed(full["entries"])] and len(seen) == 7
    assert (await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?order=sideways"))[0] == 400
    for before_any in ("0-0", "00-000"):
        _, empty = await proxy.admin("GET", f"/admin/v1/accounts/acme/ledger?order=desc&cursor={before_any}")
        assert empty["entries"] == [] and empty["next_cursor"] is None


async def test_accounts_listed_with_balances_searched_and_paged(proxy: Running) -> None:
    for account_id in ("globex", "acme", "Acme-EU", "initech", "umbrella"):
        await new_account(proxy, account_id)
    await grant(proxy, "12.5", "acme")
    status, page = await proxy.admin("GET", "/admin/v1/accounts?limit=2")
    assert status == 200 and [a["id"] for a in page["data"]] == ["Acme-EU", "acme"] and page["next_cursor"] == "acme"
    acme = page["data"][1]
    assert (acme["balance_usd"], acme["available_usd"], acme["tier"], acme["status"]) == (
        "12.500000", "12.500000", "free", "active")  # fmt: skip
    assert "grants" not in acme and acme == {
        k: v for k, v in (await proxy.admin("GET", "/admin/v1/accounts/acme"))[1].items() if k != "grants"
    }
    ids, cursor = [], ""
    while True:
        _, page = await proxy.admin("GET", f"/admin/v1/accounts?limit=2{cursor}")
        ids += [a["id"] for a in page["data"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert ids == ["Acme-EU", "acme", "globex", "initech", "umbrella"]
    _, found = await proxy.admin("GET", "/admin/v1/accounts?query=ACM")
    assert [a["id"] for a in found["data"]] == ["Acme-EU", "acme"] and found["next_cursor"] is None
    assert (await proxy.admin("GET", "/admin/v1/accounts?query=zzz"))[1]["data"] == []
    for bad in ("limit=0", "limit=201", "cursor=no%20spaces", "colour=red"):
        assert (await proxy.admin("GET", f"/admin/v1/accounts?{bad}"))[0] == 400, bad


async def test_usage_grouped_by_model(proxy: Running, upstream: DemoUpstream) -> None:
    await new_account(proxy)
    await grant(proxy, "10")
    _, key = await proxy.admin("POST", "/admin/v1/accounts/acme/keys", {})
    client = proxy.client(key["key"])
    upstream.fault.prompt_tokens, upstream.fault.cached_tokens, upstream.fault.output_tokens = 1000, 400, 7
    for _ in range(2):  # 600 * 2.50 + 400 * 1.25 + 7 * 10.00 = 2070 micro-USD each
        await client.chat.completions.create(model="gpt-4o", **CHAT)
    upstream.fault.cached_tokens, upstream.fault.reasoning_tokens = 0, 3
    await client.chat.completions.create(model="o3-mini", **CHAT)  # 1000 * 1.10 + 10 * 4.40 = 1144
    status, usage = await proxy.admin("GET", "/admin/v1/accounts/acme/usage?group_by=model")
    assert status == 200 and usage["account_id"] == "acme"
    assert usage["groups"] == [
        {"model": "gpt-4o", "requests": 2, "input_tokens": 2000, "cached_input_tokens": 800, "output_tokens": 14,
         "reasoning_tokens": 0, "cost_usd": "0.004140"},
        {"model": "o3-mini", "requests": 1, "input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 10,
         "reasoning_tokens": 3, "cost_usd": "0.001144"},
    ]  # fmt: skip
    _, by_day = await proxy.admin("GET", "/admin/v1/accounts/acme/usage?group_by=model,day")
    assert [(g["model"], g["cost_usd"]) for g in by_day["groups"]] == [("gpt-4o", "0.004140"), ("o3-mini", "0.001144")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", g["day"]) for g in by_day["groups"])
    _, by_day_only = await proxy.admin("GET", "/admin/v1/accounts/acme/usage?group_by=day")
    assert [(g["model"], g["requests"], g["cost_usd"]) for g in by_day_only["groups"]] == [(None, 3, "0.005284")]
    _, past = await proxy.admin(
        "GET", "/admin/v1/accounts/acme/usage?from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z"
    )
    assert past["groups"] == [] and past["from"] == "2020-01-01T00:00:00.000Z"
    status, body = await proxy.admin("GET", "/admin/v1/accounts/acme/usage?from=2020-02-01&to=2020-01-01")
    assert status == 400 and body["error"]["param"] == "from"
    assert (await proxy.admin("GET", "/admin/v1/accounts/acme/usage?group_by=tenant"))[0] == 400


async def test_openapi_lists_every_route(proxy: Running) -> None:
    status, doc = await proxy.admin("GET", "/admin/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    api = [r for r in admin.admin_app().router.routes() if not (r.name or "").startswith(pages.ROUTE_PREFIX)]
    routes = [(r.method, r.resource.canonical) for r in api if r.method != "HEAD"]
    assert len(routes) == len(admin.ROUTES)
    for method, path in routes:
        assert method.lower() in doc["paths"][path], (method, path)
    create = doc["paths"]["/admin/v1/accounts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][create["$ref"].rsplit("/", 1)[1]]
    assert {"id", "plan", "overage_limit_usd", "metadata"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    usage_params = {p["name"] for p in doc["paths"]["/admin/v1/accounts/{account_id}/usage"]["get"]["parameters"]}
    assert usage_params == {"account_id", "from", "to", "group_by"}
    refs = re.findall(r'"\$ref": ?"#/components/schemas/(\w+)"', str(doc).replace("'", '"'))
    assert refs and all(name in doc["components"]["schemas"] for name in refs)
    assert doc["paths"]["/healthz"]["get"]["security"] == []


async def test_patch_account_settings(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy(PLANS)
    await new_account(running)
    await grant(running, "10", account_id="acme")
    _, key = await running.admin("POST", "/admin/v1/accounts/acme/keys", {})
    client = running.client(key["key"])
    path = "/admin/v1/accounts/acme"

    status, acct = await running.admin("PATCH", path, {"plan": "pro", "overage_limit_usd": "unlimited"})
    assert status == 200 and acct["plan"] == "pro" and acct["overage_limit_usd"] == "unlimited"
    assert (await running.admin("PATCH", path, {"plan": "gold"}))[0] == 400
    _, acct = await running.admin("PATCH", path, {"plan": None, "overage_limit_usd": "5"})
    assert acct["plan"] is None and acct["overage_limit_usd"] == "5.000000"
    _, acct = await running.admin("PATCH", path, {"overage_limit_usd": None})
    assert acct["overage_limit_usd"] is None

    _, acct = await running.admin("PATCH", path, {"status": "suspended"})
    assert acct["status"] == "suspended"
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="gpt-4o-mini", **CHAT)
    assert (await running.admin("PATCH", path, {"status": None}))[0] == 400
    await running.admin("PATCH", path, {"status": "active"})

    _, acct = await running.admin("PATCH", path, {"rate_limits": {"rpm": 1}})
    assert acct["rate_limits"]["rpm"] == 1 and acct["rate_limits"]["override"] is True
    await client.chat.completions.create(model="gpt-4o-mini", **CHAT)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", **CHAT)
    _, acct = await running.admin("PATCH", path, {"rate_limits": None})
    assert acct["rate_limits"] == {"rpm": 10000, "tpm": 100000000, "override": False}
    await client.chat.completions.create(model="gpt-4o-mini", **CHAT)

    body = {"auto_topup": {"threshold_usd": "2", "amount_usd": "20"}, "metadata": {"tier": "gold"},
            "low_balance_thresholds_usd": ["1", "5", 5]}  # fmt: skip
    _, acct = await running.admin("PATCH", path, body)
    assert acct["auto_topup"] == {"threshold_usd": "2.000000", "amount_usd": "20.000000"}
    assert acct["metadata"] == {"tier": "gold"}
    stored = await running.state.redis.hmget(keyspace.account("acme", "acct"), "auto_topup", "thresholds", "metadata")
    assert stored == ['{"threshold":"2000000","amount":"20000000"}', "[5000000,1000000]", '{"tier":"gold"}']
    _, acct = await running.admin(
        "PATCH", path, {"auto_topup": None, "metadata": None, "low_balance_thresholds_usd": None}
    )
    assert acct["auto_topup"] is None and acct["metadata"] == {}
    assert await running.state.redis.hmget(keyspace.account("acme", "acct"), "auto_topup", "thresholds") == [None, None]
    assert (await running.admin("PATCH", "/admin/v1/accounts/ghost", {"status": "active"}))[0] == 404
    assert (await running.admin("PATCH", path, {"auto_topup": {"threshold_usd": "1"}}))[0] == 400


async def test_ledger_export_over_http(proxy: Running) -> None:
    await new_account(proxy)
    await grant(proxy, "3", description='a "quoted", comma')
    auth = {"Authorization": "Bearer test-admin-token-123"}
    status, text = await raw_request(proxy, "GET", "/admin/v1/accounts/acme/ledger/export?format=csv", headers=auth)
    lines = text.splitlines()
    assert status == 200 and lines[0].startswith("id,created_at,type,amount_usd,balance_usd,grant_id")
    assert ",grant,3.000000,3.000000,grant_" in lines[1] and lines[1].endswith('"a ""quoted"", comma",')
    status, text = await raw_request(proxy, "GET", "/admin/v1/accounts/ghost/ledger/export", headers=auth)
    assert status == 404


async def test_usage_grouped_by_api_key(proxy: Running, upstream: DemoUpstream) -> None:
    first = await proxy.account("acme", "10")
    record, second = await proxy.state.key_store.create_key("acme", name="batch")
    for key in (first, first, second):
        await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    _, usage = await proxy.admin("GET", "/admin/v1/accounts/acme/usage?group_by=key")
    by_key = {g["key_id"]: g["requests"] for g in usage["groups"]}
    assert by_key[record.key_id] == 1 and sorted(by_key.values()) == [1, 2]


async def test_grants_lists_live_and_ended_grants(proxy: Running) -> None:
    await proxy.account("acme", "10")
    pack = await proxy.fund("acme", "5")
    await proxy.state.ledger.void("acme", pack["id"], "refund")
    status, body = await proxy.admin("GET", "/admin/v1/accounts/acme/grants")
    assert status == 200
    assert [(g["amount_usd"], g["status"]) for g in body["grants"]] == [("10.000000", "active"), ("5.000000", "voided")]
