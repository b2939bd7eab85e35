"""Usage reports: an account's usage entries in a time range, grouped by model, UTC day
and/or API key (`/admin/v1/accounts/{id}/usage`, `/v1/usage`), and its latest requests
(`/v1/generations`). Plain stream reads."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from . import views
from .ledger import iter_entries, read_entries
from .money import usd

TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")
SCAN_PAGE = 200
SCAN_LIMIT = 5_000  # ledger entries read back at most for one page of requests


async def usage(redis: Redis, account_id: str, start: int, end: int, dimensions: tuple[str, ...]) -> dict[str, Any]:
    """Usage entries in [start, end) ms, one group per value of `dimensions`."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    # stream ids are ms timestamps: XRANGE bounds are inclusive, so `end` - 1
    async for entry_id, raw in iter_entries(redis, account_id, start, end - 1):
        entry = orjson.loads(raw)
        if entry.get("type") != "usage":
            continue
        values = {"model": entry.get("model") or "", "day": _day(entry_id), "key": entry.get("key_id") or ""}
        key = tuple(values[d] for d in dimensions)
        _add_usage(groups.setdefault(key, _empty_group(dict(zip(dimensions, key, strict=True)))), entry)
    return {
        "account_id": account_id,
        "from": views.rfc3339(start),
        "to": views.rfc3339(end),
        "groups": [_render_group(groups[key]) for key in sorted(groups)],
    }


def _day(entry_id: str) -> str:
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, UTC).date().isoformat()


def _empty_group(labels: dict[str, str]) -> dict[str, Any]:
    named = {("key_id" if name == "key" else name): value for name, value in labels.items()}
    # the contract's group shape always names the model (null when not grouped by it)
    return {"model": None, **named, "requests": 0, **dict.fromkeys(TOKEN_FIELDS, 0), "cost": 0}


def _add_usage(group: dict[str, Any], entry: dict[str, Any]) -> None:
    usage = entry.get("usage") or {}
    group["requests"] += 1
    for name in TOKEN_FIELDS:
        group[name] += int(usage.get(name) or 0)
    group["cost"] -= int(entry["amount"])  # usage amounts are negative: a charge


def _render_group(group: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in group.items() if k != "cost"}
    out["cost_usd"] = usd(group["cost"])
    return out


async def recent_requests(
    redis: Redis, account_id: str, limit: int, before: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The account's latest settled requests, newest first, each as one generation
    (`{id, model, created_at, status, key_id, usage, cost_usd, estimated}`), and the cursor
    of the next page (None at the start of the ledger). Reads back at most SCAN_LIMIT
    entries: an account whose ledger is mostly grants gets short pages, never a slow one."""
    found: list[dict[str, Any]] = []
    high, scanned = f"({before}" if before else "+", 0
    while len(found) < limit and scanned < SCAN_LIMIT:
        rows = await read_entries(redis, account_id, high=high, limit=SCAN_PAGE, newest_first=True)
        for entry_id, raw in rows:
            high, scanned = f"({entry_id}", scanned + 1
            entry = orjson.loads(raw)
            if entry.get("type") == "usage" and entry.get("request_id"):
                found.append(_generation(entry_id, entry))
                if len(found) == limit:
                    return found, entry_id
        if len(rows) < SCAN_PAGE:
            return found, None
    return found, high[1:]


def _generation(entry_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    usage = entry.get("usage") or {}
    return {
        "id": entry["request_id"],
        "object": "generation",
        "model": entry.get("model"),
        "created_at": views.rfc3339(int(entry_id.split("-", 1)[0])),
        "status": "settled",
        "key_id": entry.get("key_id"),
        "usage": {name: int(usage.get(name) or 0) for name in TOKEN_FIELDS},
        "cost_usd": usd(-int(entry["amount"])),
        "estimated": bool(entry.get("estimated")),
    }
