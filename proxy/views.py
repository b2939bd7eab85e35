"""JSON shapes of the public API: balances, grants, API keys, ledger entries, usage.

Amounts leave as decimal strings in USD, times as RFC 3339 UTC strings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from .money import UNLIMITED_MICRO, exact_usd, usd

if TYPE_CHECKING:  # scripts renders its errors' times with rfc3339
    from .scripts import AccountView, KeyFigures


def rfc3339(ms: int | str | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> int | None:
    """RFC 3339 (or a bare date) -> ms; None passes through. Raises ValueError."""
    if value in (None, ""):
        return None
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def grant(g: dict[str, Any]) -> dict[str, Any]:
    out = {
        "id": g["id"],
        "kind": g["kind"],
        "amount_usd": usd(int(g["amount"])),
        "remaining_usd": usd(int(g["remaining"])),
        "priority": g.get("priority", 0),
        "effective_at": rfc3339(g.get("effective_at")),
        "expires_at": rfc3339(g.get("expires_at")),
        "status": g["status"],
        "description": g.get("description"),
    }
    if g.get("void_reason"):
        out["void_reason"] = g["void_reason"]
    if g.get("cost_basis"):
        out["per_unit_cost_basis"] = g["cost_basis"]
    return out


def _draw_order(g: dict[str, Any]) -> tuple[int, int, int, int]:
    """lua/lib/charges.lua draw_order: priority, earliest expiry (never last), oldest."""
    return (g.get("priority", 0), g.get("expires_at") or 2**62, g["created_at"], g.get("seq", 0))


def balance(account_id: str, view: AccountView) -> dict[str, Any]:
    grants = sorted(
        view.grants,
        key=lambda g: (g.get("priority", 0), g.get("expires_at") or 2**62, g["created_at"], g.get("seq", 0)),
    )
    return {
        "account_id": account_id,
        "balance_usd": usd(view.balance),
        "available_usd": usd(max(view.available, 0)) if view.overage_room < UNLIMITED_MICRO else None,
        "reserved_usd": usd(view.reserved),
        "overage_usd": usd(view.num("debt")),
        "grants": [grant(g) for g in grants],
    }


def account(account_id: str, view: AccountView) -> dict[str, Any]:
    f = view.fields
    topup = orjson.loads(f["auto_topup"]) if f.get("auto_topup") else None
    return {
        "id": account_id,
        "status": f.get("status", "active"),
        "plan": f.get("plan") or None,
        "tier": f.get("tier"),
        "rate_limits": {"rpm": view.rpm, "tpm": view.tpm, "override": bool(f.get("rl_rpm") or f.get("rl_tpm"))},
        "overage_limit_usd": _overage(f.get("overage_limit")),
        "auto_topup": {name + "_usd": usd(int(value)) for name, value in topup.items()} if topup else None,
        "metadata": orjson.loads(f["metadata"]) if f.get("metadata") else {},
        "lifetime_paid_usd": usd(view.num("lifetime_paid")),
        "lifetime_consumed_usd": usd(view.num("lifetime_consumed")),
        "first_payment_at": rfc3339(f.get("first_payment_ms")),
        "created_at": rfc3339(f.get("created_ms")),
        **{k: v for k, v in balance(account_id, view).items() if k != "account_id"},
    }


def account_summary(account_id: str, view: AccountView) -> dict[str, Any]:
    """An account as listed: as `account` shows it, without its grants."""
    return {name: value for name, value in account(account_id, view).items() if name != "grants"}


def api_key(account_id: str, key: KeyFigures) -> dict[str, Any]:
    """A key as `GET /v1/key` and the admin API show it (OpenRouter's key shape, in USD strings)."""
    s = key.settings
    limit, remaining = key.limit, key.remaining
    status = "expired" if key.status == "active" and key.expired else key.status
    return {
        "id": key.key_id,
        "object": "api_key",
        "account_id": account_id,
        "name": s.get("name", ""),
        "status": status,
        "limit_usd": None if limit is None else usd(limit),
        "limit_reset": s.get("reset"),
        "limit_remaining_usd": None if remaining is None else usd(remaining),
        "limit_resets_at": rfc3339(key.resets_at),
        "reserved_usd": usd(key.reserved),
        "usage_usd": {period: usd(key.spend[name]) for period, name in SPEND_PERIODS},
        "expires_at": rfc3339(s.get("exp")),
        "allowed_models": key.allowed_models,
        "rate_limits": {"rpm": s.get("rpm"), "tpm": s.get("tpm")},
        "created_at": rfc3339(s.get("created")),
    }


SPEND_PERIODS = (("total", "total"), ("daily", "day"), ("weekly", "week"), ("monthly", "month"))


def _overage(value: str | None) -> str | None:
    if not value:
        return None
    return "unlimited" if value == "unlimited" else usd(int(value))


_PASSED_THROUGH = (
    "grant_id",
    "request_id",
    "key_id",
    "model",
    "usage",
    "estimated",
    "downgraded_from",
    "price_source",  # the price catalog that priced it (`price: catalog`); absent: the config's prices
    "service_tier",  # the tier the upstream reported serving it at, else the one asked
    "description",
    "reservation_exceeded",  # charged above its reservation (an upstream past its cap)
    "unreserved",  # Redis knew no reservation (lost in a failover): charged all the same
)


def entry(account_id: str, entry_id: str, raw: str) -> dict[str, Any]:
    e = orjson.loads(raw)
    out: dict[str, Any] = {
        "id": entry_id,
        "account_id": account_id,
        "created_at": rfc3339(e.get("ts")),
        "type": e["type"],
        "amount_usd": usd(int(e["amount"])),
        "balance_usd": usd(int(e["balance"])),
    }
    for name in _PASSED_THROUGH:
        if e.get(name) is not None:
            out[name] = e[name]
    if e.get("exact_micro") is not None:  # the cost before rounding (the account carries the rest)
        out["cost_exact_usd"] = exact_usd(int(e["exact_micro"]), int(e.get("exact_fine") or 0))
    for name in ("reserved", "previously_charged", "not_returned"):
        if e.get(name) is not None:
            out[name + "_usd"] = usd(int(e[name]))
    if isinstance(e.get("draws"), list):
        out["draws"] = [{"grant_id": d["grant_id"], "amount_usd": usd(int(d["amount"]))} for d in e["draws"]]
    if e.get("overage"):
        out["overage_usd"] = usd(int(e["overage"]))
    return out
