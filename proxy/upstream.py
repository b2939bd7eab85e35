"""The upstream seam: one pooled HTTP/1.1 client (http1.py); failures mapped to proxy errors.

The relay only sees `UpstreamResponse`s or `ProxyError`s, so it
does not care whether it talks to OpenAI or the test upstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from . import errors, http1
from .config import UpstreamConfig
from .logs import MIN_SECRET

# Response headers that describe one hop, not the message (RFC 9110 7.6.1), plus the
# ones aiohttp recomputes when it writes our response.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "server",
        "date",
    )
)
# Upstream headers that would mislead the client about our limits or identity.
OURS = frozenset(
    {"x-request-id", "openai-organization", "openai-project", "set-cookie"}
    | {f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset") for unit in ("requests", "tokens")}
)


_KEY_LIKE = re.compile(rb"sk-[A-Za-z0-9_\-*]{4,}")
REDACTED = b"[REDACTED]"


class Scrubber:
    """Removes the configured secrets, by value, from what the upstream sends back.

    An upstream may quote the operator's key in an error (whatever its shape), or echo
    it anywhere in a body or stream: clients must never see it. Cheap on the hot path:
    a bytes `in` check per secret, and work only on a hit.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: tuple[bytes, ...] = ()
        self.use(secrets)

    def use(self, secrets: Iterable[str]) -> None:
        """Swapped in at start and on config reload (the secrets of `Config.secrets`)."""
        found: set[bytes] = set()
        for secret in secrets:
            # as sent, and as a JSON string would escape it
            found |= {secret.encode(), json.dumps(secret)[1:-1].encode()}
        self.secrets = tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))
        self.texts = tuple(secret.decode() for secret in self.secrets)

    def __call__(self, data: bytes) -> bytes:
        """Any body or whole SSE events: a secret never spans two events."""
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, REDACTED)
        return data

    def error(self, body: bytes) -> bytes:
        """Upstream errors pass through, but not the operator's key: besides the secrets
        themselves, OpenAI's 401 quotes a masked form (`sk-proj-****abcd`), which still
        says too much."""
        body = self(body)
        return _KEY_LIKE.sub(b"sk-[REDACTED]", body) if b"sk-" in body else body

    def headers(self, headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
        """Header values too: an upstream may echo the key in one (a debug header), and
        headers pass through to clients."""
        if not self.texts:
            return headers
        text = "\n".join(headers.values())
        if not any(secret in text for secret in self.texts):
            return headers
        return CIMultiDictProxy(CIMultiDict((k, self(v.encode()).decode()) for k, v in headers.items()))


def passthrough_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if not ours(k.lower())}


def ours(name: str) -> bool:
    """A header the proxy sets, or one that must not pass: an upstream's `x-metering-*`
    would pose as our receipt (streams and errors carry none of ours to override it)."""
    return name in HOP_BY_HOP or name in OURS or name.startswith("x-metering-")


class UpstreamResponse:
    """An upstream's answer, with the HTTP client's errors mapped at the boundary: reading
    a body or a stream that breaks raises `errors.UpstreamBroken`, nothing http1's."""

    def __init__(self, response: http1.Response, scrub: Scrubber) -> None:
        self._response = response
        self.status = response.status
        self.headers = scrub.headers(response.headers)
        mime = response.headers.get("content-type", "application/octet-stream")
        self.content_type = mime.partition(";")[0].strip().lower()  # as aiohttp reads it

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except _BROKEN as exc:
            raise errors.UpstreamBroken(f"The upstream broke off its answer ({_why(exc)}).") from exc

    async def next_chunk(self) -> bytes | None:
        """What of the body has arrived (never waiting for a line end), None at its end. A
        call per chunk, not an async generator: a stream's hot loop, one layer less."""
        try:
            return await self._response.next_chunk()
        except _BROKEN as exc:
            raise errors.UpstreamBroken(f"The upstream broke off its stream ({_why(exc)}).") from exc

    def close(self) -> None:
        """Drop the connection: the upstream stops generating what nobody will pay for."""
        self._response.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._response.release()  # back to the pool if read to the end, else closed


_BROKEN = (http1.HttpError, OSError)  # TimeoutError (no byte in time) is an OSError


def _why(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__


class Upstream:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.client: http1.Http1Client | None = None
        self.scrub = Scrubber(secrets)

    async def start(self) -> None:
        self.client = http1.Http1Client()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def post(self, upstream: UpstreamConfig, path: str, body: bytes, request_id: str) -> UpstreamResponse:
        assert self.client is not None, "Upstream.start() was not awaited"
        headers = {"content-type": "application/json", "accept-encoding": "identity", "x-request-id": request_id}
        if upstream.api_key is not None:
            headers["authorization"] = f"Bearer {upstream.api_key.get_secret_value()}"
        try:
            response = await self.client.post(
                upstream.base_url, path, body, headers, upstream.connect_timeout_s, upstream.timeout_s
            )
        except TimeoutError as exc:
            raise errors.UpstreamTimeout("The upstream did not answer in time; nothing was charged.") from exc
        except (OSError, http1.HttpError) as exc:
            raise errors.UpstreamUnavailable(
                f"The upstream could not be reached ({type(exc).__name__}); nothing was charged."
            ) from exc
        return UpstreamResponse(response, self.scrub)
