"""Webhook delivery from the per-account Redis outboxes, signed as Standard Webhooks.

Scripts RPUSH events `{id, type, ts, data, tries}` to the account's outbox in the same
call that changes the balance (lua/lib/account.lua `emit`); the worker calls `deliver` for an
account that has some. Delivery is at least once, in order per account:

- one instance at a time holds the account's lease (SET NX PX with a random token);
- the head is POSTed; a 2xx removes it (LREM by exact value), anything else bumps its
  `tries`, sets `next_at` (exponential backoff with full jitter) and stops the account
  there, so later events wait behind it; after `max_attempts` it moves to the account's
  dead-letter list and the account to `keyspace.DEAD_LETTERS`;
- the list is never rewritten: scripts may RPUSH at any moment, and the head is only
  replaced or popped inside a WATCH/MULTI that first checks it is still the same value.

Bodies are `{type, timestamp, data}` with every `*_usd` field of `data` turned from
micro-USD into a decimal USD string; the signature is
`v1,base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))`, once per configured secret
(`secret` and `previous_secrets`), space-separated.

Every attempt is also written to the account's delivery log (the latest `DELIVERY_LOG`,
newest first), which the admin API shows beside the outbox and the dead letters.

Public: `Webhooks(state).deliver / close`, `sign`, `verify`, `body_of`, `full_jitter`,
`list_dead`, `replay_dead` (the CLI's `webhooks dead list|replay [ACCOUNT]`), `deliveries`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from . import keyspace, metrics
from .config import WebhooksConfig
from .ledger import Ledger
from .money import usd
from .state import State
from .views import rfc3339

log = structlog.get_logger("proxy.webhooks")

LEASE_MS = 30_000  # at least; stretched to cover one whole attempt when timeout_s is long
BUSY_RETRY_MS = 1_000  # another instance holds the lease: look again this much later
BACKOFF_BASE_MS = 1_000
BACKOFF_CAP_MS = 3_600_000
MAX_PER_VISIT = 100  # events delivered per visit before yielding to other accounts
CAS_ATTEMPTS = 5  # WATCH conflicts (a script RPUSHing meanwhile) before giving up a swap
DELIVERY_LOG = 50  # attempts kept per account
SHOWN_PENDING = 100  # outbox events `deliveries` shows, from the head
_MICRO = re.compile(r"^-?\d+$")

Backoff = Callable[[int], int]  # failed attempts so far -> ms to wait before the next


def full_jitter(tries: int) -> int:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(tries-1))]."""
    ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS << min(max(tries - 1, 0), 32))
    return random.randint(0, ceiling)


# -- Standard Webhooks signing ---------------------------------------------------------


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes | str) -> str:
    payload = body.encode() if isinstance(body, str) else body
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` value for a `whsec_<base64>` secret."""
    return _signature(_key(secret), msg_id, timestamp, body)


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, tolerance_s: int = 300) -> bool:
    """For receivers (and tests): a valid v1 signature among the space-separated ones,
    on a timestamp within `tolerance_s` of now. Compares in constant time."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        return False
    try:
        timestamp = int(stamp)
        expected = sign(secret, msg_id, timestamp, body).encode()
    except ValueError:  # a malformed timestamp or secret
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return any(
        candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected)
        for candidate in signatures.split()
    )


def _text(value: bytes | str) -> str:
    """Clients are made with decode_responses=True; this only narrows the type."""
    return value.decode() if isinstance(value, bytes) else value


def body_of(event: Mapping[str, Any]) -> bytes:
    """The JSON body of an outbox event: `{type, timestamp, data}`, amounts in USD."""
    return orjson.dumps({"type": event["type"], "timestamp": rfc3339(event["ts"]), "data": _usd_fields(event["data"])})


def _usd_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """`*_usd` fields hold micro-USD as integer strings (or integers); print them as USD."""
    out = dict(data)
    for name, value in data.items():
        if name.endswith("_usd") and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and _MICRO.match(value)):
                out[name] = usd(int(value))
    return out


# -- delivery --------------------------------------------------------------------------


class Webhooks:
    def __init__(self, state: State, backoff: Backoff = full_jitter) -> None:
        self.state = state
        self.backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    def _now(self) -> int:
        """Milliseconds on the worker's clock (tests move it with ledger.clock_offset_ms)."""
        return int(time.time() * 1000) + self.state.ledger.clock_offset_ms

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(self, account_id: str) -> int:
        """Deliver the account's due events; returns when to look again (ms epoch, 0: never)."""
        hooks = self.state.config.webhooks
        if hooks is None:
            return 0
        lease_ms = max(LEASE_MS, int(hooks.timeout_s * 1000) + 5_000)
        lease, token = keyspace.delivery_lease(account_id), secrets.token_hex(8)
        if not await self.state.redis.set(lease, token, nx=True, px=lease_ms):
            return self._now() + BUSY_RETRY_MS
        # start no attempt that could outlive the lease
        deadline = time.monotonic() + (lease_ms - hooks.timeout_s * 1000 - 1_000) / 1000
        try:
            return await self._drain(account_id, hooks, deadline)
        finally:
            await self._release(lease, token)

    async def _drain(self, account_id: str, hooks: WebhooksConfig, deadline: float) -> int:
        redis, outbox = self.state.redis, keyspace.outbox(account_id)
        for _ in range(MAX_PER_VISIT):
            head = await redis.lindex(outbox, 0)
            if head is None:
                return 0
            raw = _text(head)
            try:
                event = orjson.loads(raw)
                event_type, _, _ = str(event["type"]), str(event["id"]), int(event["ts"])
                if not isinstance(event["data"], dict):
                    raise TypeError("data")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                await self._bury(account_id, raw, {"raw": raw, "error": "malformed event", "dead_at": self._now()})
                continue
            next_at = int(event.get("next_at") or 0)
            if next_at > self._now():
                return next_at  # the head waits for its retry; the rest keep their order
            if time.monotonic() > deadline:
                return self._now()
            error = await self._post(hooks, event)
            tries = int(event.get("tries") or 0) + 1
            outcome = "delivered" if error is None else "dead" if tries >= hooks.max_attempts else "failed"
            await self._log_attempt(account_id, event, tries, outcome, error)
            if error is None:
                await redis.lrem(outbox, 1, raw)
                metrics.WEBHOOK_DELIVERIES.labels(event_type, "success").inc()
                continue
            if outcome == "dead":
                metrics.WEBHOOK_DELIVERIES.labels(event_type, "dead").inc()
                log.warning("webhook_dead", account_id=account_id, event_id=event.get("id"), tries=tries, error=error)
                await self._bury(account_id, raw, {**event, "tries": tries, "error": error, "dead_at": self._now()})
                continue
            metrics.WEBHOOK_DELIVERIES.labels(event_type, "failure").inc()
            next_at = self._now() + self.backoff(tries)
            log.info("webhook_retry", account_id=account_id, event_id=event.get("id"), tries=tries, error=error)
            retry = orjson.dumps({**event, "tries": tries, "next_at": next_at, "error": error}).decode()
            if not await self._swap_head(outbox, raw, retry):
                return self._now()  # the head moved under us (lease lapsed): look again
            return next_at
        return self._now()  # more than one visit's worth: come back at once

    async def _post(self, hooks: WebhooksConfig, event: Mapping[str, Any]) -> str | None:
        """One attempt; None on 2xx, else what went wrong (no secret, no body)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=hooks.timeout_s), headers={"user-agent": "metering-proxy"}
            )
        body, stamp = body_of(event), int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": str(event["id"]),
            "webhook-timestamp": str(stamp),
            # one signature per secret (space-separated), so a rotation needs no downtime
            "webhook-signature": " ".join(_signature(k, str(event["id"]), stamp, body) for k in hooks.signing_keys()),
        }
        timeout = aiohttp.ClientTimeout(total=hooks.timeout_s)  # per call: a reload may change it
        try:
            async with self._session.post(
                hooks.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def _log_attempt(
        self, account_id: str, event: Mapping[str, Any], tries: int, outcome: str, error: str | None
    ) -> None:
        attempt = {"event_id": event["id"], "type": event["type"], "at": self._now(), "tries": tries}
        log_key = keyspace.delivery_log(account_id)
        pipe = self.state.redis.pipeline(transaction=False)
        pipe.lpush(log_key, orjson.dumps({**attempt, "outcome": outcome, "error": error}))
        pipe.ltrim(log_key, 0, DELIVERY_LOG - 1)
        await pipe.execute()

    async def _swap_head(self, outbox: str, raw: str, replacement: str, grave: str | None = None) -> bool:
        """Replace the outbox head with `replacement` (or pop it and append that to
        `grave`), in a MULTI, only if the head is still exactly `raw`."""
        for _ in range(CAS_ATTEMPTS):
            async with self.state.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(outbox)
                    if await pipe.lindex(outbox, 0) != raw:
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if grave is None:
                        pipe.lset(outbox, 0, replacement)
                    else:
                        pipe.lpop(outbox)
                        pipe.rpush(grave, replacement)
                    await pipe.execute()
                    return True
                except WatchError:  # a script appended meanwhile: check again
                    continue
        return False

    async def _bury(self, account_id: str, raw: str, dead: Mapping[str, Any]) -> None:
        """Move the head to the dead letters (indexed first, so none is ever unlisted)."""
        await self.state.redis.sadd(keyspace.DEAD_LETTERS, account_id)
        outbox, grave = keyspace.outbox(account_id), keyspace.dead_letters(account_id)
        await self._swap_head(outbox, raw, orjson.dumps(dead).decode(), grave)

    async def _release(self, lease: str, token: str) -> None:
        try:
            async with self.state.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(lease)
                if await pipe.get(lease) == token:
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(lease)
                    await pipe.execute()
        except (RedisError, OSError) as exc:  # it lapses on its own
            log.warning("webhook_lease_release_failed", lease=lease, error=type(exc).__name__)


# -- dead letters ----------------------------------------------------------------------


async def list_dead(redis: Redis, account_id: str | None = None) -> list[dict[str, Any]]:
    """Dead events, oldest first per account, as operators see them (amounts in USD)."""
    accounts = [account_id] if account_id else await _dead_accounts(redis)
    out = []
    for acct in accounts:
        for raw in await redis.lrange(keyspace.dead_letters(acct), 0, -1):
            event = orjson.loads(raw)
            out.append({**_shown(acct, event), "dead_at": rfc3339(event.get("dead_at"))})
    return out


def _shown(account_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """An outbox or dead event as operators see it (amounts in USD)."""
    shown: dict[str, Any] = {"account_id": account_id, "id": event.get("id"), "type": event.get("type")}
    if isinstance(event.get("data"), dict) and "ts" in event:
        shown["timestamp"] = rfc3339(event["ts"])
        shown["data"] = _usd_fields(event["data"])
    else:
        shown["raw"] = event.get("raw", orjson.dumps(event).decode())
    shown.update(tries=event.get("tries"), error=event.get("error"))
    return shown


async def deliveries(redis: Redis, account_id: str) -> dict[str, Any]:
    """An account's webhooks: events waiting in its outbox (head first, with their next
    attempt), its latest delivery attempts (newest first) and its dead letters."""
    pending = []
    for raw in map(_text, await redis.lrange(keyspace.outbox(account_id), 0, SHOWN_PENDING - 1)):
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            event = {"raw": raw}  # malformed: the worker buries it
        pending.append({**_shown(account_id, event), "next_attempt_at": rfc3339(event.get("next_at"))})
    attempts = []
    for logged in await redis.lrange(keyspace.delivery_log(account_id), 0, -1):
        attempt = orjson.loads(logged)
        attempts.append({**attempt, "at": rfc3339(attempt["at"])})
    return {
        "account_id": account_id,
        "pending": pending,
        "attempts": attempts,
        "dead": await list_dead(redis, account_id),
    }


async def replay_dead(ledger: Ledger, account_id: str | None = None) -> int:
    """Move dead events back to their outboxes with `tries` 0 and ask the worker to visit.
    Returns how many were moved. Replayed events queue behind the ones already waiting."""
    redis = ledger.redis
    accounts = [account_id] if account_id else await _dead_accounts(redis)
    total = 0
    for acct in accounts:
        moved = await _replay_account(redis, acct)
        if moved:
            await ledger.watch(acct, 0)
        total += moved
        await redis.srem(keyspace.DEAD_LETTERS, acct)
        if await redis.llen(keyspace.dead_letters(acct)):  # buried meanwhile: keep it listed
            await redis.sadd(keyspace.DEAD_LETTERS, acct)
    return total


async def _dead_accounts(redis: Redis) -> list[str]:
    return sorted(_text(a) for a in await redis.smembers(keyspace.DEAD_LETTERS))


async def _replay_account(redis: Redis, account_id: str) -> int:
    grave, outbox = keyspace.dead_letters(account_id), keyspace.outbox(account_id)
    while True:
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(grave)
                replayable = []  # (raw, reset event); a malformed one stays: nothing to resend
                for raw in map(_text, await pipe.lrange(grave, 0, -1)):
                    event = orjson.loads(raw)
                    if "data" in event:
                        reset = {k: event[k] for k in ("id", "type", "ts", "data")} | {"tries": 0}
                        replayable.append((raw, orjson.dumps(reset).decode()))
                if not replayable:
                    return 0
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.rpush(outbox, *(reset for _, reset in replayable))
                for raw, _ in replayable:
                    pipe.lrem(grave, 1, raw)
                await pipe.execute()
                return len(replayable)
            except WatchError:  # buried meanwhile: read again
                continue


# -- command line ----------------------------------------------------------------------
