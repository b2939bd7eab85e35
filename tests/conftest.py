"""Real parts only: a redis-server child process, the fake OpenAI upstream as a real
aiohttp server, the proxy on loopback ports, and the official openai SDK as client."""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from redis.asyncio import Redis

from proxy import logs
from proxy.app import Proxy, connect
from proxy.config import Config
from proxy.configfile import parse_config
from proxy.embedded import EmbeddedRedis
from proxy.ledger import GrantSpec
from proxy.state import State
from proxy.testing.upstream import DemoUpstream

from .helpers import Receiver, suite_server

ADMIN_TOKEN = "test-admin-token-123"
UPSTREAM_KEY = "sk-upstream-secret-abcdef123456"

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "admin_host": "127.0.0.1", "admin_port": 0,
               "admin_token": ADMIN_TOKEN, "max_body_bytes": 1_000_000},
    "upstreams": {"openai": {"base_url": "http://placeholder/v1", "api_key": UPSTREAM_KEY, "timeout_s": 30,
                             "connect_timeout_s": 2}},
    "models": {
        "gpt-4o": {"upstream": "openai", "upstream_model": "gpt-4o-2024-08-06", "max_output_tokens": 16384,
                   "price": {"input": "2.50", "cached_input": "1.25", "output": "10.00"}},
        "gpt-4o-mini": {"upstream": "openai", "max_output_tokens": 16384,
                        "price": {"input": "0.15", "cached_input": "0.075", "output": "0.60"}},
        "o3-mini": {"upstream": "openai", "price": {"input": "1.10", "cached_input": "0.55", "output": "4.40"}},
        "text-embedding-3-small": {"upstream": "openai", "price": {"input": "0.02"}},
    },
    "billing": {"markup_percent": 0, "default_max_output_tokens": 1000, "on_insufficient": "reject",
                "reservation_ttl_s": 900},
    "rate_tiers": {"basis": "paid", "tiers": [{"name": "free", "min_usd": "0", "rpm": 10000, "tpm": 100000000}]},
}  # fmt: skip


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    logs.setup("warning")


# A hung test fails, with the stack of every task printed, instead of eating CI's time.
TEST_DEADLINE_S = float(os.environ.get("METERING_TEST_DEADLINE_S", "240"))


@pytest.fixture(autouse=True)
async def _deadline(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    handle = loop.call_later(TEST_DEADLINE_S, _expire, request.node.name, getattr(request, "function", None))
    yield
    handle.cancel()


def _awaiting(coro: Any) -> list[str]:
    """Where a coroutine waits: each frame down its chain of awaits (a task's own stack stops at the top)."""
    where = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _expire(test: str, function: Any) -> None:
    print(f"\n{test} is still running after {TEST_DEADLINE_S:.0f}s; its tasks:", file=sys.stderr)
    tasks = asyncio.all_tasks()
    for task in tasks:
        print(f"{task.get_name()}: {' <- '.join(reversed(_awaiting(task.get_coro())))}", file=sys.stderr)
    name = getattr(function, "__name__", None)
    for task in tasks:  # only the test's own task: the session's servers serve the next tests
        if name is not None and getattr(task.get_coro(), "__name__", None) == name:
            task.cancel(f"{test} ran past its {TEST_DEADLINE_S:.0f}s deadline")


@pytest.fixture(scope="session")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedRedis]:
    # `appendfsync no`: the tests are about logic, not disks. Nothing waits on an fsync (a
    # fresh clone's disk, busy with the install, stalled `everysec` writes past the 2 s
    # timeout), and a SIGKILL still loses no acknowledged write: it is in the page cache.
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), binary=suite_server(), appendfsync="no")
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = connect(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis of this test's own, to kill and restart. A SIGKILL loses nothing it
    acknowledged (its AOF writes sit in the page cache) unless the test takes it away;
    it never fsyncs, so no write waits on a busy disk (see redis_server)."""
    server = EmbeddedRedis(tmp_path / "redis", binary=suite_server(), appendfsync="no")
    await server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def upstream_server() -> AsyncIterator[DemoUpstream]:
    server = DemoUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def upstream(upstream_server: DemoUpstream) -> DemoUpstream:
    upstream_server.reset()
    return upstream_server


@pytest.fixture
def make_config(redis_server: EmbeddedRedis, upstream_server: DemoUpstream, tmp_path: Path) -> Callable[..., Config]:
    def make(extra: dict[str, Any] | None = None) -> Config:
        data = deep_merge(BASE_CONFIG, {"redis": {"url": redis_server.url}, "data_dir": str(tmp_path / "data"),
                                        "upstreams": {"openai": {"base_url": upstream_server.base_url}}})  # fmt: skip
        return parse_config(yaml.safe_dump(deep_merge(data, extra or {})))

    return make


@dataclass
class Running:
    proxy: Proxy
    state: State
    url: str
    admin_url: str
    # closed at teardown, on the test's loop: a pooled socket the garbage collector closes
    # later leaves the loop a stale registration, and a socket reusing its fd goes unread
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, **kwargs)
        self.clients.append(client)
        return client

    async def admin(self, method: str, path: str, json: Any = None, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(method, f"{self.admin_url}{path}", json=json,
                                       headers={"Authorization": f"Bearer {token}"}) as resp:  # fmt: skip
                body = await resp.json(content_type=None)
                return resp.status, body

    async def account(self, account_id: str = "acme", usd: str | None = "10", **fields: Any) -> str:
        """Create an account, fund it with a paid grant and return a fresh API key."""
        await self.state.ledger.save_account(account_id, fields, create=True)
        if usd is not None:
            await self.fund(account_id, usd)
        _, key = await self.state.key_store.create_key(account_id, name="test")
        return key

    async def fund(self, account_id: str, usd: str, kind: str = "paid", **spec: Any) -> dict[str, Any]:

        from proxy.money import to_micro

        _, grant = await self.state.ledger.grant(account_id, GrantSpec(kind, to_micro(usd), **spec))
        return grant

    async def balance(self, account_id: str = "acme") -> Any:
        return await self.state.ledger.touch(account_id)


@pytest.fixture
async def start_proxy(redis: Redis, make_config: Callable[..., Config]) -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def start(extra: dict[str, Any] | None = None, config: Config | None = None,
                    config_path: Path | None = None) -> Running:  # fmt: skip
        proxy = Proxy(config or make_config(extra), config_path)
        state = await proxy.start()
        running = Running(proxy, state, f"http://127.0.0.1:{proxy.ports['client']}",
                          f"http://127.0.0.1:{proxy.ports.get('admin', 0)}")  # fmt: skip
        started.append(running)
        return running

    yield start
    for running in started:
        for client in running.clients:
            await client.close()
        await asyncio.wait_for(running.proxy.stop(), 30)  # a hung shutdown fails the test, not CI


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the session's page tests (tests/browser.py)."""
    from playwright.async_api import async_playwright

    from .browser import launch

    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        yield chromium
        await chromium.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The operator's webhook endpoint, on loopback (helpers.Receiver)."""
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> Running:
    return await start_proxy()  # type: ignore[no-any-return]
