"""The upstream seam's redaction: configured secrets never reach a client, whatever
their shape, in error bodies, bodies and streams (split anywhere by the network)."""

from __future__ import annotations

import openai
import pytest

from proxy.relay import forwardable
from proxy.sse import SSEParser
from proxy.testing.upstream import DemoUpstream
from proxy.upstream import Scrubber
from proxy.usage import StreamTap

from .conftest import Running

ODD_KEY = "AZKEY9f8e7d6c5b4a3"  # an operator key not shaped like sk-...


def test_scrubber_redacts_by_value_and_leaves_the_rest() -> None:
    scrub = Scrubber([ODD_KEY, "x"])  # too short to redact: ordinary text would suffer
    assert scrub(b'{"error": "bad key AZKEY9f8e7d6c5b4a3 and x"}') == b'{"error": "bad key [REDACTED] and x"}'
    assert scrub(b"nothing here") == b"nothing here"
    assert scrub.error(b"Incorrect API key provided: sk-proj-****abcd") == b"Incorrect API key provided: sk-[REDACTED]"
    scrub.use([])  # a reload that drops the secret
    assert scrub(ODD_KEY.encode()) == ODD_KEY.encode()


@pytest.mark.parametrize("cut", range(1, 120, 7))
def test_a_secret_split_across_chunks_is_redacted_in_its_event(cut: int) -> None:
    stream = (
        b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
        b'data: {"choices": [{"delta": {"content": "key AZKEY9f8e7d6c5b4a3!"}}]}\n\n'
    )
    parser, tap, scrub = SSEParser(), StreamTap("chat", False), Scrubber([ODD_KEY])
    sent, held = b"", []
    for chunk in (stream[:cut], stream[cut:]):
        sent += forwardable(parser.feed(chunk), tap, scrub, held)
    assert ODD_KEY.encode() not in sent and sent.count(b"[REDACTED]") == 1
    assert sent == stream.replace(ODD_KEY.encode(), b"[REDACTED]")


@pytest.fixture
async def odd_keyed(start_proxy: object) -> Running:
    return await start_proxy({"upstreams": {"openai": {"api_key": ODD_KEY}}})  # type: ignore[operator, no-any-return]


async def test_an_upstream_401_quoting_the_key_reaches_no_client(odd_keyed: Running, upstream: DemoUpstream) -> None:
    key = await odd_keyed.account("acme", "10")
    upstream.fault.status = 401
    upstream.fault.error_message = f"Incorrect API key provided: {ODD_KEY}."
    client = odd_keyed.client(key)
    for stream in (False, True):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=stream
            )
        assert ODD_KEY not in caught.value.message and "[REDACTED]" in caught.value.message
        assert ODD_KEY not in caught.value.response.text


async def test_an_upstream_echoing_the_key_is_redacted_streamed_or_not(
    odd_keyed: Running, upstream: DemoUpstream
) -> None:
    key = await odd_keyed.account("acme", "10")
    upstream.fault.echo_key = True
    client = odd_keyed.client(key)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    whole = await client.chat.completions.create(**chat)  # type: ignore[call-overload]
    assert whole.choices[0].message.content.startswith("your key is Bearer [REDACTED] tok0")
    streamed = "".join(
        [c.choices[0].delta.content or "" async for c in await client.chat.completions.create(**chat, stream=True)]  # type: ignore[call-overload]
    )
    assert streamed.startswith("your key is Bearer [REDACTED] tok0")
    assert ODD_KEY in upstream.requests[-1].headers["authorization"]  # the upstream itself did get it


async def test_a_stream_that_breaks_off_raises_the_seams_own_error(upstream: DemoUpstream) -> None:
    """The relay sees `errors.UpstreamBroken`, never aiohttp's exceptions."""
    from proxy import errors
    from proxy.config import UpstreamConfig
    from proxy.upstream import Upstream

    upstream.fault.cut_after_chunks = 2
    seam = Upstream()
    await seam.start()
    try:
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
        target = UpstreamConfig(base_url=upstream.base_url)
        async with await seam.post(target, "/chat/completions", body, "req_seam") as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            received = b""
            with pytest.raises(errors.UpstreamBroken):
                while (chunk := await response.next_chunk()) is not None:
                    received += chunk
            assert received.count(b"data:") == 2  # what came before the break was relayed
    finally:
        await seam.close()
