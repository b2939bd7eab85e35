"""The customer usage page in a real headless Chromium: a customer pastes their key and
sees their balance, rate limits, grants, their key's limit and spend, usage by model and
day, and their latest requests with their cost, and looks a request up by its id; a wrong
or revoked key is told so. Every section shows what its endpoint answers."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from .browser import Watched, shown
from .conftest import Running

KEY_STORAGE = "metering-proxy.api-key"


@pytest.fixture
async def customer(browser: Browser) -> Any:
    watched = await Watched.open(browser)
    yield watched
    await watched.close()


async def client_get(running: Running, path: str, key: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + path, headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_usage_page_shows_balance_grants_and_requests(proxy: Running, customer: Watched) -> None:
    key = await proxy.account("acme", usd="12.5")
    await proxy.account("other", usd="99")  # another account's money never shows
    client = proxy.client(key)
    served = []
    for model, tokens in (("gpt-4o-mini", 20), ("gpt-4o", 40)):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "How much did this cost?"}], max_tokens=tokens
        )
        served.append((raw.headers["x-request-id"], model, raw.headers["x-metering-cost-usd"]))
    balance = raw.headers["x-metering-balance-usd"]

    page = customer.page
    await page.goto(proxy.url + "/usage")
    await page.fill("#api-key", "sk-mp-not-a-real-key")
    await page.click("#signin button[type=submit]")
    await expect(page.locator("#signin-status .error")).to_contain_text("Incorrect API key provided")
    assert await page.evaluate("sessionStorage.length") == 0

    await page.fill("#api-key", key)
    await page.click("#signin button[type=submit]")
    await expect(page.locator("#balance")).to_have_text(shown(balance))
    await expect(page.locator("#account-id")).to_have_text("account acme")
    await expect(page.locator("#grants td[data-grant-id]")).to_have_count(1)
    await expect(page.locator("#grants")).to_contain_text("$12.50")
    assert await page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == key
    assert await page.context.cookies() == [] and key not in page.url

    # the latest requests, newest first, each with the cost the proxy charged
    rows = page.locator("#requests td[data-request-id]")
    await expect(rows).to_have_count(2)
    for row, (request_id, _, _) in zip(await rows.all(), reversed(served), strict=True):
        await expect(row).to_have_text(request_id)
    _, keys = await proxy.admin("GET", "/admin/v1/accounts/acme/keys")
    for request_id, model, cost in served:
        line = page.locator("#requests tr", has=page.locator(f'td[data-request-id="{request_id}"]'))
        await expect(line).to_contain_text(model)
        await expect(line.locator("td[data-key-id]")).to_have_attribute("data-key-id", keys["data"][0]["id"])
        await expect(line.locator("td[data-cost]")).to_have_attribute("data-cost", cost)

    # the tier's limits (conftest: 10,000 rpm, 100,000,000 tpm), shortened without changing them
    await expect(page.locator("#stats")).to_contain_text("10k requests · 100M tokens a minute")
    await expect_key_section(page, proxy, key)
    await expect_usage_section(page, served)
    await expect_lookup(page, served[0])

    # a key revoked meanwhile: the next refresh goes back to the sign-in, saying why
    await proxy.admin("DELETE", f"/admin/v1/keys/{keys['data'][0]['id']}")
    await page.click("#refresh")
    await expect(page.locator("#signin-status .notice")).to_contain_text("(401)")
    assert await page.evaluate("sessionStorage.length") == 0
    revoked = {(path, 401) for path in ("/v1/credits", "/v1/key", "/v1/usage", "/v1/generations")}
    customer.assert_clean({("/v1/credits", 401), *revoked})


async def expect_key_section(page: Any, proxy: Running, key: str) -> None:
    _, info = await client_get(proxy, "/v1/key", key)
    assert info["object"] == "api_key"
    await expect(page.locator("#key-total")).to_have_text(shown(info["usage_usd"]["total"]))
    await expect(page.locator("#key")).to_contain_text(info["id"])


async def expect_usage_section(page: Any, served: list[tuple[str, str, str]]) -> None:
    for _, model, cost in served:
        bar = page.locator(f'svg[data-chart="models"] rect[data-model="{model}"]')
        await expect(bar).to_have_attribute("data-cost", cost)
    await expect(page.locator("#usage .note")).to_have_text("2 requests")


async def expect_lookup(page: Any, request: tuple[str, str, str]) -> None:
    await page.fill("#lookup-id", request[0])
    await page.click("#lookup button[type=submit]")
    result = page.locator("#lookup-result")
    await expect(result.locator("td[data-cost]")).to_have_attribute("data-cost", request[2])
    await expect(result).to_contain_text(request[1])
