"""A Redis restarting with a large dataset answers `-LOADING`: the same store-unavailable
error on both transports, so a 503 on admission and a retried settlement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import errors
from proxy.app import connect
from proxy.embedded import EmbeddedRedis
from proxy.resp import RespClient

from .conftest import Running
from .helpers import entries
from .loading import RestartingRedis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
COMPLETION = {
    "id": "chatcmpl-held", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}  # fmt: skip


@pytest.fixture
async def restarting(redis: Any, redis_server: EmbeddedRedis) -> AsyncIterator[RestartingRedis]:
    standin = RestartingRedis(redis_server.port)
    await standin.start()
    yield standin
    await standin.stop()


async def post(url: str, key: str, path: str = "/v1/chat/completions", body: Any = CHAT) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        method = "POST" if body is not None else "GET"
        async with session.request(method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json(content_type=None), r.headers


def assert_store_unavailable(status: int, body: Any) -> None:
    assert status == 503, body
    assert body["error"]["code"] == "metering_unavailable" and body["error"]["type"] == "server_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_both_transports_raise_store_unavailable_errors(restarting: RestartingRedis) -> None:
    restarting.set_loading(True)
    lean, pooled = RespClient(restarting.url), connect(restarting.url)
    try:
        with pytest.raises(errors.REDIS_DOWN):
            await lean.call("EVALSHA", "0" * 40, 0)
        with pytest.raises(errors.REDIS_DOWN):
            await pooled.get("k")
    finally:
        await lean.aclose()
        await pooled.aclose()


async def test_admission_during_loading_is_503(start_proxy: Callable[..., Any], restarting: RestartingRedis,
                                               redis: Any) -> None:  # fmt: skip
    running: Running = await start_proxy({"redis": {"url": restarting.url}})
    assert running.state.ledger.fast is not None  # the lean client takes the admission
    key = await running.account("acme", "10")
    assert (await post(running.url, key))[0] == 200  # the key is now cached: only admission meets Redis
    restarting.set_loading(True)
    status, body, _ = await post(running.url, key)
    assert_store_unavailable(status, body)
    status, body, _ = await post(running.url, key, "/v1/models", None)
    assert_store_unavailable(status, body)
    restarting.set_loading(False)
    assert (await post(running.url, key))[0] == 200
    assert [e["type"] for e in await entries(redis, "acme")] == ["grant", "usage", "usage"]


async def test_settlement_during_loading_is_retried(start_proxy: Callable[..., Any], restarting: RestartingRedis,
                                                    redis: Any) -> None:  # fmt: skip
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(_: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response(COMPLETION)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", held)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        running: Running = await start_proxy(
            {"redis": {"url": restarting.url}, "upstreams": {"openai": {"base_url": upstream_url}}}
        )
        key = await running.account("acme", "10")
        request = asyncio.create_task(post(running.url, key))
        await arrived.wait()  # admitted and forwarded: the settlement is next
        restarting.set_loading(True)
        release.set()
        await restarting.refusal(lambda c: c[0].upper() in ("EVALSHA", "FCALL") and any("{acme}" in a for a in c))
        restarting.set_loading(False)
        status, body, headers = await asyncio.wait_for(request, 30)
        assert status == 200, body
        assert headers["x-metering-cost-usd"] == "0.000003"  # 10 x $0.15 + 2 x $0.60 per 1M, rounded half-up
        usage = [e for e in await entries(redis, "acme") if e["type"] == "usage"]
        assert len(usage) == 1 and usage[0]["usage"]["output_tokens"] == 2
        assert (await running.balance("acme")).reserved == 0
    finally:
        await runner.cleanup()
