"""API keys: generated once, stored only as a SHA-256 hash, cached per process.

The cache maps a key's hash to its (immutable) record, so a metered request needs no
Redis call before admission. Revocation needs no cache invalidation: the admission
script checks the key's status inside the account's slot, so a revoked key stops at
once on every instance. Unknown keys are cached briefly so a flood of bad keys does
not become a flood of Redis reads.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from . import errors, keyspace

KEY_PREFIX = "sk-mp-"
POSITIVE_TTL_S = 60.0
NEGATIVE_TTL_S = 1.0
CACHE_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    account_id: str
    name: str
    allowed_models: frozenset[str] | None  # None: every configured model

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        data = orjson.loads(raw)
        allowed = data.get("allowed_models")
        return cls(
            data["key_id"], data["account_id"], data.get("name", ""), None if allowed is None else frozenset(allowed)
        )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, secret key). The secret is shown once and never stored."""
    return "key_" + secrets.token_hex(8), KEY_PREFIX + secrets.token_urlsafe(32)


def bearer(header: str | None) -> str:
    if not header or not header.startswith("Bearer "):
        raise errors.InvalidApiKey(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    key = header[7:].strip()
    if not key.isascii():  # keys are ASCII; raw header bytes would not even hash cleanly
        raise errors.InvalidApiKey("Incorrect API key provided.")
    return key


class KeyCache:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._entries: dict[str, tuple[KeyRecord | None, float]] = {}

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        key_hash = hash_key(bearer(authorization))
        now = time.monotonic()
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] < now:
            entry = await self._load(key_hash, now)
        if entry[0] is None:
            raise errors.InvalidApiKey("Incorrect API key provided. You can find your API key with your operator.")
        return entry[0]

    async def _load(self, key_hash: str, now: float) -> tuple[KeyRecord | None, float]:
        try:
            raw = await self.redis.get(keyspace.api_key(key_hash))
        except errors.STORE_DOWN as exc:
            raise errors.StoreUnavailable("The metering store is unavailable.") from exc
        record = KeyRecord.from_json(raw) if raw else None
        entry = (record, now + (POSITIVE_TTL_S if record else NEGATIVE_TTL_S))
        if len(self._entries) >= CACHE_LIMIT:
            self._entries.clear()
        self._entries[key_hash] = entry
        return entry
