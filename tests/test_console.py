"""The operator console in a real headless Chromium, against a real proxy: sign in, find
an account, grant credits, create a key, spend through the official openai SDK and watch
the cost land in the ledger and the usage charts, export the ledger as CSV, void the
grant, revoke the key, replay dead webhooks; any console error or CSP violation fails."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.async_api import Browser, Page, expect

from .browser import Watched, shown
from .conftest import ADMIN_TOKEN, Running
from .helpers import Receiver, hook_config, wait_for

TOKEN_KEY = "metering-proxy.admin-token"
ACCOUNT_PATHS = ("", "/grants", "/keys", "/usage", "/ledger", "/webhooks")


async def sign_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#signin button[type=submit]")


@pytest.fixture
async def console(browser: Browser) -> Any:
    watched = await Watched.open(browser, accept_downloads=True)
    yield watched
    await watched.close()


async def test_console_sign_in_grant_key_spend_export_void_revoke(
    proxy: Running, console: Watched, tmp_path: Path
) -> None:
    page = console.page
    await proxy.account("globex", usd="3")
    assert (await proxy.admin("POST", "/admin/v1/accounts", {"id": "acme"}))[0] == 201
    await page.goto(proxy.admin_url + "/")

    # a wrong token: the API's own message, nothing stored
    await sign_in(page, "wrong-token-0123456789")
    await expect(page.locator("#signin-status .error")).to_contain_text("A valid admin token is required")
    assert await page.evaluate("sessionStorage.length") == 0

    await sign_in(page, ADMIN_TOKEN)
    await expect(page.locator("#accounts td[data-account-id]")).to_have_count(2)
    globex = page.locator("#accounts tr", has=page.locator('td[data-account-id="globex"]'))
    await expect(globex).to_contain_text("$3.00")  # its balance
    await expect(globex).to_contain_text("free")  # its tier
    assert await page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == ADMIN_TOKEN
    assert ADMIN_TOKEN not in page.url and await page.context.cookies() == []
    assert await page.evaluate("localStorage.length") == 0

    # search, then open the account
    await page.fill("#account-search", "GLOB")
    await page.press("#account-search", "Enter")
    await expect(page.locator("#accounts td[data-account-id]")).to_have_count(1)
    await expect(page.locator("#accounts td[data-account-id]")).to_have_text("globex")
    await page.fill("#account-search", "acm")
    await page.press("#account-search", "Enter")
    await expect(page.locator("#accounts td[data-account-id]")).to_have_text("acme")
    await page.click('#accounts a[href="#/accounts/acme"]')
    await expect(page.locator("#account-title")).to_have_text("acme")
    await expect(page.locator("#balance")).to_have_text("$0.00")
    # the tier's limits (conftest: 10,000 rpm, 100,000,000 tpm), shortened without changing them
    await expect(page.locator("#stats")).to_contain_text("10k rpm · 100M tpm")

    # a refused grant shows the API's own message and grants nothing
    await page.fill("#grant-form [name=amount_usd]", "12.3456789")
    await page.click("#grant-form button[type=submit]")
    await expect(page.locator("#grants .error")).to_contain_text("amount_usd")
    assert (await proxy.admin("GET", "/admin/v1/accounts/acme/grants"))[1]["grants"] == []

    # grant credits
    await page.fill("#grant-form [name=amount_usd]", "20")
    await page.fill("#grant-form [name=description]", 'Invoice 7, "annual" <b>plan</b>')
    await page.click("#grant-form button[type=submit]")
    await expect(page.locator("#balance")).to_have_text("$20.00")
    _, listed = await proxy.admin("GET", "/admin/v1/accounts/acme/grants")
    (grant,) = listed["grants"]
    assert (grant["amount_usd"], grant["kind"], grant["description"]) == (
        "20.000000",
        "paid",
        'Invoice 7, "annual" <b>plan</b>',
    )
    row = page.locator("#grants tr", has=page.locator(f'td[data-grant-id="{grant["id"]}"]'))
    await expect(row).to_contain_text('Invoice 7, "annual" <b>plan</b>')  # as text: never markup
    assert await page.locator("#grants b").count() == 0

    # create a key: the secret is shown once
    await page.fill("#key-form [name=name]", "ci")
    await page.click("#key-form button[type=submit]")
    secret = (await page.locator("#new-key-secret").text_content()) or ""
    assert secret.startswith("sk-mp-")
    _, keys = await proxy.admin("GET", "/admin/v1/accounts/acme/keys")
    (key,) = keys["data"]
    await expect(page.locator(f'#keys td[data-key-id="{key["id"]}"]')).to_be_visible()

    # spend through the proxy with that key, then watch the cost appear
    raw = await proxy.client(secret).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello from the console test"}], max_tokens=30
    )
    cost, request_id = raw.headers["x-metering-cost-usd"], raw.headers["x-request-id"]
    await page.click("#refresh")
    entry = page.locator("#ledger tr", has=page.locator(f'td[data-request-id="{request_id}"]'))
    await expect(entry.locator("td[data-amount]")).to_have_attribute("data-amount", "-" + cost)
    await expect(entry).to_contain_text("gpt-4o-mini")
    await expect(entry.locator("[data-key-id]")).to_have_attribute("data-key-id", key["id"])  # which key spent it
    await expect(page.locator("#usage td[data-cost]")).to_have_attribute("data-cost", cost)
    await expect(page.locator("#usage-total")).to_have_text("1 requests")
    await expect(page.locator('svg[data-chart="models"] rect[data-model="gpt-4o-mini"]')).to_have_attribute(
        "data-cost", cost
    )
    await expect(page.locator("#balance")).to_have_text(shown(raw.headers["x-metering-balance-usd"]))
    key_row = page.locator("#keys tr", has=page.locator(f'td[data-key-id="{key["id"]}"]'))
    await expect(key_row).to_contain_text(f"{shown(cost)} total · {shown(cost)} this month")
    await proxy.admin("PATCH", f"/admin/v1/keys/{key['id']}", {"limit_usd": "5", "limit_reset": "daily"})
    await page.click("#refresh")  # a daily limit: the spend beside the total is today's
    await expect(key_row).to_contain_text(f"{shown(cost)} total · {shown(cost)} today")

    # the secret is gone once the page is reloaded: only its hash was ever stored
    await page.reload()
    await expect(page.locator(f'#keys td[data-key-id="{key["id"]}"]')).to_be_visible()
    assert secret not in await page.content()

    # CSV export, made in the browser from the API's pages, equals the server's own export
    async with page.expect_download() as download_info:
        await page.click("#export-csv")
    download = await download_info.value
    assert download.suggested_filename == "ledger-acme.csv"
    exported = Path(await download.path()).read_bytes().decode()  # noqa: ASYNC240 (a small local file)
    server_csv = await admin_text(proxy, "/admin/v1/accounts/acme/ledger/export?format=csv")
    assert exported == server_csv and exported.count("\r\n") == 3  # header, grant, usage
    await expect(page.locator("#export-status")).to_have_text("Exported 2 entries.")

    # void the grant with a reason
    await row.get_by_role("button", name="Void…").click()
    await row.locator("input[name=reason]").fill("refund, ticket 12")
    await row.get_by_role("button", name="Void", exact=True).click()
    await expect(row.locator(".grant-status")).to_have_text("voided")
    await expect(row).to_contain_text("voided: refund, ticket 12")
    _, voided = await proxy.admin("GET", "/admin/v1/accounts/acme/grants")
    assert voided["grants"][0]["status"] == "voided" and voided["grants"][0]["void_reason"] == "refund, ticket 12"
    await expect(page.locator("#balance")).to_have_text("$0.00")

    # revoke the key: the proxy refuses it at once
    await key_row.get_by_role("button", name="Revoke…").click()
    await key_row.get_by_role("button", name="Revoke now").click()
    await expect(key_row.locator(".key-status")).to_have_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        await proxy.client(secret).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    # a token that stops working (rotated): back to sign-in, with a word why
    await page.evaluate(f"sessionStorage.setItem('{TOKEN_KEY}', 'rotated-away-0123456789')")
    await page.click("#refresh")
    await expect(page.locator("#signin-status .notice")).to_contain_text("refused (401)")
    assert await page.evaluate("sessionStorage.length") == 0
    account = "/admin/v1/accounts/acme"
    refused = {("/admin/v1/accounts", 401), (account + "/credits", 400)}
    console.assert_clean(refused | {(account + p, 401) for p in ACCOUNT_PATHS})


async def admin_text(running: Running, path: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(running.admin_url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 200
            return await resp.text()


async def test_console_shows_and_replays_dead_webhooks(start_proxy: Callable[..., Any], console: Watched) -> None:
    receiver = Receiver(fail_next=1_000)
    await receiver.start()
    try:
        running = await start_proxy(hook_config(receiver, max_attempts=1))
        await running.account("acme", usd="7")  # credits.granted: refused once, so dead at once
        await wait_for(lambda: len(receiver.attempts) == 1, what="the first delivery attempt")
        page = console.page
        await page.goto(running.admin_url + "/#/accounts/acme")
        await sign_in(page, ADMIN_TOKEN)
        await expect(page.locator("#account-title")).to_have_text("acme")
        dead = page.locator("#webhooks-dead tbody tr")
        await expect(dead).to_have_count(1)
        await expect(dead).to_contain_text("credits.granted")
        await expect(dead).to_contain_text("HTTP 500")
        await expect(page.locator("#webhooks-attempts tbody tr")).to_contain_text("dead")

        receiver.fail_next = 0
        await page.click("#replay-dead")
        await expect(page.locator("#replay-status")).to_have_text("1 event queued again.")
        await wait_for(lambda: len(receiver.delivered("credits.granted")) == 1, what="the replayed delivery")
        await page.click("#refresh")
        await expect(page.locator("#webhooks-dead tbody tr")).to_have_text(re.compile("None."))
        await expect(page.locator("#webhooks-attempts tbody tr").first).to_contain_text("delivered")
        await expect(page.locator("#replay-dead")).to_be_hidden()
        console.assert_clean()
    finally:
        await receiver.stop()
