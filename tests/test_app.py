"""Config hot reload, redacted logs, health and metrics on the admin listener."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy import logs
from proxy.configfile import load_config
from proxy.testing.upstream import DemoUpstream

from .conftest import ADMIN_TOKEN, BASE_CONFIG, UPSTREAM_KEY, deep_merge


def reloads(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("metering_proxy_config_reloads_total", {"outcome": outcome}) or 0.0


def write_config(path: Path, redis_url: str, upstream_url: str, price: str) -> None:
    data = deep_merge(BASE_CONFIG, {"redis": {"url": redis_url}, "upstreams": {"openai": {"base_url": upstream_url}},
                                    "models": {"gpt-4o": {"price": {"input": price}}}})  # fmt: skip
    path.write_text(yaml.safe_dump(data))


async def start_from_file(start_proxy: Any, path: Path, redis_url: str, upstream_url: str) -> Any:
    """A proxy started from a config file it watches (gpt-4o input at $2.50 / 1M)."""
    write_config(path, redis_url, upstream_url, "2.50")
    return await start_proxy(config=load_config(path), config_path=path)


async def cost_of_one_request(running: Any, key: str) -> str:
    raw = await running.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=5
    )
    return str(raw.headers["x-metering-cost-usd"])


async def test_reload_applies_good_config_and_refuses_bad(
    start_proxy: Any, redis_server: Any, upstream: DemoUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    running = await start_from_file(start_proxy, path, redis_server.url, upstream.base_url)
    key = await running.account("acme", "10")
    upstream.fault.prompt_tokens, upstream.fault.output_tokens = 1000, 0
    assert await cost_of_one_request(running, key) == "0.002500"

    errors_before = reloads("error")
    path.write_text("models: [this is: not valid\n")
    assert await running.proxy.reload() is False
    assert reloads("error") >= errors_before + 1  # the file watcher may count it too
    assert await cost_of_one_request(running, key) == "0.002500"  # the old config keeps serving

    write_config(path, redis_server.url, upstream.base_url, "5.00")
    assert await running.proxy.reload() is True
    assert await cost_of_one_request(running, key) == "0.005000"


async def test_file_change_is_picked_up_by_the_watcher(
    start_proxy: Any, redis_server: Any, upstream: DemoUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    running = await start_from_file(start_proxy, path, redis_server.url, upstream.base_url)
    old = running.state.config
    write_config(path, redis_server.url, upstream.base_url, "3.00")
    for _ in range(100):  # the watcher polls the file every second
        if running.state.config is not old:
            break
        await asyncio.sleep(0.05)
    assert str(running.state.config.models["gpt-4o"].price.input) == "3.00"


async def test_logs_never_show_keys_or_secrets(proxy: Any, upstream: DemoUpstream) -> None:
    sink = io.StringIO()
    logs.setup("info", stream=sink)
    try:
        key = await proxy.account("acme", "10")
        await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        import structlog

        structlog.get_logger("test").info("oops", leaked=f"upstream said Bearer {UPSTREAM_KEY}", key=key)
    finally:
        logs.setup("warning")
    text = sink.getvalue()
    assert '"event":"request"' in text and '"account_id":"acme"' in text and '"cost_usd"' in text
    assert key not in text and UPSTREAM_KEY not in text and ADMIN_TOKEN not in text
    assert "[REDACTED]" in text


async def test_refused_requests_are_logged_with_account_key_and_model(proxy: Any, upstream: DemoUpstream) -> None:
    import orjson

    from .helpers import CHAT, post

    broke = await proxy.account("broke", usd=None)
    limited = await proxy.account("limited", "10", rl_rpm="1")
    record, narrow = await proxy.state.key_store.create_key("limited", name="narrow", allowed_models=["gpt-4o"])
    sink = io.StringIO()
    logs.setup("info", stream=sink)
    try:
        assert (await post(proxy, broke, "chat/completions", {**CHAT, "model": "gpt-9"}))[0] == 400
        assert (await post(proxy, broke, "chat/completions", CHAT))[0] == 402
        assert (await post(proxy, narrow, "chat/completions", CHAT))[0] == 403
        assert (await post(proxy, limited, "chat/completions", CHAT))[0] == 200
        assert (await post(proxy, limited, "chat/completions", CHAT))[0] == 429
        assert (await post(proxy, "sk-unknown-key-123456", "chat/completions", CHAT))[0] == 401
    finally:
        logs.setup("warning")
    lines = [orjson.loads(line) for line in sink.getvalue().splitlines()]
    seen = [(e["status"], e.get("account_id"), e.get("key_id") is not None, e["model"], e.get("reason"))
            for e in lines if e["event"] == "request"]  # fmt: skip
    assert seen == [
        (400, "broke", True, "gpt-9", "model_not_found"),
        (402, "broke", True, "gpt-4o-mini", "insufficient_quota"),
        (403, "limited", True, "gpt-4o-mini", "model_not_allowed"),
        (200, "limited", True, "gpt-4o-mini", None),
        (429, "limited", True, "gpt-4o-mini", "rate_limit_exceeded"),
        (401, None, False, "none", "invalid_api_key"),
    ]
    assert [e["key_id"] for e in lines if e.get("status") == 403] == [record.key_id]


async def test_health_ready_and_metrics(proxy: Any, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    await proxy.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    async with aiohttp.ClientSession() as session:
        for url in (f"{proxy.url}/healthz", f"{proxy.admin_url}/healthz", f"{proxy.admin_url}/readyz"):
            async with session.get(url) as resp:
                assert resp.status == 200
        async with session.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
    for name in ("metering_proxy_requests_total", "metering_proxy_request_duration_seconds",
                 "metering_proxy_upstream_duration_seconds", "metering_proxy_tokens_total",
                 "metering_proxy_spend_usd_total", "metering_proxy_redis_script_duration_seconds"):  # fmt: skip
        assert name in text
    assert 'route="/v1/chat/completions"' in text
    assert 'metering_proxy_account_spend_usd_total{account_id="acme"}' not in text  # opt-in only


async def test_per_account_spend_series_when_enabled(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy({"metrics": {"per_account_labels": True}})
    key = await running.account("acct-labelled", "10")
    await running.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.admin_url}/metrics") as resp:
            text = await resp.text()
    assert 'metering_proxy_account_spend_usd_total{account_id="acct-labelled"}' in text


async def test_sighup_reloads_a_running_proxy(
    upstream: DemoUpstream, redis: Any, redis_server: Any, tmp_path: Path
) -> None:
    import os
    import signal

    from proxy.embedded import free_port

    from .helpers import funded_key, spawn_proxy, wait_healthy

    port, path = free_port(), tmp_path / "config.yaml"

    def write(price: str) -> None:
        data = deep_merge(BASE_CONFIG, {"server": {"port": port, "admin_port": free_port()},
                                        "redis": {"url": redis_server.url},
                                        "upstreams": {"openai": {"base_url": upstream.base_url}},
                                        "models": {"gpt-4o": {"price": {"input": price}}}})  # fmt: skip
        path.write_text(yaml.safe_dump(data))

    write("2.50")
    key = await funded_key(redis, load_config(path))
    child = spawn_proxy(path, tmp_path / "child.log")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", child)
        upstream.fault.prompt_tokens, upstream.fault.output_tokens = 1000, 0

        async def cost() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                        headers={"Authorization": f"Bearer {key}"},
                                        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 5}) as resp:  # fmt: skip
                    return resp.headers["x-metering-cost-usd"]

        assert await cost() == "0.002500"
        stamp = path.stat()
        write("3.00")  # same size, and the old mtime: the file watcher cannot see it, only SIGHUP
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        child.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await cost() == "0.003000":
                break
            await asyncio.sleep(0.05)  # polling the child process's state
        assert await cost() == "0.003000"
    finally:
        child.terminate()
        child.wait(timeout=10)


async def test_an_empty_admin_token_is_logged_at_startup(start_proxy: Any) -> None:
    sink = io.StringIO()
    logs.setup("info", stream=sink)
    try:
        running = await start_proxy({"server": {"admin_token": ""}})
    finally:
        logs.setup("warning")
    assert "admin" not in running.proxy.ports
    assert '"event":"admin_listener_disabled"' in sink.getvalue() and "admin_token is empty" in sink.getvalue()
