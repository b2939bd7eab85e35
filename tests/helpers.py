"""Test helpers that synchronise on real state (Redis streams), never on sleeps."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from redis.asyncio import Redis

from proxy import keyspace
from proxy.ledger import GrantSpec
from proxy.webhooks import verify

if TYPE_CHECKING:  # conftest imports this module
    from .conftest import Running


def suite_server() -> str | None:
    """The redis-server the suite runs on: `METERING_TEST_REDIS_SERVER` (CI's second pass,
    on another server), else None, the proxy's own choice (the pinned Valkey)."""
    return os.environ.get("METERING_TEST_REDIS_SERVER") or None


async def last_entry_id(redis: Redis, account_id: str) -> str:
    rows = await redis.xrevrange(keyspace.account(account_id, "ledger"), count=1)
    return str(rows[0][0]) if rows else "0-0"


async def next_entry(redis: Redis, account_id: str, after: str, timeout_s: float = 10) -> dict[str, Any]:
    """Block until the account's ledger gets an entry after `after` (XREAD BLOCK)."""
    key = keyspace.account(account_id, "ledger")
    rows = None
    for _ in range(max(1, int(timeout_s / 1.5))):  # blocks of 1.5 s: the client's socket timeout is 2 s
        rows = await redis.xread({key: after}, count=1, block=1500)
        if rows:
            break
    assert rows, f"no ledger entry for {account_id} within {timeout_s}s"
    entry: dict[str, Any] = orjson.loads(rows[0][1][0][1]["e"])
    return entry


async def next_entries(redis: Redis, account_id: str, after: str, count: int, timeout_s: float = 20) -> list[Any]:
    """Block until `count` ledger entries follow `after`; returns them, oldest first."""
    key = keyspace.account(account_id, "ledger")
    found: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(found) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(found)} of {count} entries within {timeout_s}s"
        rows = await redis.xread({key: after}, count=count - len(found), block=1500)
        for _, stream_rows in rows or ():
            for entry_id, fields in stream_rows:
                found.append(orjson.loads(fields["e"]))
                after = entry_id
    return found


async def entries(redis: Redis, account_id: str) -> list[dict[str, Any]]:
    rows = await redis.xrange(keyspace.account(account_id, "ledger"))
    return [orjson.loads(fields["e"]) for _, fields in rows]


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


async def wait_for(condition: Callable[[], bool], timeout_s: float = 15, what: str = "the condition") -> None:
    """Poll real state (in this process) until `condition` holds, within a bound."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not hold within {timeout_s}s"
        await asyncio.sleep(0.02)  # polling state, bounded


def spawn_proxy(config_file: Path, log: Path, stderr_log: Path | None = None) -> subprocess.Popen[bytes]:
    """`metering-proxy serve` as a child; stderr goes to `log` too unless given its own file."""
    with log.open("wb") as out, (stderr_log or log).open("ab") as err:  # the child keeps its own copies
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config_file), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT if stderr_log is None else err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def funded_key(redis: Redis, config: Any, account_id: str = "acme", micro: int = 10_000_000) -> str:
    """An account with a paid grant and an API key, made straight through the ledger
    (for tests whose proxy runs in a child process)."""
    from proxy.keys import KeyStore
    from proxy.ledger import Ledger

    ledger = Ledger(redis, config)
    await ledger.save_account(account_id, {}, create=True)
    await ledger.grant(account_id, GrantSpec("paid", micro, id="grant_1"))
    _, key = await KeyStore(redis).create_key(account_id)
    return key


@dataclass(frozen=True)
class ChildConfig:
    """Where a proxy in a child process listens, and its config (file and parsed)."""

    port: int
    admin_port: int
    path: Path
    config: Any  # proxy.config.Config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def child_config(
    tmp_path: Path, upstream_url: str, redis_url: str, extra: dict[str, Any] | None = None, name: str = "proxy"
) -> ChildConfig:
    """A config file for a proxy in a child process, on ports of its own and its own
    data_dir (`tmp_path/name/data`)."""
    import yaml

    from proxy.configfile import parse_config
    from proxy.embedded import free_port

    from .conftest import BASE_CONFIG, deep_merge  # conftest imports this module first

    port, admin_port = free_port(), free_port()
    data = deep_merge(BASE_CONFIG, {
        "server": {"port": port, "admin_port": admin_port},
        "redis": {"url": redis_url},
        "upstreams": {"openai": {"base_url": upstream_url}},
        "data_dir": str(tmp_path / name / "data"),
    })  # fmt: skip
    text = yaml.safe_dump(deep_merge(data, extra or {}))
    path = tmp_path / name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return ChildConfig(port, admin_port, path, parse_config(text))


def raise_fd_limit() -> None:
    """Thousands of concurrent sockets: lift the soft descriptor limit to the hard one
    (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def scrape(admin_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A proxy's /metrics (admin listener): sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin_url}/metrics") as resp:
            assert resp.status == 200, resp.status
            text = await resp.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def histogram_figures(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict[str, float]:
    """count, p50, p99 and max of a Prometheus histogram, each quantile as the upper bound
    of the bucket it falls in (what a histogram can honestly say)."""
    buckets = sorted((float(labels["le"]), value) for labels, value in samples.get(f"{name}_bucket", []))
    count = buckets[-1][1] if buckets else 0.0

    def bound(q: float) -> float:
        return next((le for le, seen in buckets if seen >= q * count), 0.0) if count else 0.0

    return {"count": count, "p50": bound(0.5), "p99": bound(0.99), "max": bound(1.0)}


@dataclass
class Attempt:
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    raw: bytes = b""  # the body as signed


@dataclass
class Receiver:
    """The operator's endpoint: verifies signatures, records attempts, fails on demand."""

    secret: str = field(default_factory=lambda: "whsec_" + base64.b64encode(os.urandom(24)).decode())
    attempts: list[Attempt] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many more (valid) deliveries
    on_event: Callable[[dict[str, Any]], Awaitable[int | None]] | None = None  # may override the status
    bad_signatures: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not verify(self.secret, request.headers, raw):
            self.bad_signatures += 1
            return web.Response(status=401)
        body = orjson.loads(raw)
        status = 204
        if self.on_event is not None:
            status = await self.on_event(body) or status
        if self.fail_next > 0:
            self.fail_next -= 1
            status = 500
        self.attempts.append(Attempt(dict(request.headers), body, status, raw))
        return web.Response(status=status)

    def delivered(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return [a.body for a in self.attempts if a.status == 204 and event_type in (None, a.body["type"])]


def hook_config(receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    hooks = {"url": receiver.url, "secret": receiver.secret, "low_balance_thresholds_usd": ["5", "1"],
             "max_attempts": 3, "auto_topup_cooldown_s": 0, **overrides}  # fmt: skip
    return {"webhooks": hooks}


async def pause_background_worker(running: Running) -> None:
    assert running.proxy.worker is not None
    running.proxy.worker.stop()
    task = running.proxy.worker_task
    assert task is not None
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task}, "the background worker did not stop"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def raw_exchange(port: int, data: bytes, timeout_s: float = 5) -> bytes:
    """Send bytes as they are and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


BURST = 400  # requests in flight at once: four times redis-py's default pool of 100


MODELS_BURST = 300


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def fresh_keys(running: Running, count: int, account_id: str = "acme") -> list[str]:
    """One funded account with `count` keys that no proxy has cached yet."""
    keys = [await running.account(account_id, "100")]
    for _ in range(count - 1):
        _, key = await running.state.key_store.create_key(account_id, name="burst")
        keys.append(key)
    return keys


async def burst(url: str, method: str, path: str, keys: list[str], body: Any = None) -> Counter[int]:
    """Every key's request at once, each on its own connection: the statuses counted,
    and any 5xx shown whole."""
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap: the proxy sees them all

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(key: str) -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {key}"}
            async with session.request(method, f"{url}{path}", json=body, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        results = await asyncio.gather(*(one(key) for key in keys))
    statuses = Counter(status for status, _ in results)
    server_errors = [answer for status, answer in results if status >= 500]
    assert not server_errors, f"{statuses}; first: {server_errors[0]}"
    return statuses


PDF = {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}


async def post(running: Running, key: str, endpoint: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    """Raw HTTP: the body goes as built (or as `raw` bytes), whatever the SDK's types allow."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode()  # json: ints past 2^64 too
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{running.url}/v1/{endpoint}", data=data, headers=headers) as resp:
            text = await resp.read()
            try:
                return resp.status, orjson.loads(text)
            except orjson.JSONDecodeError:
                return resp.status, text.decode()


async def get(running: Running, key: str, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
    """A raw GET on the client listener (`path` after /v1): status and JSON body."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.url}/v1/{path}", params=params,
                               headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.headers["x-request-id"].startswith("req_")
            return resp.status, await resp.json(content_type=None)
