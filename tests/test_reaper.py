"""A proxy killed mid-stream leaves a reservation; any other instance releases it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.demo_upstream import DemoUpstream
from proxy.embedded import free_port

from .conftest import BASE_CONFIG, deep_merge
from .helpers import entries, last_entry_id, next_entry


async def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, "proxy exited during startup"
            try:
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "proxy did not start"
            await asyncio.sleep(0.1)  # polling a child process's readiness


def spawn_proxy(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config_file), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_sigkilled_proxy_reservation_is_released(
    start_proxy: Any, upstream: DemoUpstream, redis_server: Any, tmp_path: Path
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
    survivor = await start_proxy(deep_merge(data, {"server": {"port": 0, "admin_port": 0}}))  # shares Redis
    key = await survivor.account("acme", "10")
    child = spawn_proxy(config_file, tmp_path / "child.log")  # fmt: skip
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", child)
        upstream.fault.output_tokens, upstream.fault.chunk_delay_s = 500, 0.05
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      headers={"Authorization": f"Bearer {key}"},
                                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                            "stream": True})  # fmt: skip
            await resp.content.readline()  # mid-stream
            before = await last_entry_id(survivor.state.redis, "acme")
            assert (await survivor.balance("acme")).reserved > 0
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            resp.close()
    finally:
        if child.poll() is None:
            child.kill()
    entry = await next_entry(survivor.state.redis, "acme", before, timeout_s=15)
    assert entry["type"] == "release" and entry["amount"] == "0", entry
    view = await survivor.balance("acme")
    assert view.reserved == 0 and view.balance == 10_000_000
    assert sum(int(e["amount"]) for e in await entries(survivor.state.redis, "acme")) == view.balance
