"""One metered request as its account sees it (`GET /v1/generation?id=`, and the admin's
`GET /admin/v1/accounts/{id}/generations/{request_id}`): model, usage, charged cost.

Read without scanning anything: settlement marks each request id settled with the id of
its ledger entry (settle.lua), and a running request is a field of the account's
reservations; generation.lua reads both in one atomic call. `status`:

    in_progress  reserved, not settled yet (usage and cost_usd null)
    settled      charged (`cost_usd`, possibly "0.000000": a downgraded request is free)
    released     nothing charged (an upstream error, a client gone before the upstream
                 answered, a reservation the reaper released)

A request whose proxy died mid-stream is `settled` from its last checkpoint (`estimated`)
until its late settlement, if any, charges the rest. Records live as long as the settled
marker (30 days); a reaped request never settled, as long as the account's reaped set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from .ledger import read_entries
from .money import usd
from .reports import TOKEN_FIELDS
from .schemas import REQUEST_ID
from .scripts import Lookup
from .views import rfc3339

UsdText = Annotated[str, Field(pattern=r"^-?[0-9]+\.[0-9]{6}$", examples=["0.000310"])]
TimeText = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class GenerationUsage(BaseModel):
    """Tokens as charged: input includes cached and audio input, output includes
    reasoning and audio output (as OpenAI reports them)."""

    model_config = ConfigDict(extra="forbid")
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    audio_input_tokens: int = 0  # present when not zero
    audio_output_tokens: int = 0


def _described(text: str, default: Any = ...) -> Any:
    return Field(default, description=text)


class Generation(BaseModel):
    """The answer's shape, for the OpenAPI document (`generation` renders it)."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(pattern=REQUEST_ID)] = _described("the request id (`x-request-id`)")
    object: Literal["generation"]
    account_id: str
    model: str | None = _described("the model that served it (a downgrade's target, when downgraded)")
    created_at: TimeText | None = _described("admission (the settlement's, when Redis knew no reservation)")
    settled_at: TimeText | None = _described("null while in progress, and for a request the reaper closed")
    status: Literal["in_progress", "settled", "released"] = _described(
        "in_progress: reserved, not settled yet; settled: charged; released: nothing charged"
    )
    key_id: str | None
    usage: GenerationUsage | None = _described("the tokens charged; null while in progress and when released")
    cost_usd: UsdText | None = _described("what was charged (x-metering-cost-usd); null while in progress")
    estimated: bool | None = _described("tokens counted here: the upstream reported none; null while in progress")
    reserved_usd: UsdText | None = _described("its reservation; null when Redis knew none (`unreserved`)")
    ledger_entry_id: str | None = _described("its settlement's ledger entry; null until settled")
    downgraded_from: str | None = _described("the model asked, when the plan's downgrade served it (free)", None)
    service_tier: str | None = _described("the tier the upstream reported serving it at, else the one asked", None)
    description: str | None = _described("why nothing was charged, for a released request", None)
    unreserved: bool | None = _described("settled with no reservation in Redis (lost in a failover)", None)
    reservation_exceeded: bool | None = _described("charged above its reservation", None)


def generation(account_id: str, request_id: str, found: Lookup) -> dict[str, Any]:
    if found.found == "settled":
        return _settled(account_id, request_id, found.record, found.ledger_id)
    return _reserved(account_id, request_id, found.record, open_=found.found == "open")


SCAN_PAGE = 200
SCAN_LIMIT = 5_000  # ledger entries read back at most for one page of requests


async def recent(
    redis: Redis, account_id: str, limit: int, before: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The account's latest settled requests (`GET /v1/generations`), newest first, each
    as `GET /v1/generation` shows it, and the cursor of the next page (None at the start
    of the ledger). Reads back at most SCAN_LIMIT entries: an account whose ledger is
    mostly grants gets short pages, never a slow one."""
    found: list[dict[str, Any]] = []
    high, scanned = f"({before}" if before else "+", 0
    while len(found) < limit and scanned < SCAN_LIMIT:
        rows = await read_entries(redis, account_id, high=high, limit=SCAN_PAGE, newest_first=True)
        for entry_id, raw in rows:
            high, scanned = f"({entry_id}", scanned + 1
            entry = orjson.loads(raw)
            if entry.get("type") == "usage" and entry.get("request_id"):
                found.append(_settled(account_id, entry["request_id"], entry, entry_id))
                if len(found) == limit:
                    return found, entry_id
        if len(rows) < SCAN_PAGE:
            return found, None
    return found, high[1:]


def _base(account_id: str, request_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "object": "generation", "account_id": account_id, **fields}


def _settled(account_id: str, request_id: str, e: dict[str, Any], ledger_id: str | None) -> dict[str, Any]:
    """From the settlement's ledger entry. A settlement after the reaper charged a
    checkpoint charged the difference: the request's cost is both together."""
    charged = int(e.get("previously_charged") or 0) - int(e["amount"])  # a charge's amount is negative
    out = _base(
        account_id,
        request_id,
        model=e.get("model"),
        created_at=rfc3339(e.get("admitted") or e.get("ts")),
        settled_at=rfc3339(e.get("ts")),
        status="released" if e["type"] == "release" else "settled",
        key_id=e.get("key_id"),
        usage=_usage(e.get("usage")),
        cost_usd=usd(charged),
        estimated=bool(e.get("estimated")),
        reserved_usd=usd(int(e["reserved"])) if e.get("reserved") is not None else None,
        ledger_entry_id=ledger_id,
    )
    for name in ("downgraded_from", "service_tier", "description", "unreserved", "reservation_exceeded"):
        if e.get(name) is not None:
            out[name] = e[name]
    return out


def _reserved(account_id: str, request_id: str, r: dict[str, Any], *, open_: bool) -> dict[str, Any]:
    """From a reservation: open (the request runs), or closed by the reaper and not
    settled since (charged its checkpoint, or released)."""
    if open_:
        status, usage, cost, estimated = "in_progress", None, None, None
    elif r.get("charged") is not None:
        status, usage, cost, estimated = "settled", _usage((r.get("ck") or {}).get("u")), usd(int(r["charged"])), True
    else:
        status, usage, cost, estimated = "released", None, usd(0), False
    out = _base(
        account_id,
        request_id,
        model=r.get("dg") or r.get("model"),  # admit.lua keeps the model asked and its downgrade
        created_at=rfc3339(r.get("admitted")),
        settled_at=None,
        status=status,
        key_id=r.get("key"),
        usage=usage,
        cost_usd=cost,
        estimated=estimated,
        reserved_usd=usd(int(r["amount"])),
        ledger_entry_id=None,
    )
    if r.get("dg"):
        out["downgraded_from"] = r.get("model")
    return out


def _usage(raw: dict[str, int] | None) -> dict[str, int] | None:
    """In the order of `GenerationUsage` (Lua's JSON keeps none); audio counts when present."""
    if raw is None:
        return None
    return {name: raw.get(name, 0) for name in TOKEN_FIELDS} | {
        name: raw[name] for name in ("audio_input_tokens", "audio_output_tokens") if raw.get(name)
    }
