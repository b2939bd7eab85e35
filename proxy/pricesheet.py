"""What `metering-proxy prices show|list` print: a model's prices as they apply (every
tier and long-context threshold, context window, output cap, where the prices came
from), and a provider's catalog models with their main prices; as text or JSON."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from . import prices
from .catalog import price_of
from .config import Config, PriceConfig
from .configfile import catalog_entry
from .money import Price, Rates

KIND_NAMES = ("input", "cached_input", "output", "audio_input", "audio_output")


def show(model: str, provider: str | None = None, config: Config | None = None) -> dict[str, Any]:
    """A configured model as the proxy prices it (markup applied), or with `provider`
    (or when the config has no such model) the catalog's entry as `price: catalog` takes it."""
    configured = config.models.get(model) if config is not None and provider is None else None
    if config is None or configured is None:
        entry = prices.lookup(model, provider or prices.DEFAULT_PROVIDER)
        price = price_of(PriceConfig.model_validate(entry.price), Decimal(0))
        return _sheet(model, entry.provider, entry, price, entry.max_input_tokens, None, None)
    catalogued = configured.price.source == "catalog"
    return _sheet(
        model,
        config.upstreams[configured.upstream].provider,
        catalog_entry(config, model) if catalogued else None,
        price_of(configured.price, config.markup_for(model)),
        configured.max_input_tokens,
        configured.max_output_tokens,
        config.markup_for(model),
    )


def _sheet(
    model: str,
    provider: str,
    entry: prices.Entry | None,
    price: Price,
    max_input: int | None,
    max_output: int | None,
    markup: Decimal | None,  # None: not configured (the catalog's own prices)
) -> dict[str, Any]:
    return {
        "model": model,
        "configured": markup is not None,
        "provider": provider,
        "price_source": prices.CATALOG if entry else "config",
        "catalog": _catalog(entry) if entry else None,
        "max_input_tokens": max_input,
        "max_output_tokens": max_output,
        "markup_percent": _text(markup or Decimal(0)),
        "prices": {name: _tier(tier.rates, tier.long_context) for name, tier in price.tiers},
    }


def _catalog(entry: prices.Entry) -> dict[str, Any]:
    return {
        "version": prices.CATALOG,
        "model": entry.model_id,
        "name": entry.name,
        "via": entry.via,
        "as_of": entry.as_of.isoformat(),
        "next_change": entry.next_change.isoformat() if entry.next_change else None,
        "deprecated": entry.deprecated,
        "not_metered": entry.unmetered,
    }


def _tier(rates: Rates, long_context: Any) -> dict[str, Any]:
    out: dict[str, Any] = _rates(rates)
    if long_context:
        out["long_context"] = [{"above_input_tokens": lc.above_input_tokens, **_rates(lc.rates)} for lc in long_context]
    return out


def _rates(rates: Rates) -> dict[str, str]:
    return {kind: _text(rate) for kind, rate in zip(KIND_NAMES, rates.as_tuple(), strict=True)}


def _text(value: Decimal) -> str:
    return format(value.normalize(), "f")


def show_text(sheet: dict[str, Any]) -> list[str]:
    entry = sheet["catalog"]
    if entry is None:
        origin = "priced by the config"
    else:
        via = f", from {entry['via']}" if entry["via"] else ""
        name = f' ("{entry["name"]}")' if entry["name"] else ""
        origin = f"{entry['version']}, {sheet['provider']}/{entry['model']}{name}{via}, prices of {entry['as_of']}"
    where = "configured" if sheet["configured"] else "not configured: the catalog's prices, no markup"
    lines = [f"{sheet['model']} ({where}): {origin}"]
    lines.append(f"  context window (max_input_tokens): {sheet['max_input_tokens'] or 'none'}")
    cap = sheet["max_output_tokens"] or "none (the catalog has none: billing.default_max_output_tokens is reserved)"
    lines.append(f"  output cap (max_output_tokens): {cap}")
    lines.append(f"  markup: {sheet['markup_percent']}%")
    lines.append("  USD per 1M tokens (past a long-context threshold, the whole request):")
    for tier, rates in sheet["prices"].items():
        label = "standard (auto, default or none asked)" if tier == "default" else tier
        lines.append(f"    {label}: {_kinds(rates)}")
        for lc in rates.get("long_context", ()):
            lines.append(f"    {label} above {lc['above_input_tokens']} input tokens: {_kinds(lc)}")
    if entry and entry["not_metered"]:
        lines.append("  not metered here: " + ", ".join(f"{k} {v}" for k, v in entry["not_metered"].items()))
    if entry and entry["next_change"]:
        lines.append(
            f"  the catalog changes this price on {entry['next_change']} (applied at the first load from then)"
        )
    if entry and entry["deprecated"]:
        lines.append("  deprecated by its provider")
    return lines


def _kinds(rates: dict[str, Any]) -> str:
    return ", ".join(f"{kind} {rates[kind]}" for kind in KIND_NAMES)


def listing(provider: str) -> dict[str, Any]:
    """A provider's catalog models with their main prices (USD per 1M tokens)."""
    rows: list[dict[str, Any]] = []
    found = prices.models(provider)
    for model_id, entry in found:
        if isinstance(entry, prices.CatalogError):
            rows.append({"model": model_id, "error": str(entry)})
            continue
        standard = price_of(PriceConfig.model_validate(entry.price), Decimal(0)).standard
        rows.append(
            {
                "model": model_id,
                "name": entry.name,
                **{kind: _text(rate) for kind, rate in zip(KIND_NAMES[:3], standard.rates.as_tuple(), strict=False)},
                "max_input_tokens": entry.max_input_tokens,
                "service_tiers": sorted(entry.price.get("service_tiers", {})),
                "long_context": bool(standard.long_context),
                "deprecated": entry.deprecated,
            }
        )
    as_of = next((e.as_of.isoformat() for _, e in found if isinstance(e, prices.Entry)), None)
    return {"catalog": prices.CATALOG, "provider": prices.provider(provider).id, "as_of": as_of, "models": rows}


def listing_text(table: dict[str, Any]) -> list[str]:
    head = ("MODEL", "INPUT", "CACHED", "OUTPUT", "CONTEXT", "TIERS")
    rows = [head]
    for row in table["models"]:
        if "error" in row:
            rows.append((row["model"], "-", "-", "-", "-", "not priced by tokens here"))
            continue
        extras = [*row["service_tiers"], *(["long context"] if row["long_context"] else [])]
        extras += ["deprecated"] if row["deprecated"] else []
        cells = (row["input"], row["cached_input"], row["output"], str(row["max_input_tokens"] or "-"))
        rows.append((row["model"], *cells, ", ".join(extras)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    title = (
        f"{table['catalog']}: provider {table['provider']}, {len(table['models'])} models, "
        f"USD per 1M tokens, prices of {table['as_of']}"
    )
    body = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return [title, *(line.rstrip() for line in body)]
