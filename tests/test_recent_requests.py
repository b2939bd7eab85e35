"""Reports read from the ledger: `/v1/generations`, a customer's latest requests."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy import generations as listing

from .conftest import Running

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def generations(running: Running, key: str, query: str = "") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.url}/v1/generations{query}", headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


async def spend(running: Running, key: str, model: str = "gpt-4o-mini") -> tuple[str, str]:
    raw = await running.client(key).chat.completions.with_raw_response.create(model=model, **CHAT)
    return raw.headers["x-request-id"], raw.headers["x-metering-cost-usd"]


async def test_latest_requests_newest_first_paged_and_only_the_callers(proxy: Running) -> None:
    key = await proxy.account("acme", "10")
    other = await proxy.account("globex", "10")
    served = []
    for i in range(5):
        served.append(await spend(proxy, key, ("gpt-4o-mini", "gpt-4o")[i % 2]))
        await proxy.fund("acme", "1")  # entries that are not requests, in between
        await spend(proxy, other)
    status, page = await generations(proxy, key)
    assert status == 200 and [(g["id"], g["cost_usd"]) for g in page["data"]] == served[::-1]
    assert page["next_cursor"] is None
    first = page["data"][0]
    assert first["model"] == "gpt-4o-mini" and first["status"] == "settled" and first["estimated"] is False
    assert first["usage"]["input_tokens"] > 0 and first["created_at"].endswith("Z") and first["key_id"]

    seen, cursor = [], ""
    while True:
        status, page = await generations(proxy, key, f"?limit=2{cursor}")
        assert status == 200 and len(page["data"]) <= 2
        seen += [g["id"] for g in page["data"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [request_id for request_id, _ in served[::-1]]

    assert (await generations(proxy, key, "?cursor=0-0"))[1]["data"] == []  # before the first entry
    for bad in ("?limit=0", "?limit=101", "?cursor=nope", "?colour=red"):
        status, body = await generations(proxy, key, bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", bad
    status, body = await generations(proxy, "sk-mp-unknown")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    _, keys = await proxy.admin("GET", "/admin/v1/accounts/acme/keys")
    await proxy.admin("DELETE", f"/admin/v1/keys/{keys['data'][0]['id']}")
    assert (await generations(proxy, key))[0] == 401  # at once, though the key is cached


async def test_a_ledger_of_grants_gives_short_pages_that_still_reach_every_request(
    proxy: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing, "SCAN_PAGE", 3)
    monkeypatch.setattr(listing, "SCAN_LIMIT", 6)
    key = await proxy.account("acme", "10")
    served = [await spend(proxy, key)]
    for _ in range(10):
        await proxy.fund("acme", "1")
    served.append(await spend(proxy, key))
    seen, cursor, pages = [], "", 0
    while True:
        _, page = await generations(proxy, key, f"?limit=5{cursor}")
        seen += [g["id"] for g in page["data"]]
        pages += 1
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [request_id for request_id, _ in served[::-1]] and pages > 1
