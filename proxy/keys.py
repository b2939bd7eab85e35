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
from typing import Any

import orjson
from redis.asyncio import Redis

from . import errors, keyspace, metrics

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
            metrics.child(metrics.REDIS_ERRORS, "key_lookup").inc()
            raise errors.StoreUnavailable("The metering store is unavailable.") from exc
        record = KeyRecord.from_json(raw) if raw else None
        entry = (record, now + (POSITIVE_TTL_S if record else NEGATIVE_TTL_S))
        if len(self._entries) >= CACHE_LIMIT:
            self._entries.clear()
        self._entries[key_hash] = entry
        return entry


class KeyStore:
    """Creating, revoking and listing an account's keys (its settings and money live in `ledger`)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create_key(
        self, account_id: str, name: str = "", allowed_models: list[str] | None = None
    ) -> tuple[KeyRecord, str]:
        if not await self.redis.exists(keyspace.account(account_id, "acct")):
            raise errors.NotFound(f"No account {account_id!r}.")
        key_id, secret = new_key()
        key_hash = hash_key(secret)
        record = {
            "key_id": key_id,
            "account_id": account_id,
            "name": name,
            "allowed_models": allowed_models,
            "created_at": int(time.time() * 1000),
        }
        raw = orjson.dumps(record)
        # status first: a key record without an 'active' status is refused by admission
        await self.redis.hset(keyspace.account(account_id, "keys"), key_id, "active")
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keyspace.api_key(key_hash), raw)
        pipe.set(keyspace.key_id(key_id), orjson.dumps({"account_id": account_id, "hash": key_hash, **record}))
        await pipe.execute()
        return KeyRecord.from_json(raw), secret

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        raw = await self.redis.get(keyspace.key_id(key_id))
        if raw is None:
            raise errors.NotFound(f"No key {key_id!r}.")
        meta = orjson.loads(raw)
        # the status in the account's slot is what admission checks: effective at once
        await self.redis.hset(keyspace.account(meta["account_id"], "keys"), key_id, "revoked")
        await self.redis.delete(keyspace.api_key(meta["hash"]))
        return {"id": key_id, "account_id": meta["account_id"], "revoked": True}

    async def list_keys(self, account_id: str) -> list[dict[str, Any]]:
        statuses = sorted((await self.redis.hgetall(keyspace.account(account_id, "keys"))).items())
        # one round trip for every key's record; MGET would cross slots on a cluster
        pipe = self.redis.pipeline(transaction=False)
        for key_id, _ in statuses:
            pipe.get(keyspace.key_id(str(key_id)))
        records = await pipe.execute() if statuses else []
        out = []
        for (key_id, status), raw in zip(statuses, records, strict=True):
            meta = orjson.loads(raw) if raw else {}
            out.append(
                {
                    "id": key_id,
                    "name": meta.get("name", ""),
                    "status": status,
                    "allowed_models": meta.get("allowed_models"),
                }
            )
        return out

    async def key_active(self, record: KeyRecord) -> bool:
        status = await self.redis.hget(keyspace.account(record.account_id, "keys"), record.key_id)
        return bool(status == "active")
