"""A proxy killed mid-stream leaves a reservation; any other instance releases it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from redis.asyncio import Redis

from proxy.cli import main as cli_main
from proxy.configfile import parse_config
from proxy.demo_upstream import DemoUpstream
from proxy.embedded import free_port
from proxy.ledger import Ledger

from .conftest import BASE_CONFIG, deep_merge
from .helpers import entries, funded_key, last_entry_id, next_entry, spawn_proxy, wait_healthy


async def test_sigkilled_proxy_reservation_is_released_after_restart(
    start_proxy: Any, upstream: DemoUpstream, redis_server: Any, redis: Redis, tmp_path: Path
) -> None:
    port = free_port()
    data = deep_merge(BASE_CONFIG, {
        "server": {"port": port, "admin_port": free_port()},
        "redis": {"url": redis_server.url},
        "upstreams": {"openai": {"base_url": upstream.base_url}},
        "billing": {"reservation_ttl_s": 2},
        "data_dir": str(tmp_path / "data"),
    })  # fmt: skip
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    ledger = Ledger(redis, parse_config(yaml.safe_dump(data)))
    key = await funded_key(redis, ledger.config)
    child = spawn_proxy(config_file, tmp_path / "child.log")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", child)
        upstream.fault.output_tokens, upstream.fault.chunk_delay_s = 500, 0.05
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      headers={"Authorization": f"Bearer {key}"},
                                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                            "stream": True})  # fmt: skip
            await resp.content.readline()  # mid-stream
            before = await last_entry_id(redis, "acme")
            assert (await ledger.touch("acme")).reserved > 0
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            resp.close()
    finally:
        if child.poll() is None:
            child.kill()
    # the proxy comes back (on other ports): its worker releases what the dead one held
    await start_proxy(deep_merge(data, {"server": {"port": 0, "admin_port": 0}}))
    entry = await next_entry(redis, "acme", before, timeout_s=15)
    assert entry["type"] == "release" and entry["amount"] == "0", entry
    view = await ledger.touch("acme")
    assert view.reserved == 0 and view.balance == 10_000_000
    assert sum(int(e["amount"]) for e in await entries(redis, "acme")) == view.balance
    assert await asyncio.to_thread(cli_main, ["--config", str(config_file), "reconcile"]) == 0


async def test_a_live_request_outlasting_the_ttl_keeps_its_reservation(
    start_proxy: Any, upstream: DemoUpstream
) -> None:
    running = await start_proxy({"billing": {"reservation_ttl_s": 2}})  # the background worker reaps every second
    key = await running.account("acme", "10")
    upstream.fault.output_tokens, upstream.fault.chunk_delay_s = 24, 0.25  # a 6 s stream: 3 TTLs
    stream = await running.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 24
    kinds = [e["type"] for e in await entries(running.state.redis, "acme")]
    assert kinds == ["grant", "usage"]  # never released as if its proxy had died
    assert (await running.balance("acme")).reserved == 0
