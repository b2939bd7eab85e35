"""SIGTERM on a real proxy process with streams in flight (what Kubernetes does on a
rollout): it stops taking connections at once, says `draining` on /readyz, lets the
streams finish and settles them, and exits 0; streams that outlive
`server.shutdown_timeout_s` are cut and charged for what was relayed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import openai
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from proxy import keyspace, logs, reconcile, relay
from proxy.app import Proxy
from proxy.config import Config
from proxy.embedded import EmbeddedRedis
from proxy.meter import Meter
from proxy.state import State
from proxy.testing.upstream import DemoUpstream

from .conftest import Running
from .helpers import ChildConfig, child_config, entries, funded_key, spawn_proxy, wait_for, wait_healthy

HELD_AT = 2  # events each stream sends before the upstream holds it
STREAMS = 3


async def start(tmp_path: Path, upstream: DemoUpstream, redis_url: str, **server: Any) -> tuple[ChildConfig, Any]:
    cfg = child_config(tmp_path, upstream.base_url, redis_url, {"server": server} if server else None)
    process = spawn_proxy(cfg.path, tmp_path / "proxy.log")
    try:
        await wait_healthy(cfg.url, process)
    except AssertionError:
        process.kill()
        raise AssertionError((tmp_path / "proxy.log").read_text()) from None
    return cfg, process


async def stream(client: openai.AsyncOpenAI) -> tuple[str, Any]:
    chunks = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in chunks:
        text += "".join(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    return text, usage


async def held(upstream: DemoUpstream, count: int) -> None:
    """Until `count` streams wait at the upstream's hold."""
    deadline = asyncio.get_running_loop().time() + 15
    while sum(1 for sent in upstream.chunks_by_request.values() if sent >= HELD_AT) < count:
        assert asyncio.get_running_loop().time() < deadline, upstream.chunks_by_request
        await asyncio.sleep(0.02)  # polling the upstream's state, bounded


async def draining(cfg: ChildConfig) -> None:
    """Until /readyz says draining and the client port refuses new connections."""
    deadline = asyncio.get_running_loop().time() + 15
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{cfg.admin_url}/readyz") as resp:
                if resp.status == 503 and (await resp.json())["status"] == "draining":
                    break
            assert asyncio.get_running_loop().time() < deadline, "never draining"
            await asyncio.sleep(0.02)  # polling a child process, bounded
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", cfg.port)
        except ConnectionRefusedError:
            return
        writer.close()
        assert asyncio.get_running_loop().time() < deadline, "the client port still accepts"
        await asyncio.sleep(0.02)


async def exit_code(process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    return await asyncio.to_thread(process.wait, timeout_s)


async def no_open_reservation(redis: Redis, account_id: str = "acme") -> None:
    assert await redis.hgetall(keyspace.account(account_id, "resv")) == {}
    assert await redis.hget(keyspace.account(account_id, "acct"), "reserved") == "0"
    assert not await reconcile.check_account(redis, account_id)


async def test_sigterm_drains_streams_in_flight_and_settles_them(
    tmp_path: Path, upstream: DemoUpstream, redis: Redis, redis_server: Any
) -> None:
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8
    cfg, process = await start(tmp_path, upstream, redis_server.url)
    try:
        client = openai.AsyncOpenAI(
            base_url=f"{cfg.url}/v1", api_key=await funded_key(redis, cfg.config), max_retries=0
        )
        streams = [asyncio.create_task(stream(client)) for _ in range(STREAMS)]
        await held(upstream, STREAMS)

        process.send_signal(signal.SIGTERM)
        await draining(cfg)
        late = openai.AsyncOpenAI(base_url=f"{cfg.url}/v1", api_key="sk-whoever-123456", max_retries=0)
        with pytest.raises(openai.APIConnectionError):  # a new request finds the door shut
            await late.models.list()
        assert process.poll() is None and not any(s.done() for s in streams)  # still serving them

        upstream.release.set()
        results = await asyncio.gather(*streams)
        assert await exit_code(process) == 0
    finally:
        upstream.release.set()
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "proxy.log").read_text()
    assert '"event":"draining"' in log and '"requests_in_flight":3' in log
    assert '"event":"stopped"' in log.splitlines()[-1] and '"settlements_journaled":0' in log  # the drain is over

    assert all(len(text) > 0 and usage.completion_tokens == 8 for text, usage in results)
    usage_entries = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert len(usage_entries) == STREAMS and not any(e.get("estimated") for e in usage_entries)
    assert sorted(e["request_id"] for e in usage_entries) == sorted(upstream.chunks_by_request)
    assert all(e["usage"]["output_tokens"] == 8 and int(e["amount"]) < 0 for e in usage_entries)  # what upstream said
    await no_open_reservation(redis)


async def test_streams_past_the_grace_period_are_cut_and_charged_for_what_was_relayed(
    tmp_path: Path, upstream: DemoUpstream, redis: Redis, redis_server: Any
) -> None:
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8
    cfg, process = await start(tmp_path, upstream, redis_server.url, shutdown_timeout_s=0.5)
    try:
        client = openai.AsyncOpenAI(
            base_url=f"{cfg.url}/v1", api_key=await funded_key(redis, cfg.config), max_retries=0
        )
        task = asyncio.create_task(stream(client))
        await held(upstream, 1)
        process.send_signal(signal.SIGTERM)  # and the upstream never goes on
        assert await exit_code(process) == 0
        with pytest.raises(openai.APIError):  # cut: the stream never ended
            await task
    finally:
        upstream.release.set()
        if process.poll() is None:
            process.kill()
    [entry] = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert entry["estimated"] is True
    assert entry["usage"]["output_tokens"] >= 1  # the deltas relayed before the cut, counted
    await no_open_reservation(redis)


OPEN_GAUGE = "metering_proxy_reservations_open"


async def held_request(running: Running, upstream: DemoUpstream) -> tuple[asyncio.Task[Any], Meter, float | None]:
    """A stream the upstream holds, admitted: its client task, its meter, and this
    instance's open-reservation gauge before it."""
    client = running.client(await running.account())
    opened = REGISTRY.get_sample_value(OPEN_GAUGE)
    task = asyncio.create_task(stream(client))
    await held(upstream, 1)
    (meter,) = running.state.inflight.values()
    return task, meter, opened


async def cut_off_mid_settlement(
    config: Config, upstream: DemoUpstream, hold_redis: Callable[[], Awaitable[None]]
) -> tuple[State, Meter, float | None]:
    """An in-process proxy (`config`: a short `shutdown_timeout_s`) streams a request;
    `hold_redis` keeps its settlement waiting; the stream ends and the proxy stops, so the
    grace period cancels the handler mid-settlement. Returns the stopped proxy's state,
    the request's meter and the gauge before it."""
    proxy = Proxy(config)
    state = await proxy.start()
    running = Running(proxy, state, f"http://127.0.0.1:{proxy.ports['client']}", "")
    stopped = False
    try:
        task, meter, opened = await held_request(running, upstream)
        await hold_redis()
        upstream.release.set()  # the stream ends; its settlement waits
        await wait_for(lambda: meter.settled is not None, what="the settlement under way")
        await asyncio.wait_for(proxy.stop(), 30)  # cancels the handler 0.3 s on, mid-settlement
        stopped = True
        with pytest.raises(openai.APIError):  # its end was held for the settlement: never sent
            await task
    finally:
        upstream.release.set()
        for client in running.clients:
            await client.close()
        if not stopped:
            await asyncio.wait_for(proxy.stop(), 30)
    return state, meter, opened


@contextlib.contextmanager
def unretrieved_exceptions() -> Iterator[list[dict[str, Any]]]:
    """What the loop reports of exceptions nobody retrieved (tasks, futures), collected
    once the garbage is."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        yield reported
    finally:
        gc.collect()
        loop.set_exception_handler(previous)


async def test_a_settlement_the_grace_period_cuts_off_is_finished_once(
    make_config: Any, upstream: DemoUpstream, redis: Redis
) -> None:
    """The grace period ends while a stream's settlement waits on Redis (CLIENT PAUSE
    holds its write): the handler is cancelled in the middle of settling, a task of its
    own finishes the settlement, and the request is charged once, its reservation closed,
    this instance's open-reservation gauge back where it was."""
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8

    async def pause() -> None:
        await redis.execute_command("CLIENT", "PAUSE", 1500, "WRITE")

    config = make_config({"server": {"shutdown_timeout_s": 0.3}})
    state, meter, opened = await cut_off_mid_settlement(config, upstream, pause)
    [entry] = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert entry["usage"]["output_tokens"] == 8 and entry["request_id"] == meter.request_id
    await no_open_reservation(redis)
    assert state.inflight == {} and meter.settled is not None and meter.settled.done()
    assert REGISTRY.get_sample_value(OPEN_GAUGE) == opened


async def test_a_request_cut_off_mid_settlement_has_its_access_line(
    make_config: Any, upstream: DemoUpstream, redis: Redis
) -> None:
    """A handler the grace period cancels while it settles still writes the request's
    access line: the operator sees every request, and why it was cut."""
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8

    async def pause() -> None:
        await redis.execute_command("CLIENT", "PAUSE", 1500, "WRITE")

    sink = io.StringIO()
    logs.setup("info", stream=sink)
    try:
        _, meter, _ = await cut_off_mid_settlement(
            make_config({"server": {"shutdown_timeout_s": 0.3}}), upstream, pause
        )
    finally:
        logs.setup("warning")
    lines = [orjson.loads(line) for line in sink.getvalue().splitlines()]
    [line] = [e for e in lines if e["event"] == "request" and e.get("request_id") == meter.request_id]
    assert line["status"] == 499 and line["account_id"] == "acme", line
    # charged by the handler's own settle.lua call, whose reply it was cancelled before
    # reading: the hand-over's call finds it settled, so the line cannot say a cost
    assert line["output_tokens"] == 8 and line["duplicate"] is True and "cost_usd" not in line, line
    assert line["outcome"] == "cut off by shutdown while settling (a task finishes it)", line


async def test_a_request_cut_off_after_its_settlement_is_not_said_to_be_settling() -> None:
    """A stream settled, then cut writing its end (a client that stopped reading): no
    task is finishing anything, and its line must not say one is."""
    loop = asyncio.get_running_loop()
    under_way, finished = loop.create_future(), loop.create_future()
    finished.set_result(None)

    def outcome(settled: asyncio.Future[Any] | None) -> str:
        return relay.cut_off(cast(Meter, SimpleNamespace(settled=settled)))

    assert outcome(None) == outcome(finished) == "cut off by shutdown"
    assert outcome(under_way) == "cut off by shutdown while settling (a task finishes it)"
    under_way.cancel()


async def test_a_handed_over_settlement_that_fails_leaves_no_unretrieved_task_exception(
    start_proxy: Any, upstream: DemoUpstream, redis: Redis
) -> None:
    """A settlement cut off by cancellation is finished by a task of its own; when that
    task's settlement fails for a reason other than an outage (Redis refuses settle.lua's
    writes for want of replicas: NOREPLICAS), the failure is the settlement's outcome, logged,
    not a task exception nobody retrieves ("Task exception was never retrieved" noise);
    the gauge and `inflight` are cleaned up once."""
    upstream.fault.hold_after_chunks = HELD_AT
    running = await start_proxy()
    with unretrieved_exceptions() as unretrieved:
        task, meter, opened = await held_request(running, upstream)
        try:
            await redis.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            settling = asyncio.create_task(meter.settle())  # as the handler's `finally` does
            await wait_for(lambda: meter.settled is not None, what="the settlement under way")
            settling.cancel()  # the handler cancelled mid-settlement: the settlement is handed over
            with pytest.raises(asyncio.CancelledError):
                await settling
            await redis.config_set("min-replicas-to-write", 1)
            await redis.execute_command("CLIENT", "UNPAUSE")
            await wait_for(lambda: meter.settled is not None and meter.settled.done(), what="the hand-over's end")
            await wait_for(lambda: not running.state.background, what="the hand-over task's end")
            with pytest.raises(Exception, match="NOREPLICAS"):
                await meter.settle()  # a second call: the same outcome
            assert running.state.inflight == {}
            assert REGISTRY.get_sample_value(OPEN_GAUGE) == opened
        finally:
            await redis.config_set("min-replicas-to-write", 0)
            await redis.execute_command("CLIENT", "UNPAUSE")
            upstream.release.set()
            with contextlib.suppress(openai.APIError):
                await task
            del task
    assert [c["message"] for c in unretrieved] == []


async def test_a_settlement_cut_off_while_redis_is_down_is_journaled_and_charged_once(
    make_config: Any, upstream: DemoUpstream, own_redis: EmbeddedRedis
) -> None:
    """Redis is gone when a stream ends: its settlement is in its retries (or writing the
    journal) when the grace period cancels the handler. The hand-over finishes it into
    the journal, the stop leaves it on disk, and the next start on the same data_dir,
    Redis back, charges it once, exactly; no task exception is left unretrieved."""
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8
    extra = {"redis": {"url": own_redis.url}, "server": {"shutdown_timeout_s": 0.3}}

    async def kill() -> None:
        assert own_redis.process is not None
        own_redis.process.kill()
        own_redis.process.wait()

    with unretrieved_exceptions() as unretrieved:
        state, meter, opened = await cut_off_mid_settlement(make_config(extra), upstream, kill)
        assert meter.settled is not None and meter.settled.done() and state.inflight == {}
        assert REGISTRY.get_sample_value(OPEN_GAUGE) == opened
        assert state.journal is not None and len(state.journal) == 1  # kept on disk for the next start
        await own_redis.start()
        again = Proxy(make_config(extra))
        await again.start()  # adopts the journal and replays it
        try:
            redis = again.state.redis if again.state else None
            assert redis is not None
            [entry] = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
            assert entry["usage"]["output_tokens"] == 8 and entry["request_id"] == meter.request_id
            await no_open_reservation(redis)
        finally:
            await asyncio.wait_for(again.stop(), 30)
    assert [c["message"] for c in unretrieved] == []


async def test_a_settlement_cancelled_twice_is_finished_once_and_every_caller_gets_it(
    start_proxy: Any, upstream: DemoUpstream, redis: Redis
) -> None:
    """The handler's settlement is cancelled, then its second call (the relay's outer
    `finally`) is cancelled too, while Redis holds the write: one hand-over finishes it,
    the request is charged once, and a later call gets that same settlement."""
    upstream.fault.hold_after_chunks, upstream.fault.output_tokens = HELD_AT, 8
    running = await start_proxy()
    task, meter, opened = await held_request(running, upstream)
    try:
        await redis.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        for _ in range(2):
            settling = asyncio.create_task(meter.settle())
            await wait_for(lambda: meter.settled is not None, what="the settlement under way")
            await asyncio.sleep(0)  # one loop turn: the new task runs to its first await (not a timing wait)
            settling.cancel()
            with pytest.raises(asyncio.CancelledError):
                await settling
        assert len(running.state.background) == 1  # one hand-over, not one per cancel
        await redis.execute_command("CLIENT", "UNPAUSE")
        settlement = await meter.settle()
        assert settlement is not None and meter.settled is not None and settlement is meter.settled.result()
        assert running.state.inflight == {}
        assert REGISTRY.get_sample_value(OPEN_GAUGE) == opened
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        upstream.release.set()
        with contextlib.suppress(openai.APIError):
            await task
    [entry] = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
    assert entry["request_id"] == meter.request_id
    await no_open_reservation(redis)
