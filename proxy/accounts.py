"""Accounts and their API keys (settings, not money: money lives in `ledger`)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis.asyncio import Redis

from . import errors, keyspace
from .keys import KeyRecord, hash_key, new_key


class Accounts:
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

    async def all_ids(self) -> list[str]:
        return sorted(str(account) for account in await self.redis.smembers(keyspace.ACCOUNTS))
