"""What a hostile or careless client and a hurried operator did to the proxy in QA:
each answer is an OpenAI-shaped error (never a 500), and nothing is charged."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import openai
import pytest

from proxy.demo_upstream import DemoUpstream

from .conftest import ADMIN_TOKEN, Running
from .helpers import entries, last_entry_id, next_entry

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """An HTTP/1.1 exchange over a bare socket, for headers aiohttp's client will not send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_non_ascii_authorization_is_401(proxy: Running) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    status, body = await raw_request(
        port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-\xff\xfe\r\n", b"{}"
    )
    assert status == 401 and b"invalid_api_key" in body
    admin_port = int(proxy.admin_url.rsplit(":", 1)[1])
    status, body = await raw_request(
        admin_port, b"GET /admin/v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\r\n"
    )
    assert status == 401 and b'"error"' in body


async def test_too_deep_json_is_400_before_admission(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    deep = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"metadata":' + b"[" * 600 + b"]" * 600 + b"}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/chat/completions", data=deep,
                                headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
        admin_deep = b'{"id":"x","metadata":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"
        async with session.post(f"{proxy.admin_url}/admin/v1/accounts", data=admin_deep,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:  # fmt: skip
            assert resp.status == 400 and "error" in await resp.json()
    assert upstream.requests == []
    assert [e["type"] for e in await entries(proxy.state.redis, "acme")] == ["grant"]  # nothing reserved


async def test_undecodable_gzip_body_is_400(proxy: Running) -> None:
    key = await proxy.account("acme", "10")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        headers = {"Authorization": f"Bearer {key}", "Content-Encoding": "gzip"}
        async with session.post(f"{proxy.url}/v1/chat/completions", data=b'{"not": "gzip"}', headers=headers) as resp:
            assert resp.status == 400 and "error" in await resp.json()
        good = gzip.compress(b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}')
        async with session.post(f"{proxy.url}/v1/chat/completions", data=good, headers=headers) as resp:
            assert resp.status == 200  # a real gzip body is fine


async def test_ledger_cursor_out_of_range_is_400(proxy: Running) -> None:
    await proxy.account("acme", "10")
    status, body = await proxy.admin("GET", "/admin/v1/accounts/acme/ledger?cursor=99999999999999999999999-0")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


async def test_grant_past_the_exact_range_is_refused(proxy: Running) -> None:
    await proxy.account("acme", None)
    for expected in (201, 400):  # the second would take the balance past 2^53 micro-USD
        status, _ = await proxy.admin(
            "POST", "/admin/v1/accounts/acme/credits", {"amount_usd": "9007199254.740991", "kind": "paid"}
        )
        assert status == expected


async def test_request_that_can_never_fit_is_not_retried(start_proxy: Any, upstream: DemoUpstream) -> None:
    running = await start_proxy({"rate_tiers": {"tiers": [{"name": "t", "min_usd": "0", "rpm": 100, "tpm": 1000}]}})
    key = await running.account("acme", "10")
    client = running.client(key, max_retries=2)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=5000)  # fmt: skip
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "Request too large" in caught.value.message


async def test_upstream_auth_errors_do_not_leak_the_operators_key(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.status = 401
    upstream.fault.error_message = "Incorrect API key provided: sk-proj-****abcd. You can find your API key at ..."
    with pytest.raises(openai.AuthenticationError) as caught:
        await proxy.client(key).chat.completions.create(**CHAT)
    assert "sk-proj-****abcd" not in caught.value.message and "sk-[REDACTED]" in caught.value.message


async def test_client_gone_before_the_response_starts_is_charged_the_prompt(
    proxy: Running, upstream: DemoUpstream
) -> None:
    key = await proxy.account("acme", "10")
    upstream.fault.delay_before_headers_s = 0.5  # the upstream is working on it...
    before = await last_entry_id(proxy.state.redis, "acme")
    port = int(proxy.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body))  # fmt: skip
    await writer.drain()
    for _ in range(200):  # until the upstream holds the request (polling real state, bounded)
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    assert upstream.requests
    writer.transport.abort()  # ...when the client vanishes
    entry = await next_entry(proxy.state.redis, "acme", before)
    assert entry["type"] == "usage" and entry["estimated"] is True and int(entry["amount"]) < 0


async def test_amounts_must_be_plain_decimals(proxy: Running) -> None:
    await proxy.account("acme", None)
    for amount in ("1_000", "1e3", "９", "0x10", " "):
        status, _ = await proxy.admin("POST", "/admin/v1/accounts/acme/credits", {"amount_usd": amount, "kind": "paid"})
        assert status == 400, amount
    assert (await proxy.balance("acme")).balance == 0


async def test_a_trickled_body_times_out(proxy: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import relay

    monkeypatch.setattr(relay, "BODY_TIMEOUT_S", 0.3)
    key = await proxy.account("acme", "10")
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Length: 100\r\n\r\n{" % key.encode())  # fmt: skip
    await writer.drain()  # ...and the other 99 bytes never come
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"408"
