"""What a hostile or careless client and a hurried operator did to the proxy in QA:
each answer is an OpenAI-shaped error (never a 500), and nothing is charged."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import aiohttp
import openai
import pytest

from proxy.testing.upstream import DemoUpstream

from .conftest import ADMIN_TOKEN, Running
from .helpers import entries, last_entry_id, next_entry, raw_exchange

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


# -- malformed client requests: each a 4xx (or a closed connection), and no charge ----


def with_fields(fields: bytes, model: bytes = b"gpt-4o") -> bytes:
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}' % (model, fields)


BOMB = gzip.compress(b"0" * 64_000_000, compresslevel=9)  # ~60 KB that inflates to 64 MB
# name -> (body bytes, extra headers)
MALFORMED_BODIES: dict[str, tuple[bytes, dict[str, str]]] = {
    "broken JSON": (b'{"model": "gpt-4o", "messages": [', {}),
    "not an object": (b'[{"model": "gpt-4o"}]', {}),
    "model not a string": (b'{"model": 4, "messages": [{"role": "user", "content": "hi"}]}', {}),
    "messages a string": (b'{"model": "gpt-4o", "messages": "hi"}', {}),
    "messages of strings": (b'{"model": "gpt-4o", "messages": ["hi"]}', {}),
    "max_tokens a string": (with_fields(b'"max_tokens": "5"'), {}),
    "max_tokens negative": (with_fields(b'"max_tokens": -1'), {}),
    "max_tokens zero": (with_fields(b'"max_tokens": 0'), {}),
    "max_tokens huge": (with_fields(b'"max_tokens": 1000000000000', b"o3-mini"), {}),
    "max_tokens past 64 bits": (with_fields(b'"max_tokens": 18446744073709551616'), {}),
    "max_tokens a float": (with_fields(b'"max_tokens": 5.5'), {}),
    "n=1000": (with_fields(b'"n": 1000'), {}),
    "stream not a boolean": (with_fields(b'"stream": "yes"'), {}),
    "stream_options without stream": (with_fields(b'"stream_options": {}'), {}),
    "unknown model": (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', {}),
    "invalid UTF-8": (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}', {}),
    "lone surrogate": (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\ud800"}]}', {}),
    "deep nesting": (with_fields(b'"metadata": ' + b"[" * 5000 + b"]" * 5000), {}),
    "NaN": (with_fields(b'"temperature": NaN'), {}),
    "oversized": (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}', {}),
    "zip bomb": (BOMB, {"Content-Encoding": "gzip"}),
    "not gzip": (b'{"model": "gpt-4o"}', {"Content-Encoding": "gzip"}),
    "unknown encoding": (b'{"model": "gpt-4o"}', {"Content-Encoding": "zstd-but-not"}),
}  # fmt: skip


async def books(running: Running, account_id: str = "acme") -> tuple[Any, list[dict[str, Any]]]:
    view = await running.balance(account_id)
    return (view.balance, view.available, view.reserved), await entries(running.state.redis, account_id)


@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
async def test_malformed_body_is_an_openai_4xx_and_free(proxy: Running, upstream: DemoUpstream, case: str) -> None:
    key = await proxy.account("acme", "10")
    before = await books(proxy)
    body, extra = MALFORMED_BODIES[case]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(f"{proxy.url}/v1/chat/completions", data=body, headers=headers) as resp:
            status, answer = resp.status, await resp.json(content_type=None)
    assert 400 <= status < 500, (case, status, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert upstream.requests == []
    assert await books(proxy) == before  # nothing reserved, nothing charged


def smuggled(key: str) -> dict[str, bytes]:
    """Framing that two HTTP parsers could read differently (RFC 9112 6.1, 6.3, 5.2)."""
    chat = with_fields(b'"max_tokens": 5')
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chat), chat)
    return {
        "Content-Length with Transfer-Encoding": head
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chat)
        + chunked,
        "duplicate Content-Length": head + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(chat) + chat,
        "Content-Length list": head + b"Content-Length: %d, %d\r\n\r\n" % (len(chat), len(chat)) + chat,
        "Transfer-Encoding not chunked last": head + b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked,
        "obfuscated Transfer-Encoding": head + b"Transfer-Encoding : chunked\r\n\r\n" + chunked,
        "obs-fold": head + b"X-Folded: a\r\n  b\r\nContent-Length: %d\r\n\r\n" % len(chat) + chat,
        "bare LF": head.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % len(chat) + chat,
        "negative Content-Length": head + b"Content-Length: -1\r\n\r\n" + chat,
        "bad chunk size": head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + chat + b"\r\n0\r\n\r\n",
    }


async def test_smuggling_attempts_are_refused_and_free(proxy: Running, upstream: DemoUpstream) -> None:
    key = await proxy.account("acme", "10")
    before = await books(proxy)
    port = int(proxy.url.rsplit(":", 1)[1])
    for case, data in smuggled(key).items():
        answer = await raw_exchange(port, data)  # read to EOF: the server closed the connection
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None
        assert status is None or 400 <= status < 500, (case, answer[:200])
        assert b" 200 " not in answer, (case, answer[:400])  # no request smuggled in behind it
        assert key.encode() not in answer.partition(b"\r\n\r\n")[0], case  # not echoed in a header
    assert upstream.requests == []
    assert await books(proxy) == before


async def test_admin_values_json_cannot_hold_are_400(proxy: Running) -> None:
    """Python's parser takes them; orjson cannot write them back: a 400, never a 500."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    bodies = (
        b'{"id": "big", "metadata": {"a": 18446744073709551616}}',
        b'{"id": "surrogate", "metadata": {"a": "\\ud800"}}',
        b'{"id": "surrogate-key", "metadata": {"\\udfff": 1}}',
    )
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(f"{proxy.admin_url}/admin/v1/accounts", data=body, headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        await proxy.account("acme", None)
        async with session.post(f"{proxy.admin_url}/admin/v1/accounts/acme/keys", headers=headers,
                                data=b'{"name": "\\ud800"}') as resp:  # fmt: skip
            assert resp.status == 400
        async with session.get(f"{proxy.admin_url}/admin/v1/accounts") as resp:
            assert resp.status == 401  # and the routes still answer
    status, listed = await proxy.admin("GET", "/admin/v1/accounts")
    assert status == 200 and [a["id"] for a in listed["data"]] == ["acme"]


async def test_405_names_the_allowed_methods(proxy: Running) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{proxy.admin_url}/admin/v1/accounts",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:  # fmt: skip
            assert resp.status == 405 and set(resp.headers["Allow"].split(",")) == {"GET", "POST"}
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with session.get(f"{proxy.url}/v1/chat/completions") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
