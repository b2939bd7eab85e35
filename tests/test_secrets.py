"""A full proxy process, driven the ways that used to leak, then every line it wrote to
stdout and stderr searched for every secret: the admin token, each client key, the
upstream key (not shaped like sk-...) and both webhook signing secrets. 0 hits."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy import logs
from proxy.embedded import EmbeddedRedis, free_port
from proxy.testing.upstream import DemoUpstream

from .conftest import BASE_CONFIG, deep_merge
from .helpers import Receiver, new_secret, raw_exchange, spawn_proxy, wait_healthy

UPSTREAM_KEY = "AZKEY" + secrets.token_hex(12)


@pytest.fixture
async def receiver() -> Any:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


def bare_lf(path: str, credential: str) -> bytes:
    return f"GET {path} HTTP/1.1\nHost: x\nAuthorization: Bearer {credential}\n\n".encode()


async def test_no_secret_reaches_stdout_or_stderr(
    redis_server: EmbeddedRedis, redis: Any, upstream: DemoUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    """`redis` flushes the shared server first: the account it creates must be new."""
    admin_token, old_secret = secrets.token_urlsafe(24), new_secret()
    port, admin_port = free_port(), free_port()
    config = deep_merge(BASE_CONFIG, {
        "server": {"port": port, "admin_port": admin_port, "admin_token": admin_token},
        "redis": {"url": redis_server.url}, "data_dir": str(tmp_path / "data"),
        "upstreams": {"openai": {"base_url": upstream.base_url, "api_key": UPSTREAM_KEY}},
        "webhooks": {"url": receiver.url, "secret": receiver.secret, "previous_secrets": [old_secret],
                     "low_balance_thresholds_usd": ["5"]},
    })  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    child = spawn_proxy(path, out, err)
    url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        await wait_healthy(url, child)
        keys = await drive(url, admin_url, admin_token, upstream, receiver, path)
    finally:
        child.terminate()
        child.wait(timeout=15)
    stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    # the run happened and was logged, aiohttp's own parser errors included
    assert stdout.count('"event":"request"') >= 4 and '"logger":"aiohttp.server"' in stdout, stdout[-3000:]
    for secret in (admin_token, UPSTREAM_KEY, receiver.secret, old_secret, *keys):
        for name, text in (("stdout", stdout), ("stderr", stderr)):
            assert secret not in text, f"a secret in {name}"
            assert secret[6:] not in text  # nor the base64 of a whsec_ secret


async def drive(
    url: str, admin_url: str, token: str, upstream: DemoUpstream, receiver: Receiver, path: Path
) -> list[str]:
    """Admin calls, client traffic (upstream 401s quoting the key), bare-LF requests on
    both ports and webhook deliveries. Returns the client keys created."""
    admin = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:

        async def call(method: str, route: str, body: Any = None) -> Any:
            async with session.request(method, admin_url + route, json=body, headers=admin) as resp:
                assert resp.status < 300, await resp.text()
                return await resp.json()

        await call("POST", "/admin/v1/accounts", {"id": "acme"})
        keys = [(await call("POST", "/admin/v1/accounts/acme/keys", {"name": n}))["key"] for n in ("a", "b")]
        await call("POST", "/admin/v1/accounts/acme/credits", {"amount_usd": "10", "kind": "paid"})
        await call("GET", "/admin/v1/accounts/acme/keys")
        async with session.get(admin_url + "/admin/v1/accounts", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=keys[0], max_retries=0)
    chat: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    await client.chat.completions.create(**chat)
    [_ async for _ in await client.chat.completions.create(**chat, stream=True)]
    await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=keys[1], max_retries=0).models.list()
    upstream.fault.status, upstream.fault.error_message = 401, f"Incorrect API key provided: {UPSTREAM_KEY}."
    for stream in (False, True):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(**chat, stream=stream)
        assert UPSTREAM_KEY not in caught.value.response.text
    upstream.fault.status = None
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=keys[0] + "x", max_retries=0).models.list()
    client_port, admin_port = int(url.rsplit(":", 1)[1]), int(admin_url.rsplit(":", 1)[1])
    for port, credential in ((admin_port, token), (client_port, keys[0])):
        assert (await raw_exchange(port, bare_lf("/admin/v1/accounts", credential))).startswith(b"HTTP/1.0 400")
    await until_delivered(receiver, {"credits.granted"})
    health = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "--config", str(path), "healthcheck")
    assert await asyncio.wait_for(health.wait(), 20) == 0
    return keys


async def until_delivered(receiver: Receiver, types: set[str], timeout_s: float = 15) -> None:
    """The child's own worker delivers them: poll the receiver (real state), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not types <= {a.body["type"] for a in receiver.attempts if a.status == 204}:
        assert loop.time() < deadline, [a.body["type"] for a in receiver.attempts]
        await asyncio.sleep(0.05)  # polling the receiver, not a synchronisation
    assert receiver.bad_signatures == 0


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_a_bearer_credential_is_redacted_however_its_scheme_is_cased(scheme: str) -> None:
    """HTTP auth schemes are case-insensitive: a key sent as `BEARER …` is as secret."""
    line = logs.Redactor().scrub(f"Authorization: {scheme} opaque.token-123 trailing")
    assert "opaque.token-123" not in line and line.endswith(f"{scheme} {logs.REDACTED} trailing")


def test_the_access_line_is_what_structlogs_chain_renders_and_redacted() -> None:
    """relay.py's line per request skips structlog's processors (for speed): the same JSON
    comes out, key for key in the same order, through the same redactor."""
    import io
    import json

    import structlog

    out = io.StringIO()
    logs.setup("info", out)
    logs.REDACTOR.use([UPSTREAM_KEY])
    try:
        fields = {"request_id": "req_1", "model": f"gpt {UPSTREAM_KEY}", "status": 200, "duration_ms": 1.5}
        logs.access(fields)
        structlog.get_logger("proxy").info("request", **fields)
        logs._PENDING.flush()
        fast, chain = (json.loads(line) for line in out.getvalue().splitlines())
        assert fast["model"] == "gpt [REDACTED]" and UPSTREAM_KEY not in out.getvalue()
        assert list(fast) == list(chain) and {**fast, "timestamp": ""} == {**chain, "timestamp": ""}
        assert fast["timestamp"].endswith("Z") and len(fast["timestamp"]) == len(chain["timestamp"])
        logs.setup("warning", out)
        logs.access(fields)  # below the level: not written
        logs._PENDING.flush()
        assert len(out.getvalue().splitlines()) == 2
    finally:
        logs.REDACTOR.use([])
        logs.setup("warning")
