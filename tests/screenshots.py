"""`make screenshots`: the console and the usage page photographed in headless Chromium
with real data, into docs/.

A real proxy on a real Redis with the fake OpenAI upstream and a webhook receiver;
accounts, grants and keys are made through the admin API and requests through the
official openai SDK, so every figure on the pictures is one the proxy computed. With
libfaketime installed (Debian's `libfaketime`) Redis runs on a clock set two weeks back
and moved forward a day at a time, so the daily charts show two weeks of traffic; without
it everything happens today.

    python -m tests.screenshots [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml
from playwright.async_api import Browser, Page, async_playwright

from proxy import logs
from proxy.app import Proxy
from proxy.configfile import parse_config
from proxy.embedded import EmbeddedRedis, server_binary
from proxy.testing.upstream import DemoUpstream

from .browser import TIMEOUT_MS, Watched, launch
from .conftest import ADMIN_TOKEN, BASE_CONFIG, deep_merge
from .helpers import Receiver, hook_config

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DAYS = 14
ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over a lazy dog while metering every token it reads".split()

EXTRA: dict[str, Any] = {
    "plans": {
        "starter": {"allocation": {"amount_usd": "5", "every": "month"}},
        "pro": {"allocation": {"amount_usd": "100", "every": "month"}},
    },
    "rate_tiers": {
        "basis": "paid",
        "tiers": [
            {"name": "free", "min_usd": "0", "rpm": 60, "tpm": 100000},
            {"name": "tier-1", "min_usd": "5", "rpm": 500, "tpm": 2000000},
            {"name": "tier-2", "min_usd": "50", "rpm": 5000, "tpm": 20000000},
        ],
    },
}


class Clock:
    """Redis's clock, `days` behind until moved: libfaketime reads the file at every call."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / "faketime"
        self.wrapper = folder / "redis-server"
        self.on = FAKETIME.exists()

    def binary(self) -> str:
        real = server_binary()
        if not self.on:
            return real
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"LD_PRELOAD={FAKETIME} FAKETIME_TIMESTAMP_FILE={self.file} FAKETIME_NO_CACHE=1 "
            f'FAKETIME_DONT_FAKE_MONOTONIC=1 exec {real} "$@"\n'
        )
        self.wrapper.chmod(0o755)
        return str(self.wrapper)

    def days_ago(self, days: int) -> None:
        self.file.write_text(f"-{days}d\n" if days else "+0\n")


class Admin:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url

    async def __call__(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            assert resp.status < 300, (path, data)
            return data


def grant(amount: str, kind: str, description: str, **more: str) -> dict[str, str]:
    return {"amount_usd": amount, "kind": kind, "description": description, **more}


async def seed(admin: Admin, client_url: str, upstream: DemoUpstream, clock: Clock) -> str:
    """Accounts with their history; returns the API key the usage page is shown for."""
    rng = random.Random(7)
    clock.days_ago(DAYS if clock.on else 0)
    accounts = {
        "acme": ("pro", "250"),
        "globex": ("starter", "40"),
        "initech": (None, "12.5"),
        "umbrella-labs": ("pro", "1200"),
        "hooli": ("starter", None),
        "stark-industries": (None, "75"),
        "wayne-enterprises": (None, "18"),
    }
    keys: dict[str, str] = {}
    for account_id, (plan, paid) in accounts.items():
        base = f"/admin/v1/accounts/{account_id}"
        await admin("POST", "/admin/v1/accounts", {"id": account_id, "plan": plan})
        if paid:
            await admin("POST", f"{base}/credits", grant(paid, "paid", "Stripe invoice", idempotency_key=account_id))
        limit = {"limit_usd": "25", "limit_reset": "monthly"} if account_id == "acme" else {}  # shown on the usage page
        keys[account_id] = (await admin("POST", f"{base}/keys", {"name": "production", **limit}))["key"]
    acme = "/admin/v1/accounts/acme"
    await admin("POST", f"{acme}/credits", grant("15", "promotional", "Launch", expires_at="2031-01-01T00:00:00Z"))
    staging = await admin("POST", f"{acme}/keys", {"name": "staging", "allowed_models": ["gpt-4o-mini"]})
    mistake = await admin("POST", f"{acme}/credits", grant("30", "paid", "Duplicate invoice"))
    await admin("POST", f"{acme}/credits/{mistake['id']}/void", {"reason": "duplicate payment, refunded"})

    models = ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4o", "o3-mini"]
    for day in range(DAYS if clock.on else 0, -1, -1):
        clock.days_ago(day)
        busy = 3 + int(4 * (1 + (DAYS - day) / DAYS) * rng.random()) + (0 if day % 7 in (1, 2) else 3)
        for account_id, key in keys.items():
            if account_id == "hooli":
                continue
            n = busy if account_id == "acme" else rng.randint(0, 3)
            client = openai.AsyncOpenAI(base_url=f"{client_url}/v1", api_key=key, max_retries=0)
            for _ in range(n):
                upstream.fault.count_prompt = True  # the prompt's real count: within its reservation
                upstream.fault.cached_tokens = rng.choice((0, 0, 128, 256))
                upstream.fault.output_tokens = rng.randint(80, 1200)
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 3000)))
                await client.chat.completions.create(
                    model=rng.choice(models), messages=[{"role": "user", "content": prompt}], max_tokens=1500
                )
        upstream.fault.cached_tokens = 0
        staging_client = openai.AsyncOpenAI(base_url=f"{client_url}/v1", api_key=staging["key"], max_retries=0)
        await staging_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "staging check"}], max_tokens=50
        )
    await admin("DELETE", f"/admin/v1/keys/{staging['id']}")
    return keys["acme"]


async def delivered(admin: Admin, account_id: str, timeout_s: float = 30) -> None:
    """Until the account's outbox is empty: every webhook attempted (the worker runs each second)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await admin("GET", f"/admin/v1/accounts/{account_id}/webhooks"))["pending"]:
        assert asyncio.get_running_loop().time() < deadline, "webhooks still pending"
        await asyncio.sleep(0.2)  # polling the outbox, bounded


async def shoot(page: Page, path: Path, full: bool = True) -> None:
    await page.wait_for_load_state("networkidle")
    await page.mouse.move(0, 0)  # no row hovered
    await page.screenshot(path=str(path), full_page=full)
    print("wrote", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


async def signed_in(browser: Browser, url: str, field: str, secret: str, ready: str) -> Watched:
    watched = await Watched.open(browser)
    await watched.page.goto(url)
    await watched.page.fill(field, secret)
    await watched.page.click("#signin button[type=submit]")
    await watched.page.locator(ready).first.wait_for(timeout=TIMEOUT_MS)
    return watched


async def photograph(admin_url: str, client_url: str, key: str, out: Path) -> None:
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        console = await signed_in(browser, admin_url + "/", "#token", ADMIN_TOKEN, "#accounts td[data-account-id]")
        await shoot(console.page, out / "console-accounts.png")
        await console.page.click('#accounts a[href="#/accounts/acme"]')
        await console.page.locator("#ledger td[data-entry-id]").first.wait_for(timeout=TIMEOUT_MS)
        await console.page.locator("#webhooks-attempts").wait_for(timeout=TIMEOUT_MS)
        await shoot(console.page, out / "console-account.png")
        console.assert_clean()
        customer = await signed_in(browser, client_url + "/usage", "#api-key", key, "#requests td[data-request-id]")
        page = customer.page
        await page.locator("#key-total").wait_for(timeout=TIMEOUT_MS)
        await page.locator('#usage svg[data-chart="models"]').wait_for(timeout=TIMEOUT_MS)
        await page.fill("#lookup-id", await page.locator("#requests td[data-request-id]").first.inner_text())
        await page.click("#lookup button[type=submit]")
        await page.locator("#lookup-result td[data-cost]").wait_for(timeout=TIMEOUT_MS)
        await shoot(page, out / "usage-page.png")
        customer.assert_clean()
        await browser.close()


async def main(out: Path) -> None:
    logs.setup("error")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clock = Clock(folder)
        clock.days_ago(DAYS if clock.on else 0)
        redis = EmbeddedRedis(folder / "redis", binary=clock.binary(), appendfsync="no")
        url = await redis.start()
        upstream, receiver = DemoUpstream(), Receiver()
        await upstream.start()
        await receiver.start()
        receiver.fail_next = 2  # two events dead-lettered (max_attempts 1): the console shows them
        data = deep_merge(BASE_CONFIG, EXTRA)
        hooks = hook_config(receiver, max_attempts=1, low_balance_thresholds_usd=["50", "10"])
        data = deep_merge(data, {"redis": {"url": url}, "data_dir": str(folder / "data"),
                                 "upstreams": {"openai": {"base_url": upstream.base_url}}, **hooks})  # fmt: skip
        proxy = Proxy(parse_config(yaml.safe_dump(data)))
        await proxy.start()
        try:
            admin_url = f"http://127.0.0.1:{proxy.ports['admin']}"
            client_url = f"http://127.0.0.1:{proxy.ports['client']}"
            async with aiohttp.ClientSession() as session:
                admin = Admin(session, admin_url)
                key = await seed(admin, client_url, upstream, clock)
                clock.days_ago(0)
                await delivered(admin, "acme")
            await photograph(admin_url, client_url, key, out)
        finally:
            await proxy.stop()
            await upstream.stop()
            await receiver.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(args.out))
