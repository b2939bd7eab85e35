"""Every Redis key name, in one place.

Keys of one account share the hash tag `{ID}`, so each Lua script touches one slot
and the proxy runs unchanged on Redis Cluster. Global keys (key-hash index, account
index, sharded watch sets) are never touched by a script.
"""

from __future__ import annotations

import re
import zlib

PREFIX = "mp"
WATCH_SHARDS = 16
ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def valid_account_id(account_id: str) -> bool:
    return bool(ACCOUNT_ID.match(account_id))


def account(account_id: str, part: str) -> str:
    return f"{PREFIX}:{{{account_id}}}:{part}"


def account_keys(account_id: str, model: str, names: tuple[str, ...]) -> list[str]:
    """A script's KEYS by the names its header declares (lua/lib/base.lua): the account's
    keys, `rlm` being its rate window for `model`."""
    return [account(account_id, f"rl:{model}" if name == "rlm" else name) for name in names]


def key_window(account_id: str, key_id: str) -> str:
    """The rate window of one API key with limits of its own (admit.lua `rlk`)."""
    return account(account_id, f"krl:{key_id}")


def api_key(key_hash: str) -> str:
    """Key hash -> key record (JSON). Only the hash of a key is ever stored."""
    return f"{PREFIX}:key:{key_hash}"


def key_id(kid: str) -> str:
    """Key id -> {account_id, hash}, for revocation by id."""
    return f"{PREFIX}:keyid:{kid}"


def outbox(account_id: str) -> str:
    """List of the account's undelivered webhook events (RPUSHed by scripts)."""
    return account(account_id, "outbox")


def delivery_lease(account_id: str) -> str:
    """One instance at a time delivers an account's outbox (SET NX PX, a random token)."""
    return account(account_id, "lease")


def delivery_log(account_id: str) -> str:
    """List of the account's latest webhook delivery attempts, newest first (capped)."""
    return account(account_id, "deliveries")


def dead_letters(account_id: str) -> str:
    """List of the account's events that failed every delivery attempt."""
    return account(account_id, "dead")


ACCOUNTS = f"{PREFIX}:accounts"
TIER_GENERATIONS = f"{PREFIX}:tiers:gen"  # sha1 of a tier table -> its generation
TIER_COUNTER = f"{PREFIX}:tiers:counter"
DURABLE_BARRIER = f"{PREFIX}:durable"  # counter bumped before WAITAOF: see ledger.Durability
DEAD_LETTERS = f"{PREFIX}:dead"  # set of account ids with a non-empty dead-letter list


def watch_shard(account_id: str) -> str:
    """Sharded zset of accounts to visit (reservations to reap, events to deliver)."""
    return watch_shard_n(zlib.crc32(account_id.encode()) % WATCH_SHARDS)


def watch_shard_n(n: int) -> str:
    return f"{PREFIX}:watch:{{w{n}}}"


def settled(account_id: str, request_id: str) -> str:
    """A settled request's marker (its ledger entry id), kept for scripts.SETTLED_TTL_MS:
    what tells a duplicate settlement from one whose reservation was lost, and where a
    generation lookup finds the request's entry without a scan (generation.lua)."""
    return account(account_id, f"done:{request_id}")
