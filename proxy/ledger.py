"""The credit ledger in Redis: the one module that runs the Lua scripts in `lua/`.

Every decision about money is made inside one script call, atomically: admission
(`admit.lua`), settlement (`settle.lua`), grants, voids, reaping and balance reads.
Python only prices requests beforehand and renders results afterwards.

Every script is safe to run twice (a call retried after its reply was lost): admission
refuses a request id it has reserved already, settlement charges a request id once,
grants and adjustments are keyed, and the rest are idempotent.

Clocks: what money depends on (expiry of grants and reservations, periods of plan
allocations, rate windows, tier day counts) is decided inside the scripts by Redis
TIME, one clock for every instance. The host clock only schedules work (the watch
pointer's due time, a reservation's next checkpoint) and dates reports: a host clock
that is off makes the reaper look early or late, never decides a charge.

Invariants, for every account at every moment (checked by `reconcile`):
  balance  == sum(ledger entry amounts) == sum(live grant remainders) - debt
  reserved == sum(open reservation amounts)
  each grant: amount == remaining + drawn + expired + voided
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, cast

import orjson
import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from . import errors, keyspace, metrics, scripts
from .config import Config
from .durability import APPLIED, WRITES, Durability
from .money import split_exact, usd
from .resp import RespClient
from .runner import Invocation, PoolRunner, ScriptRunner, runner_for
from .scripts import SCRIPTS, AccountView, Admission, KeyFigures, Lookup, Reaped, Reply, Settlement

log = structlog.get_logger("proxy.ledger")
# The ledger entry members settle.lua writes itself (type and key_id from ARGVs of their
# own): the proxy's entry is spliced in without them, so no name appears twice.
SETTLE_WRITES = frozenset(
    ("type", "key_id", "request_id", "reserved", "admitted", "unreserved", "previously_charged", "exact_micro",
     "exact_fine", "amount", "reservation_exceeded", "overage", "grant_id", "draws", "not_returned", "balance", "ts")
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SettleCall:
    """One settlement as settle.lua takes it; kept in the journal while Redis is away."""

    account_id: str
    model: str
    request_id: str
    exact_cost: Decimal  # micro-USD, not rounded: Redis rounds it with the account's carry
    real_tokens: int  # input + output, to correct the TPM window
    entry: dict[str, Any]  # ledger entry fields from the proxy (model, key_id, usage, ...)

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "exact_cost": str(self.exact_cost)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SettleCall:
        return cls(**{**record, "exact_cost": Decimal(record["exact_cost"])})


@dataclass(frozen=True, slots=True)
class GrantSpec:
    """A credit grant as grant.lua takes it (see its header)."""

    kind: str  # paid | promotional
    amount: int  # micro-USD
    priority: int = 0  # lower is drawn first
    effective_at: int = 0  # ms; 0: now (a future one waits as pending)
    expires_at: int = 0  # ms; 0: never
    description: str | None = None
    idem: str | None = None  # the idempotency key: the same one never grants twice
    cost_basis: str | None = None  # per-unit cost basis, for the books
    id: str = field(default_factory=lambda: "grant_" + secrets.token_hex(12))

    def to_json(self) -> bytes:
        # JSON null would reach Lua as a truthy cjson.null: unset fields are left out
        fields = {name: value for name, value in asdict(self).items() if value is not None}
        return orjson.dumps({**fields, "amount": str(self.amount)})  # money as a string in JSON


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A running request's progress, for reap.lua to charge if its proxy dies."""

    request_id: str
    exact_cost: Decimal | None = None  # micro-USD so far; None: only keep it alive
    usage: dict[str, int] | None = None


@dataclass
class Ledger:
    redis: Redis
    config: Config
    clock_offset_ms: int = 0  # tests move time forward; always 0 in production
    fast: RespClient | None = None  # the hot path's lean client (resp.py), when the URL allows
    tier_generation: int = 0  # of this config's tier table (claim_tier_generation); 0: unknown yet
    durability: Durability | None = None  # redis.durable_admin_writes (durability.py)
    _contexts: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.durability is None:
            self.durability = Durability.of(self.config)
        self.runner: ScriptRunner = runner_for(self.redis, self.fast)  # the hot path's transport
        # durable admin writes wait on the connection that wrote: redis-py's, one Redis
        self.pool = None if isinstance(self.redis, RedisCluster) else PoolRunner(self.redis)

    def use_config(self, config: Config) -> None:
        self.config = config
        self.tier_generation = 0
        self._contexts = {}

    async def claim_tier_generation(self) -> int:
        """The generation of this config's tier table: handed out by Redis the first time any
        instance loads that table, so the newest table wins on every instance (lib/tiers.lua
        derive_tier) and a staggered reload cannot make instances fight over a tier."""
        digest = hashlib.sha1(scripts.tier_table(self.config)).hexdigest()
        found = await self.redis.hget(keyspace.TIER_GENERATIONS, digest)
        if found is None:
            await self.redis.hsetnx(keyspace.TIER_GENERATIONS, digest, await self.redis.incr(keyspace.TIER_COUNTER))
            found = await self.redis.hget(keyspace.TIER_GENERATIONS, digest)
        self.tier_generation = int(found or 0)
        self._contexts = {}
        return self.tier_generation

    def _context(self, model: str = "") -> bytes:
        ctx = self._contexts.get(model)
        if ctx is None:
            ctx = self._contexts[model] = scripts.context(self.config, model or None, self.tier_generation)
        return ctx

    async def _run(
        self,
        name: str,
        account_id: str,
        *args: Any,
        model: str = "",
        watch_due: int | None = None,
        extra_keys: tuple[str, ...] = (),
    ) -> Reply:
        script = SCRIPTS[name]
        args = (self.clock_offset_ms, *args)
        call = Invocation(script, account_id, model, self._context(model), args, extra_keys, watch_due)
        durable = name in WRITES and self.durability is not None
        started = time.perf_counter()
        try:
            try:
                raw = await (self._run_durable(call) if durable else self.runner.run(call))
            except redis_errors.NoScriptError:  # Redis restarted or flushed its script cache
                await (self.pool if durable and self.pool else self.runner).load(script)
                raw = await (self._run_durable(call) if durable else self.runner.run(call))
            reply = SCRIPTS[name].decode(raw)
            if reply.events:  # the script raised webhook events: have them delivered now
                await self.watch(account_id, 0)
            return reply
        except errors.STORE_DOWN as exc:
            metrics.child(metrics.REDIS_ERRORS, name).inc()
            raise errors.StoreUnavailable("The metering store is unavailable; nothing was charged.") from exc
        except redis_errors.ResponseError as exc:  # a Lua error: name its real file and line
            raise redis_errors.ResponseError(SCRIPTS[name].describe(str(exc))) from exc
        finally:
            metrics.child(metrics.REDIS_SCRIPT_SECONDS, name).observe(time.perf_counter() - started)

    async def _run_durable(self, call: Invocation) -> Any:
        """An admin money write and its durability barrier on one connection (durability.py)."""
        durability = self.durability
        assert durability is not None and self.pool is not None
        await durability.probe(self.redis)
        if durability.unconfirmable:
            raise errors.WriteNotDurable(durability.unconfirmable)
        result, barrier = await self.pool.run_with_barrier(call, durability.barrier or ())
        if durability.barrier and result[0] in APPLIED and not durability.confirmed(barrier):
            raise errors.WriteNotDurable(durability.refusal(barrier))
        return result

    async def watch(self, account_id: str, due_ms: int) -> None:
        """Ask the background worker to visit the account at `due_ms` (or earlier)."""
        await self.redis.zadd(keyspace.watch_shard(account_id), {account_id: due_ms}, lt=True)

    async def server_id(self) -> str | None:
        """The Redis server's run id (new after a restart or a failover); None on a Cluster."""
        if isinstance(self.redis, RedisCluster):
            return None
        info = await self.redis.info("server")
        return str(info.get("run_id") or "") or None

    # -- the metered path -------------------------------------------------------------

    async def admit(
        self,
        account_id: str,
        key_id: str,
        model: str,
        request_id: str,
        *,
        prompt_cost: int,
        output_cost: int,
        output_pico: int,
        prompt_tokens: int,
        max_output_tokens: int,
        choices: int,
    ) -> Admission:
        # The watch pointer goes with the reservation (admit.lua writes it on one Redis) or
        # before it (a Cluster: another slot), so a reservation can never exist unseen by
        # the reaper, even if this process dies right after the script.
        due = int(time.time() * 1000) + self.clock_offset_ms + self.config.billing.reservation_ttl_s * 1000
        reply = await self._run(
            "admit",
            account_id,
            request_id,
            key_id,
            model,
            prompt_cost,
            output_cost,
            output_pico,
            prompt_tokens,
            max_output_tokens,
            choices,
            model=model,
            watch_due=due,
            extra_keys=(keyspace.key_window(account_id, key_id),),
        )
        return scripts.admission(reply, model)

    async def settle(self, call: SettleCall) -> Settlement:
        whole, fine = split_exact(call.exact_cost)
        marker = keyspace.settled(call.account_id, call.request_id)
        key_id = call.entry.get("key_id")
        window = keyspace.key_window(call.account_id, str(key_id or ""))
        members = orjson.dumps({k: v for k, v in call.entry.items() if k not in SETTLE_WRITES})
        kind, key = call.entry.get("type") or "", key_id if isinstance(key_id, str) else ""
        args = (call.request_id, whole, fine, call.real_tokens, members, kind, key)
        reply = await self._run("settle", call.account_id, *args, model=call.model, extra_keys=(marker, window))
        settlement = scripts.settlement(reply)
        _report_anomalies(call, settlement)
        return settlement

    async def lookup(self, account_id: str, request_id: str) -> Lookup:
        """One request as Redis knows it (generation.lua)."""
        marker = keyspace.settled(account_id, request_id)
        reply = await self._run("generation", account_id, request_id, extra_keys=(marker,))
        return scripts.lookup(reply, account_id, request_id)

    # -- credits and accounts ----------------------------------------------------------

    async def grant(self, account_id: str, spec: GrantSpec) -> tuple[bool, dict[str, Any]]:
        """Returns (created, grant). An existing idempotency key returns the first grant."""
        reply = await self._run("grant", account_id, spec.to_json())
        if reply.code == "no_account":
            raise errors.NotFound(f"No account {account_id!r}.")
        if reply.code == "invalid":
            raise errors.InvalidRequest(str(reply.values["reason"]))
        return reply.code == "created", orjson.loads(reply.values["grant"])

    async def adjust(self, account_id: str, spec: dict[str, Any]) -> tuple[bool, str]:
        """Returns (created, ledger entry id). A seen idempotency key returns the first entry."""
        reply = await self._run("adjust", account_id, orjson.dumps({k: v for k, v in spec.items() if v is not None}))
        if reply.code == "no_account":
            raise errors.NotFound(f"No account {account_id!r}.")
        if reply.code == "invalid":
            raise errors.InvalidRequest(str(reply.values["reason"]), param="amount_usd")
        return reply.code == "ok", str(reply.values["ledger_id"])

    async def void(self, account_id: str, grant_id: str, reason: str) -> tuple[bool, dict[str, Any]]:
        reply = await self._run("void", account_id, grant_id, reason)
        if reply.code == "not_found":
            raise errors.NotFound(f"No grant {grant_id!r} on account {account_id!r}.")
        return reply.code == "voided", orjson.loads(reply.values["grant"])

    async def touch(self, account_id: str, key_id: str = "") -> AccountView:
        return scripts.account_view(await self._run("touch", account_id, key_id), account_id)

    # -- API keys' settings and spend (lib/keys.lua) ------------------------------------

    async def update_key(
        self, account_id: str, key_id: str, fields: dict[str, Any], cleared: Collection[str]
    ) -> dict[str, Any]:
        """Set and clear a key's settings (keys.stored_settings); returns them all."""
        reply = await self._run("key", account_id, key_id, orjson.dumps(fields), orjson.dumps(sorted(cleared)))
        if reply.code == "no_key":
            raise errors.NotFound(f"No key {key_id!r}.")
        return cast(dict[str, Any], orjson.loads(reply.values["settings"]))

    async def key_figures(self, account_id: str, key_ids: Collection[str]) -> list[KeyFigures]:
        """The keys' status, settings and spend, in the order given."""
        if not key_ids:
            return []
        return scripts.key_figures(await self._run("keyinfo", account_id, *key_ids))

    async def account_ids(self) -> list[str]:
        return sorted(str(account) for account in await self.redis.smembers(keyspace.ACCOUNTS))

    async def save_account(self, account_id: str, fields: dict[str, str | None], *, create: bool) -> dict[str, str]:
        fields = {name: "" if value is None else value for name, value in fields.items()}  # "" deletes
        if create:  # indexed first: an account can never exist unlisted (reconcile skips ghosts)
            await self.redis.sadd(keyspace.ACCOUNTS, account_id)
        token = secrets.token_hex(8) if create else ""
        reply = await self._run("account", account_id, "create" if create else "update", orjson.dumps(fields), token)
        if reply.code == "exists":
            raise errors.InvalidRequest(f"Account {account_id!r} already exists.", code="account_exists")
        if reply.code == "no_account":
            raise errors.NotFound(f"No account {account_id!r}.")
        if reply.code == "invalid":
            field = str(reply.values["field"])
            raise errors.InvalidRequest(f"{field!r} is not an account setting.", param=field)
        return scripts.pairs(reply.values["fields"])

    async def reap(self, account_id: str, *, reaping: bool = True, spared: Collection[str] = ()) -> Reaped:
        """Close lapsed reservations but `spared`; with `reaping` off, only report."""
        return scripts.reaped(await self._run("reap", account_id, "1" if reaping else "0", *spared))

    async def extend(self, account_id: str, checkpoints: Iterable[Checkpoint]) -> int:
        """Keep running requests from being reaped and record their progress; returns
        how many were still open."""
        args: list[Any] = []
        for point in checkpoints:
            if point.exact_cost is None or point.usage is None:
                args += (point.request_id, 0, 0, "")
            else:
                whole, fine = split_exact(point.exact_cost)
                args += (point.request_id, whole, fine, orjson.dumps(point.usage))
        reply = await self._run("extend", account_id, *args)
        return int(reply.values["extended"])

    async def outbox_length(self, account_id: str) -> int:
        return int(await self.redis.llen(keyspace.account(account_id, "outbox")))


def _report_anomalies(call: SettleCall, settlement: Settlement) -> None:
    """Charged all the same, but an operator must hear of it."""
    if settlement.exceeded:
        metrics.child(metrics.RESERVATION_EXCEEDED, call.model).inc()
        reserved = usd(settlement.reserved or 0)
        log.warning("reservation_exceeded", request_id=call.request_id, account_id=call.account_id,
                    model=call.model, reserved_usd=reserved, charged_usd=usd(settlement.cost))  # fmt: skip
    if settlement.unreserved:
        metrics.SETTLEMENTS_UNRESERVED.inc()
        log.warning("settlement_unreserved", request_id=call.request_id, account_id=call.account_id,
                    charged_usd=usd(settlement.cost), note="no reservation in Redis (lost in a failover?)")  # fmt: skip


# -- reading the ledger (plain stream reads; no decision is made here) ---------------


async def read_entries(
    redis: Redis, account_id: str, *, low: str = "-", high: str = "+", limit: int = 100, newest_first: bool = False
) -> list[tuple[str, str]]:
    """Entries oldest first (or newest first), (stream id, entry JSON), from `low` to
    `high`: stream ids, inclusive ("(id" exclusive, as in XRANGE)."""
    if high.startswith("(") and {int(n) for n in high[1:].split("-")} == {0}:
        return []  # before the first possible id: Redis calls "(0-0" an invalid bound
    key = keyspace.account(account_id, "ledger")
    read = redis.xrevrange(key, high, low, limit) if newest_first else redis.xrange(key, low, high, limit)
    rows = cast(list[tuple[str, dict[str, str]]], await read)
    return [(entry_id, fields["e"]) for entry_id, fields in rows]


async def read_entry(redis: Redis, account_id: str, entry_id: str) -> str:
    """One entry's JSON by its stream id."""
    rows = await read_entries(redis, account_id, low=entry_id, high=entry_id, limit=1)
    return rows[0][1]


async def iter_entries(
    redis: Redis, account_id: str, start: int | str = "-", end: int | str = "+", page: int = 1000
) -> AsyncIterator[tuple[str, str]]:
    """(stream id, entry JSON), oldest first, read in pages; bounds are inclusive."""
    low = str(start)
    while True:
        rows = await read_entries(redis, account_id, low=low, high=str(end), limit=page)
        for row in rows:
            yield row
        if len(rows) < page:
            return
        low = f"({rows[-1][0]}"
