"""The config's cross-references, checked on the raw data so that they are reported
alongside field errors, with lines: every name one section gives another exists (a
model's upstream, a plan's downgrade, a tier's models, `default_plan`), and tiers are
unique and ascending."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

Loc = tuple[str | int, ...]


def _dict(v: Any) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}


def _name(v: Any) -> str | None:
    return v.strip() if isinstance(v, str) and v.strip() else None


def _try_decimal(v: Any) -> Decimal | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, str, Decimal)):
        return None
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _unknown(kind: str, name: str, known: Mapping[Any, Any]) -> str:
    return f"unknown {kind} {name!r} (configured: {', '.join(map(str, known)) or 'none'})"


def reference_errors(data: Any) -> list[tuple[Loc, str]]:
    """Dangling names and tier problems (order, duplicates) in raw, unvalidated config data."""
    data = _dict(data)
    upstreams, models, plans = (_dict(data.get(k)) for k in ("upstreams", "models", "plans"))
    errors: list[tuple[Loc, str]] = []
    for name, model in models.items():
        up = _name(_dict(model).get("upstream"))
        if up is not None and up not in upstreams:
            errors.append((("models", name, "upstream"), _unknown("upstream", up, upstreams)))
    for name, plan in plans.items():
        target = _name(_dict(_dict(plan).get("on_exhausted")).get("downgrade_to"))
        if target is not None and target not in models:
            loc: Loc = ("plans", name, "on_exhausted", "downgrade_to")
            errors.append((loc, _unknown("model", target, models)))
    default_plan = _name(data.get("default_plan"))
    if default_plan is not None and default_plan not in plans:
        errors.append((("default_plan",), _unknown("plan", default_plan, plans)))
    return errors + _tier_errors(_dict(data.get("rate_tiers")).get("tiers"), models)


def _tier_errors(tiers: Any, models: Mapping[Any, Any]) -> list[tuple[Loc, str]]:
    if not isinstance(tiers, (list, tuple)):
        return []
    errors: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    prev: Decimal | None = None
    for i, tier in enumerate(map(_dict, tiers)):
        loc: Loc = ("rate_tiers", "tiers", i)
        name, low = _name(tier.get("name")), _try_decimal(tier.get("min_usd"))
        if name is not None and name in seen:
            errors.append((loc + ("name",), f"duplicate tier name {name!r}"))
        seen.add(name or "")
        if i == 0 and low is not None and low != 0:
            errors.append((loc + ("min_usd",), "the first tier must have min_usd 0"))
        if prev is not None and low is not None and low < prev:
            errors.append((loc + ("min_usd",), "tiers must be sorted by ascending min_usd"))
        prev = low if low is not None else prev
        for model in _dict(tier.get("models")):
            if model not in models:
                errors.append((loc + ("models", model), _unknown("model", model, models)))
    return errors


def format_loc(loc: Loc) -> str:
    """`("models", "gpt-4o", "price")` -> "models.gpt-4o.price"; list indexes as `[i]`."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    return text.removeprefix(".")
