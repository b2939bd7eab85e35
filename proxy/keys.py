"""API keys: generated once, stored only as a SHA-256 hash, cached per process.

The cache maps a key's hash to its (immutable) record, its identity only, so a metered
request needs no Redis call before admission. Nothing a key's settings decide is
trusted to the cache: its status and its settings (allowed models, spend limit,
expiry, rate limits: `kset`, lib/keys.lua) live in the account's slot, where the
admission script reads them, so a revocation or a changed setting applies at once on
every instance. Unknown keys are cached briefly so a flood of bad keys does not become
a flood of Redis reads.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis

from . import errors, keyspace, metrics

if TYPE_CHECKING:
    from .schemas import KeyPatch

KEY_PREFIX = "sk-mp-"
POSITIVE_TTL_S = 60.0
NEGATIVE_TTL_S = 1.0
CACHE_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    account_id: str
    name: str
    # None: every configured model. Only records written before keys had settings in the
    # account's slot carry a list; admission checks the slot's (kset)
    allowed_models: frozenset[str] | None

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyRecord:
        data = orjson.loads(raw)
        allowed = data.get("allowed_models")
        return cls(
            data["key_id"], data["account_id"], data.get("name", ""), None if allowed is None else frozenset(allowed)
        )


def stored_settings(req: KeyPatch) -> tuple[dict[str, Any], list[str]]:
    """The `kset` fields (lib/keys.lua) the request sets, and those it clears (its nulls)."""
    given = req.model_fields_set
    fields: dict[str, Any] = {}
    if "name" in given:
        fields["name"] = req.name or ""
    values: dict[str, Any] = {
        "models": None if req.allowed_models is None else orjson.dumps(req.allowed_models).decode(),
        "limit": None if req.limit_usd is None else str(req.limit_usd),  # micro-USD
        "reset": req.limit_reset,
        "exp": None if req.expires_at is None else str(req.expires_at),  # ms
    }
    names = {"models": "allowed_models", "limit": "limit_usd", "reset": "limit_reset", "exp": "expires_at"}
    fields |= {field: values[field] for field, name in names.items() if name in given}
    if "rate_limits" in given:
        limits = req.rate_limits
        for name in ("rpm", "tpm"):
            if limits is None or name in limits.model_fields_set:
                fields[name] = None if limits is None else getattr(limits, name)
    return {k: v for k, v in fields.items() if v is not None}, sorted(k for k, v in fields.items() if v is None)


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
        self,
        account_id: str,
        name: str = "",
        allowed_models: list[str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key; `settings` as `stored_settings` makes them (limit, expiry, ...)."""
        if not await self.redis.exists(keyspace.account(account_id, "acct")):
            raise errors.NotFound(f"No account {account_id!r}.")
        key_id, secret = new_key()
        key_hash = hash_key(secret)
        created = int(time.time() * 1000)
        stored = {"name": name, "created": str(created), **(settings or {})}
        if allowed_models is not None:
            stored["models"] = orjson.dumps(allowed_models).decode()
        record = {"key_id": key_id, "account_id": account_id, "name": name, "created_at": created}
        raw = orjson.dumps(record)
        # settings and status together, before the records authentication finds: a key is
        # never usable without its settings
        slot = self.redis.pipeline(transaction=True)
        slot.hset(keyspace.account(account_id, "kset"), key_id, orjson.dumps(stored))
        slot.hset(keyspace.account(account_id, "keys"), key_id, "active")
        await slot.execute()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keyspace.api_key(key_hash), raw)
        pipe.set(keyspace.key_id(key_id), orjson.dumps({"account_id": account_id, "hash": key_hash, **record}))
        await pipe.execute()
        return KeyRecord.from_json(raw), secret

    async def account_of(self, key_id: str) -> str:
        """The account a key id belongs to; NotFound for an unknown id."""
        return str((await self._meta(key_id))["account_id"])

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        meta = await self._meta(key_id)
        pipe = self.redis.pipeline(transaction=False)
        # the status in the account's slot is what admission checks: effective at once
        pipe.hset(keyspace.account(meta["account_id"], "keys"), key_id, "revoked")
        pipe.delete(keyspace.api_key(meta["hash"]))
        await pipe.execute()
        return {"id": key_id, "account_id": meta["account_id"], "revoked": True}

    async def _meta(self, key_id: str) -> dict[str, Any]:
        raw = await self.redis.get(keyspace.key_id(key_id))
        if raw is None:
            raise errors.NotFound(f"No key {key_id!r}.")
        meta: dict[str, Any] = orjson.loads(raw)
        return meta

    async def key_ids(self, account_id: str) -> list[str]:
        """The account's key ids, revoked ones too, in id order."""
        return sorted(map(str, await self.redis.hkeys(keyspace.account(account_id, "keys"))))
