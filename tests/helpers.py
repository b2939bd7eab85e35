"""Test helpers that synchronise on real state (Redis streams), never on sleeps."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from proxy import keyspace


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
    from proxy.accounts import Accounts
    from proxy.ledger import Ledger

    ledger = Ledger(redis, config)
    await ledger.save_account(account_id, {}, create=True)
    await ledger.grant(account_id, {"id": "grant_1", "kind": "paid", "amount": str(micro)})
    _, key = await Accounts(redis).create_key(account_id)
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
