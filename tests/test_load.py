"""1,000 concurrent requests (streamed and not, on 250 keys of one account that no
proxy has cached yet) on one proxy and on two sharing Redis: no 5xx, no overspend,
every request served charged exactly once, and the Redis pool waits measured.

The proxies are real `metering-proxy serve` child processes: each has its own event
loop and its own /metrics, as instances in production do, and the 1,000 clients and
the fake upstream in this process do not share their loop.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from proxy.cli import main as cli_main
from proxy.keys import KeyStore
from proxy.ledger import GrantSpec, Ledger
from proxy.testing.upstream import DemoUpstream

from .helpers import child_config, entries, histogram_figures, raise_fd_limit, scrape, spawn_proxy, wait_healthy

REQUESTS = 1000
KEYS = 250
COST = 75  # micro-USD per request: 10 prompt tokens x $2.50/1M + 5 output tokens x $10/1M
FUNDS = 600 * COST  # at most 600 of the 1,000 can be paid for: the rest must be 402s
WAIT = "metering_proxy_redis_pool_wait_seconds"


async def test_a_thousand_concurrent_requests_on_one_instance(
    upstream: DemoUpstream, redis_server: Any, redis: Redis, tmp_path: Path
) -> None:
    await load_scenario(upstream, redis_server, redis, tmp_path, instances=1)


async def test_a_thousand_concurrent_requests_on_two_instances(
    upstream: DemoUpstream, redis_server: Any, redis: Redis, tmp_path: Path
) -> None:
    await load_scenario(upstream, redis_server, redis, tmp_path, instances=2)


async def load_scenario(
    upstream: DemoUpstream, redis_server: Any, redis: Redis, tmp_path: Path, instances: int
) -> None:
    raise_fd_limit()
    configs = [child_config(tmp_path, upstream.base_url, redis_server.url, name=f"p{i}") for i in range(instances)]
    keys = await funded_keys(Ledger(redis, configs[0].config))
    children = [spawn_proxy(c.path, tmp_path / f"p{i}.log") for i, c in enumerate(configs)]
    try:
        for config, child in zip(configs, children, strict=True):
            await wait_healthy(config.url, child)
        started = time.perf_counter()
        async with asyncio.timeout(60):  # a hang fails the test, not CI
            results = await burst([c.url for c in configs], keys)
        elapsed = time.perf_counter() - started
        metrics = [await scrape(c.admin_url) for c in configs]
    finally:
        stop(children)
    waits = [histogram_figures(m, WAIT) for m in metrics]
    exhausted = [sum(v for _, v in m.get("metering_proxy_redis_pool_exhausted_total", [])) for m in metrics]
    statuses = Counter(status for status, _ in results)
    served = [rid for status, rid in results if status == 200]
    print(f"\nload, {instances} instance(s): {REQUESTS} requests in {elapsed:.2f} s: {dict(statuses)}")
    for i, figures in enumerate(waits):
        ms = {q: f"{figures[q] * 1000:g} ms" for q in ("p50", "p99", "max")}
        print(f"  instance {i}: pool waits n={figures['count']:.0f} p50<={ms['p50']} p99<={ms['p99']} "
              f"max<={ms['max']}; pool exhausted {exhausted[i]:.0f}")  # fmt: skip
    assert not [s for s in statuses if s >= 500], statuses  # Redis is healthy: no 5xx
    assert set(statuses) <= {200, 402} and statuses[200] + statuses[402] == REQUESTS, statuses
    assert 0 < statuses[200] <= FUNDS // COST and statuses[402] > 0, statuses
    assert sum(exhausted) == 0
    await assert_charged_once(Ledger(redis, configs[0].config), configs[0].path, served)


async def funded_keys(ledger: Ledger) -> list[str]:
    await ledger.save_account("acme", {}, create=True)
    await ledger.grant("acme", GrantSpec("paid", FUNDS))
    accounts = KeyStore(ledger.redis)
    return [(await accounts.create_key("acme", name=f"k{i}"))[1] for i in range(KEYS)]


async def burst(urls: list[str], keys: list[str]) -> list[tuple[int, str]]:
    """All at once: every other request streamed, keys and instances taken in turn."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=50)) as session:
        calls = [one(session, urls[i % len(urls)], keys[i % len(keys)], stream=i % 2 == 0) for i in range(REQUESTS)]
        return await asyncio.gather(*calls)


async def one(session: aiohttp.ClientSession, url: str, key: str, stream: bool) -> tuple[int, str]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": stream}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        data = await r.read()
        if r.status == 200 and stream:
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        return r.status, r.headers["x-request-id"]


async def assert_charged_once(ledger: Ledger, config_file: Path, served: list[str]) -> None:
    """Per the ledger: one usage entry of exactly COST per request served, none for a
    402, nothing reserved, and the balance never below zero."""
    view = await ledger.touch("acme")
    usage = [e for e in await entries(ledger.redis, "acme") if e["type"] == "usage"]
    charged = Counter(e["request_id"] for e in usage)
    assert charged == Counter(served), "usage entries differ from the requests served"
    assert all(e["amount"] == f"-{COST}" for e in usage)
    assert view.reserved == 0 and view.balance == FUNDS - COST * len(served) >= 0
    assert await asyncio.to_thread(cli_main, ["--config", str(config_file), "reconcile"]) == 0


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
