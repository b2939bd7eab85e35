"""Usage reports: an account's usage entries in a time range, grouped by model, UTC day
and/or API key (`/admin/v1/accounts/{id}/usage`, `/v1/usage`). Plain stream reads."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from . import views
from .ledger import iter_entries
from .money import usd

TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


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
