"""The admin operations, shared by the admin HTTP API and the CLI.

Each operation validates its input with a `schemas` model (raw dicts in, so both
callers go through the same validation), then runs one ledger script for anything
touching money, or plain writes for keys. Results are the JSON shapes of `views`:
amounts as decimal strings, times as RFC 3339 UTC.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from redis.asyncio import Redis

from . import errors, generations, keyspace, reconcile, reports, views, webhooks
from .config import Config
from .keys import KeyStore, stored_settings
from .ledger import GrantSpec, Ledger, read_entries, read_entry
from .money import usd
from .schemas import (
    AccountCreate,
    AccountPatch,
    AccountQuery,
    AdjustmentCreate,
    AutoTopup,
    DeadLetterQuery,
    ExportQuery,
    GenerationQuery,
    GrantCreate,
    GrantVoid,
    KeyCreate,
    KeyPatch,
    LedgerQuery,
    UsageQuery,
    WebhookReplay,
    parse,
)
from .scripts import AccountView

if TYPE_CHECKING:
    from .state import State

Body = Mapping[str, Any]
KeyRequest = TypeVar("KeyRequest", bound=KeyPatch)
USAGE_DEFAULT_SPAN_MS = 30 * reports.DAY_MS
EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def checked_id(account_id: str) -> str:
    """Account ids become Redis hash tags: anything else could escape the account's slot."""
    if not keyspace.valid_account_id(account_id):
        raise errors.InvalidRequest(
            f"Invalid account id {account_id!r}: use 1-128 of A-Z a-z 0-9 _ . : @ -, starting alphanumeric.",
            param="id",
        )
    return account_id


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Service:
    redis: Redis
    config: Config
    ledger: Ledger
    key_store: KeyStore

    @classmethod
    def of(cls, state: State) -> Service:
        """The services of a running proxy, with its current (possibly reloaded) config."""
        return cls(state.redis, state.config, state.ledger, state.key_store)

    # -- accounts ------------------------------------------------------------------

    async def list_accounts(self, query: Body | None = None) -> dict[str, Any]:
        """A page of accounts in id order, each as `get_account` shows it but its grants."""
        q = parse(AccountQuery, query)
        needle = q.query.casefold()
        ids = [a for a in await self.ledger.account_ids() if needle in a.casefold() and a > (q.cursor or "")]
        page = ids[: q.limit]
        shown = await asyncio.gather(*(self._touch(account_id) for account_id in page))
        return {
            "object": "list",
            "data": [views.account_summary(a, view) for a, view in zip(page, shown, strict=True)],
            "next_cursor": page[-1] if len(ids) > q.limit else None,
        }

    async def create_account(self, body: Body) -> dict[str, Any]:
        req = parse(AccountCreate, body)
        fields = account_fields(req, self.config)
        if "plan" not in req.model_fields_set and self.config.default_plan:
            fields["plan"] = self.config.default_plan
        fields = {name: value for name, value in fields.items() if value is not None}
        await self.ledger.save_account(checked_id(req.id), fields, create=True)
        return await self.get_account(req.id)

    async def get_account(self, account_id: str) -> dict[str, Any]:
        return views.account(account_id, await self._touch(account_id))

    async def update_account(self, account_id: str, body: Body) -> dict[str, Any]:
        req = parse(AccountPatch, body)
        await self.ledger.save_account(checked_id(account_id), account_fields(req, self.config), create=False)
        return await self.get_account(account_id)

    async def balance(self, account_id: str) -> dict[str, Any]:
        return views.balance(account_id, await self._touch(account_id))

    async def grants(self, account_id: str) -> dict[str, Any]:
        """Every grant the account ever had (expired, voided and depleted too), oldest first."""
        account_id = checked_id(account_id)
        await self._touch(account_id)  # lapsed grants show as expired, not active
        raw = await self.redis.hvals(keyspace.account(account_id, "grants"))
        grants = sorted((orjson.loads(g) for g in raw), key=lambda g: (g["created_at"], g.get("seq", 0), g["id"]))
        return {"account_id": account_id, "grants": [views.grant(g) for g in grants]}

    async def _touch(self, account_id: str) -> AccountView:
        """Reads that show money bring lazy bookkeeping (expiry, allocation) up to date."""
        return await self.ledger.touch(checked_id(account_id))

    async def _require(self, account_id: str) -> str:
        """Reads of history only check that the account exists: they change nothing."""
        if not await self.redis.exists(keyspace.account(checked_id(account_id), "acct")):
            raise errors.NotFound(f"No account {account_id!r}.")
        return account_id

    # -- keys ----------------------------------------------------------------------

    async def create_key(self, account_id: str, body: Body) -> dict[str, Any]:
        req = self._key_request(KeyCreate, body)
        if req.expires_at is not None and req.expires_at <= now_ms():
            raise errors.InvalidRequest("expires_at must be in the future.", param="expires_at")
        fields, _ = stored_settings(req)
        record, secret = await self.key_store.create_key(checked_id(account_id), req.name, settings=fields)
        [figures] = await self.ledger.key_figures(account_id, [record.key_id])
        return {**views.api_key(account_id, figures), "key": secret}  # shown once: only its hash is stored

    async def update_key(self, key_id: str, body: Body) -> dict[str, Any]:
        """Change a key's settings: the next request on any instance sees them."""
        fields, cleared = stored_settings(self._key_request(KeyPatch, body))
        account_id = await self.key_store.account_of(key_id)
        await self.ledger.update_key(account_id, key_id, fields, cleared)
        return await self.get_key(key_id)

    async def get_key(self, key_id: str) -> dict[str, Any]:
        account_id = await self.key_store.account_of(key_id)
        [figures] = await self.ledger.key_figures(account_id, [key_id])
        return views.api_key(account_id, figures)

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return await self.key_store.revoke_key(key_id)

    async def list_keys(self, account_id: str) -> dict[str, Any]:
        ids = await self.key_store.key_ids(await self._require(account_id))
        figures = await self.ledger.key_figures(account_id, ids)
        return {"object": "list", "data": [views.api_key(account_id, f) for f in figures]}

    def _key_request(self, model: type[KeyRequest], body: Body) -> KeyRequest:
        req = parse(model, body)
        unknown = sorted(set(req.allowed_models or ()) - set(self.config.models))
        if unknown:
            raise errors.InvalidRequest(f"Unknown model(s): {', '.join(unknown)}.", param="allowed_models")
        return req

    # -- credits -------------------------------------------------------------------

    async def grant(self, account_id: str, body: Body) -> tuple[bool, dict[str, Any]]:
        """(created, grant). A seen idempotency key returns the first grant, unchanged."""
        req = parse(GrantCreate, body)
        spec = GrantSpec(
            kind=req.kind,
            amount=req.amount_usd,  # micro-USD already (schemas.Usd)
            priority=req.priority,
            effective_at=req.effective_at or 0,
            expires_at=req.expires_at or 0,
            description=req.description,
            idem=req.idempotency_key,
            cost_basis=req.per_unit_cost_basis,
        )
        created, grant = await self.ledger.grant(checked_id(account_id), spec)
        if not created and (grant["amount"], grant["kind"]) != (str(spec.amount), spec.kind):
            # a reused key with another amount is a caller's bug: say so rather than pretend
            raise errors.InvalidRequest(
                f"Idempotency key {req.idempotency_key!r} was already used for grant {grant['id']} "
                f"({grant['kind']}, ${usd(int(grant['amount']))}).",
                param="idempotency_key",
                code="idempotency_key_reused",
            )
        return created, views.grant(grant)

    async def adjust(self, account_id: str, body: Body) -> tuple[bool, dict[str, Any]]:
        """(created, ledger entry): settle invoiced overage debt, or charge by hand."""
        req = parse(AdjustmentCreate, body)
        # a key of its own when none is given: a call retried after a lost reply adjusts once
        idem = req.idempotency_key or "auto_" + secrets.token_hex(12)
        spec = {"amount": str(req.amount_usd), "description": req.description, "idem": idem}
        account_id = checked_id(account_id)
        created, entry_id = await self.ledger.adjust(account_id, spec)
        return created, views.entry(account_id, entry_id, await read_entry(self.redis, account_id, entry_id))

    async def void(self, account_id: str, grant_id: str, body: Body) -> dict[str, Any]:
        """Void a grant's remainder; voiding it again changes nothing."""
        req = parse(GrantVoid, body)
        _, grant = await self.ledger.void(checked_id(account_id), grant_id, req.reason)
        return views.grant(grant)

    # -- history -------------------------------------------------------------------

    async def ledger_page(self, account_id: str, query: Body) -> dict[str, Any]:
        """Oldest first, newest last (`order=desc`: newest first, paging back in time).
        `next_cursor` is null on the last page."""
        q = parse(LedgerQuery, query)
        account_id = await self._require(account_id)
        after = f"({q.cursor}" if q.cursor else None  # the cursor is exclusive
        if q.order == "desc":
            rows = await read_entries(self.redis, account_id, high=after or "+", limit=q.limit, newest_first=True)
        else:
            rows = await read_entries(self.redis, account_id, low=after or "-", limit=q.limit)
        return {
            "object": "list",
            "entries": [views.entry(account_id, entry_id, raw) for entry_id, raw in rows],
            "next_cursor": rows[-1][0] if len(rows) == q.limit else None,
        }

    async def export_ledger(self, account_id: str, query: Body) -> tuple[str, AsyncIterator[str]]:
        """(content type, chunks): the whole ledger as CSV or JSON lines."""
        q = parse(ExportQuery, query)
        await self._require(account_id)
        return EXPORT_TYPES[q.format], reconcile.export(self.redis, account_id, q.format)

    async def generation(self, account_id: str, query: Body) -> dict[str, Any]:
        """One request of the account (`query`: {id}; generations.py); 404 for an id it
        never made."""
        q = parse(GenerationQuery, query)
        found = await self.ledger.lookup(checked_id(account_id), q.id)
        return generations.generation(account_id, q.id, found)

    async def usage(self, account_id: str, query: Body) -> dict[str, Any]:
        """Usage entries in [from, to), grouped by model, UTC day and/or API key."""
        q = parse(UsageQuery, query)
        await self._require(account_id)
        end = q.to if q.to is not None else now_ms()
        start = q.from_ if q.from_ is not None else end - USAGE_DEFAULT_SPAN_MS
        if start >= end:
            raise errors.InvalidRequest("`from` must be earlier than `to`.", param="from")
        dimensions = tuple(q.group_by.split(","))  # model, day and/or key (the API key id)
        return await reports.usage(self.redis, account_id, start, end, dimensions)

    # -- webhooks ------------------------------------------------------------------

    async def account_webhooks(self, account_id: str) -> dict[str, Any]:
        """The account's outbox, latest delivery attempts and dead letters."""
        return await webhooks.deliveries(self.redis, await self._require(account_id))

    async def dead_letters(self, query: Body) -> dict[str, Any]:
        q = parse(DeadLetterQuery, query)
        return {"object": "list", "data": await webhooks.list_dead(self.redis, q.account_id)}

    async def replay_dead(self, body: Body) -> dict[str, Any]:
        """Dead letters back to their outboxes, retried from the first attempt."""
        req = parse(WebhookReplay, body)
        return {"object": "webhook_replay", "replayed": await webhooks.replay_dead(self.ledger, req.account_id)}


def topup_setting(topup: AutoTopup) -> dict[str, str]:
    """As lua/lib/events.lua reads it: micro-USD strings; `target` tops up to a balance, `amount` by a sum."""
    setting = {"threshold": str(topup.threshold_usd)}
    if topup.target_usd is not None:
        setting["target"] = str(topup.target_usd)
    else:
        setting["amount"] = str(topup.amount_usd)
    return setting


def account_fields(req: AccountPatch, config: Config) -> dict[str, str | None]:
    """Account hash fields for the fields given; None deletes the field (falls back)."""
    given = req.model_fields_set
    fields: dict[str, str | None] = {}
    if "plan" in given:
        if req.plan is not None and req.plan not in config.plans:
            known = ", ".join(config.plans) or "none"
            raise errors.InvalidRequest(f"Unknown plan {req.plan!r} (configured: {known}).", param="plan")
        fields["plan"] = req.plan
    if "overage_limit_usd" in given:
        limit = req.overage_limit_usd
        fields["overage_limit"] = None if limit is None else str(limit)  # 'unlimited' or micro-USD
    if "auto_topup" in given:
        topup = req.auto_topup
        fields["auto_topup"] = None if topup is None else orjson.dumps(topup_setting(topup)).decode()
    if "rate_limits" in given:
        limits = req.rate_limits
        for name in ("rpm", "tpm"):
            if limits is None or name in limits.model_fields_set:
                value = None if limits is None else getattr(limits, name)
                fields[f"rl_{name}"] = None if value is None else str(value)
    if "status" in given:
        fields["status"] = req.status
    if "metadata" in given:
        fields["metadata"] = None if req.metadata is None else orjson.dumps(req.metadata).decode()
    if "low_balance_thresholds_usd" in given:
        marks = req.low_balance_thresholds_usd
        fields["thresholds"] = None if marks is None else orjson.dumps(sorted(set(marks), reverse=True)).decode()
    return fields
