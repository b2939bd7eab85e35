"""The account scripts as one Redis function library (scripts.LIBRARY, FCALL on the hot
path): loaded once, loaded again when Redis lost it, and plain scripts (EVALSHA) on a
Redis without functions."""

from __future__ import annotations

import asyncio
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import exceptions as redis_errors

from proxy import keyspace
from proxy.app import connect
from proxy.configfile import parse_config
from proxy.embedded import free_port, server_binary
from proxy.ledger import GrantSpec, Ledger, SettleCall
from proxy.resp import RespClient
from proxy.runner import LeanRunner

from .conftest import BASE_CONFIG, Running
from .helpers import suite_server


async def fcalls(redis: Any) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_fcall", {}).get("calls", 0))


async def metered_request(ledger: Ledger, request_id: str) -> None:
    await ledger.admit("acme", "key_1", "gpt-4o-mini", request_id, prompt_cost=10, output_cost=20, output_pico=0,
                       prompt_tokens=5, max_output_tokens=5, choices=1)  # fmt: skip
    settled = await ledger.settle(
        SettleCall("acme", "gpt-4o-mini", request_id, Decimal(12), 8, {"model": "gpt-4o-mini"})
    )
    assert settled.cost == 12 and not settled.duplicate


async def test_the_hot_path_calls_functions_and_loads_them_again_after_a_flush(proxy: Running) -> None:
    ledger, redis = proxy.state.ledger, proxy.state.redis
    assert isinstance(ledger.runner, LeanRunner)
    await proxy.account("acme", "1")
    await redis.hset(keyspace.account("acme", "keys"), "key_1", "active")
    before = await fcalls(redis)
    await metered_request(ledger, "req_1")
    assert await fcalls(redis) >= before + 2 and ledger.runner.functions
    await redis.execute_command("FUNCTION", "FLUSH")  # as a restart without persistence leaves it
    await metered_request(ledger, "req_2")
    assert (await ledger.touch("acme")).balance == 1_000_000 - 24


@pytest.fixture(params=["FCALL", "FUNCTION"])
async def redis_without_functions(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A real Redis on which FCALL does not exist (as on Redis 6.2), or FUNCTION (as where
    a managed Redis or an ACL refuses to load functions)."""
    port = free_port()
    binary = suite_server() or server_binary()
    argv = [binary, "--port", str(port), "--save", "", "--dir", str(tmp_path), "--rename-command", request.param, ""]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    client = connect(f"redis://127.0.0.1:{port}/0")

    for _ in range(500):  # polling the server's readiness, bounded
        try:
            await client.ping()
            break
        except redis_errors.ConnectionError:
            await asyncio.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0", client
    await client.aclose()
    server.terminate()
    server.wait(timeout=10)


async def test_a_redis_without_functions_runs_the_same_scripts(redis_without_functions: Any) -> None:
    url, redis = redis_without_functions
    fast = RespClient(url)
    ledger = Ledger(redis, parse_config(yaml.safe_dump(BASE_CONFIG)), fast=fast)
    await ledger.save_account("acme", {}, create=True)
    await ledger.grant("acme", GrantSpec("paid", 1_000_000))
    await redis.hset(keyspace.account("acme", "keys"), "key_1", "active")
    await metered_request(ledger, "req_1")
    await metered_request(ledger, "req_2")
    assert isinstance(ledger.runner, LeanRunner) and not ledger.runner.functions
    assert (await ledger.touch("acme")).balance == 1_000_000 - 24
    await fast.aclose()


async def test_on_one_redis_the_admission_writes_the_reapers_watch_pointer_itself(
    redis: Any, redis_server: Any
) -> None:
    """One top-level command per admission on a single Redis: admit.lua writes the watch
    pointer with the reservation (atomic with it), instead of a ZADD pipelined before it."""
    fast = RespClient(redis_server.url)
    ledger = Ledger(redis, parse_config(yaml.safe_dump(BASE_CONFIG)), fast=fast)
    await ledger.save_account("watched", {}, create=True)
    await ledger.grant("watched", GrantSpec("paid", 1_000_000))
    await redis.hset(keyspace.account("watched", "keys"), "key_1", "active")
    shard = keyspace.watch_shard("watched")
    await redis.zrem(shard, "watched")
    await fast.call("PING")  # connected (HELLO, CLIENT SETNAME) before the count
    async with redis.monitor() as monitor:
        await ledger.admit("watched", "key_1", "gpt-4o-mini", "req_w", prompt_cost=10, output_cost=20,
                           output_pico=0, prompt_tokens=5, max_output_tokens=5, choices=1)  # fmt: skip
        await redis.echo("end-of-admission")
        seen = []
        while "end-of-admission" not in (command := await monitor.next_command())["command"]:
            seen.append(command)
    ours = [c for c in seen if "{watched}" in c["command"] or shard in c["command"]]  # not a pool's HELLO
    top = [c["command"].split()[0] for c in ours if c["client_type"] != "lua"]
    inner = [c["command"].split()[:3] for c in ours if c["client_type"] == "lua"]
    assert top == ["FCALL"]
    assert ["ZADD", shard, "LT"] in inner
    assert await redis.zscore(shard, "watched") is not None
    await fast.aclose()
