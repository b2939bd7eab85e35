"""The price catalog: `price: catalog` models priced from the pinned `genai-prices`
package (pydantic's maintained price database), as our config's price fields.

Only the data bundled in the installed package is read: genai-prices can fetch newer
prices over HTTP (`UpdatePrices`), which this module never starts, so a price changes
only when the pin in pyproject.toml does. Prices are the catalog's on the UTC date the
config is loaded (a price the catalog dates later applies from the first load on or
after that date).

Mapping (genai-prices key -> ours, USD per 1M tokens): input_mtok -> input,
cache_read_mtok -> cached_input, output_mtok -> output, input_audio_mtok ->
audio_input, output_audio_mtok -> audio_output; `service_tier` variants `priority` and
`flex` -> `service_tiers`; tiered prices (a whole request past a prompt size) ->
`long_context`; `context_window` -> `max_input_tokens` (not an embedding model's: it
bounds each input of a batch). The catalog has no output cap.
What else it prices (cache writes, web searches, per-request fees, images) this proxy
cannot meter: `Entry.unmetered` names it, and `config check` and `prices show` print it.
Time-of-day prices (DeepSeek's peak and off-peak) are charged at the dearest of them.
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package is imported only when a catalog is looked up
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

CATALOG = f"genai-prices {version('genai-prices')}"  # what a ledger entry names as its price source
DEFAULT_PROVIDER = "openai"
# our price field -> genai-prices' price key (USD per 1M tokens)
KINDS = (
    ("input", "input_mtok"),
    ("cached_input", "cache_read_mtok"),
    ("output", "output_mtok"),
    ("audio_input", "input_audio_mtok"),
    ("audio_output", "output_audio_mtok"),
)
# genai-prices prices an unpriced kind as its parent kind (output unpriced: free)
PARENT = {"cached_input": "input", "audio_input": "input", "audio_output": "output"}
TIERS = ("priority", "flex")  # the catalog's `service_tier` variants that are OpenAI's tiers too
SET_IT = "set its price in the config"

PLACES = Decimal("0.000001")  # a config price has at most 6 decimal places (USD per 1M tokens)

Loc = tuple[str | int, ...]


class CatalogError(ValueError):
    """A model or provider the catalog cannot price; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalog model as our config takes it."""

    provider: str  # the provider asked for
    model_id: str  # the catalog's id of the model that matched
    name: str | None
    price: dict[str, Any]  # `price:` fields (decimal strings, USD per 1M tokens), source included
    max_input_tokens: int | None  # the catalog's context window (None for an embedding model)
    as_of: date  # the UTC date whose prices these are
    unmetered: dict[str, str] = field(default_factory=dict)  # price key -> price, not metered here
    via: str | None = None  # the provider whose model it is, when the asked one falls back to it
    deprecated: bool = False
    next_change: date | None = None  # the catalog's next dated price change of this model


# -- the bundled snapshot -----------------------------------------------------------


@functools.cache
def snapshot() -> DataSnapshot:
    """The package's bundled data: never a fetched update (`from_auto_update=False`)."""
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


def provider(provider_id: str) -> Provider:
    from genai_prices.data_snapshot import find_provider_by_id

    found = find_provider_by_id(snapshot().providers, provider_id)
    if found is None:
        ids = [p.id for p in snapshot().providers]
        raise CatalogError(
            f"unknown provider {provider_id!r} in {CATALOG} ({_closest(provider_id, ids, everything=True)})"
        )
    return found


def _closest(name: str, known: list[str], everything: bool = False) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    if close:
        return "closest: " + ", ".join(close)
    return "known: " + ", ".join(sorted(known)) if everything else "no close match"


# -- looking a model up -------------------------------------------------------------


def lookup(ref: str, provider_id: str = DEFAULT_PROVIDER, on: date | None = None) -> Entry:
    """The catalog's entry for `ref` under `provider_id`, priced as of `on` (default today, UTC)."""
    return _lookup(ref, provider_id, on or datetime.now(UTC).date())


@functools.lru_cache(maxsize=1024)
def _lookup(ref: str, provider_id: str, on: date) -> Entry:
    owner = provider(provider_id)
    try:
        _, info = snapshot().find_provider_model(ref, owner, None, None)
    except LookupError:
        ids = [m.id for p in _searched(owner) for m in p.models]
        raise CatalogError(
            f"{CATALOG} has no model {ref!r} under provider {owner.id!r} ({_closest(ref, ids)}; "
            f"`metering-proxy prices list --provider {owner.id}` lists them)"
        ) from None
    via = None if any(m is info for m in owner.models) else _owner_of(info)
    return _entry(info, owner.id, via, on)


def _searched(owner: Provider) -> list[Provider]:
    by_id = {p.id: p for p in snapshot().providers}
    return [owner, *(by_id[i] for i in owner.fallback_model_providers or () if i in by_id)]


def _owner_of(info: ModelInfo) -> str | None:
    return next((p.id for p in snapshot().providers if any(m is info for m in p.models)), None)


def _entry(info: ModelInfo, provider_id: str, via: str | None, on: date) -> Entry:
    at = datetime(on.year, on.month, on.day, tzinfo=UTC)
    base = _dearest(info, _candidates(info, at))
    if _plain(base, "input_mtok") is None:
        priced = ", ".join(k for k, v in vars(base).items() if v is not None)
        name = f"{provider_id}/{info.id}"
        what = f"prices {name} by {priced}, not by input tokens" if priced else f"has no price for {name}"
        raise CatalogError(f"{CATALOG} {what}: {SET_IT}")
    price: dict[str, Any] = {"source": "catalog"}
    price.update((ours, _text(_plain(base, key))) for ours, key in KINDS if _plain(base, key) is not None)
    cuts = _thresholds(base)
    if cuts:
        price["long_context"] = _long_context(base, cuts)
    # genai-prices applies no variant to a model another provider lends (its calc_price)
    tiers = {} if via else {tier: _tier(variant, cuts) for tier in TIERS if (variant := _variant(info, base, tier, at))}
    if tiers:
        price["service_tiers"] = tiers
    _check_precision(info.id, price)
    return Entry(
        provider=provider_id,
        model_id=info.id,
        name=info.name,
        price=price,
        # an embedding model's window (the catalog prices it no output) bounds each of up to
        # 2,048 inputs, not a request, whose prompt is their sum: it is no max_input_tokens
        max_input_tokens=info.context_window if "output" in price else None,
        as_of=on,
        unmetered=_unmetered(base),
        via=via,
        deprecated=bool(info.deprecated),
        next_change=_next_change(info, on),
    )


def _candidates(info: ModelInfo, at: datetime) -> list[ModelPrice]:
    """The prices that may apply on `at`'s date: the dated one in force, and any that
    apply at some time of day (they win over it while they apply)."""
    from genai_prices.types import ModelPrice, TimeOfDateConstraint

    if isinstance(info.prices, ModelPrice):
        return [info.prices]
    daily: list[ModelPrice] = []
    for conditional in reversed(info.prices):  # genai-prices: the last price in force wins
        if isinstance(conditional.constraint, TimeOfDateConstraint):
            daily.append(conditional.prices)
        elif conditional.constraint is None or conditional.constraint.active(at):
            return [conditional.prices, *daily]
    return [info.prices[0].prices, *daily]


def _dearest(info: ModelInfo, candidates: list[ModelPrice]) -> ModelPrice:
    """One price per kind, the highest of the candidates: a price by time of day is
    charged at the dearest hour, never below the catalog's price at any hour."""
    from genai_prices.types import ModelPrice

    if len(candidates) == 1:
        return candidates[0]
    keys = [frozenset(k for k, v in vars(c).items() if v is not None) for c in candidates]
    values = [v for c in candidates for v in vars(c).values() if v is not None]
    if len(set(keys)) > 1 or not all(isinstance(v, Decimal) for v in values):
        raise CatalogError(f"{CATALOG} prices {info.id} by time of day in a way one price cannot hold: {SET_IT}")
    return ModelPrice(**{k: max(vars(c)[k] for c in candidates) for k in keys[0]})


def _variant(info: ModelInfo, base: ModelPrice, tier: str, at: datetime) -> ModelPrice | None:
    """`base` with the tier's variant applied (genai-prices' get_prices), None if the
    catalog has no price of its own for that tier on that date."""
    overrides: dict[str, Any] = {}
    for variant in info.price_variants or ():
        if variant.when == {"service_tier": tier} and (variant.constraint is None or variant.constraint.active(at)):
            for key, value in vars(variant.prices).items():
                if value is not None:
                    overrides.setdefault(key, value)
    if not overrides:
        return None
    resolved = copy.copy(base)
    vars(resolved).update(overrides)
    return resolved


def _tier(prices: ModelPrice, base_cuts: list[int]) -> dict[str, Any]:
    """A service tier's prices, every kind spelled out: the catalog derives a tier's
    missing kind from that tier's parent kind, our config from the base price."""
    tier: dict[str, Any] = _effective(prices, 0)
    cuts = sorted(set(base_cuts) | set(_thresholds(prices)))
    if cuts:
        tier["long_context"] = _long_context(prices, cuts)
    return tier


def _long_context(prices: ModelPrice, cuts: Iterable[int]) -> list[dict[str, Any]]:
    # the catalog's tiers are cliffs on the whole input, like ours: past `start`, all of it
    return [{"above_input_tokens": cut, **_effective(prices, cut + 1)} for cut in cuts]


def _effective(prices: ModelPrice, input_tokens: int) -> dict[str, str]:
    """Every kind's price for a request of `input_tokens`, unpriced kinds at their parent's."""
    found = {ours: _at(vars(prices).get(key), input_tokens) for ours, key in KINDS}
    found["output"] = found["output"] if found["output"] is not None else Decimal(0)
    for kind, parent in PARENT.items():
        if found[kind] is None:
            found[kind] = found[parent]
    return {kind: _text(value) for kind, value in found.items() if value is not None}


def _check_precision(model_id: str, fields: Mapping[str, Any]) -> None:
    """Our prices are whole pico-USD per token; a catalog figure finer than that is a
    float's residue in its data (0.18000000000000002), not a price to round silently."""
    for key, value in fields.items():
        nested = [value] if isinstance(value, Mapping) else value if isinstance(value, list) else []
        for item in nested:
            _check_precision(model_id, item)
        if key != "source" and isinstance(value, str) and Decimal(value) != Decimal(value).quantize(PLACES):
            raise CatalogError(f"{CATALOG} prices {model_id} at {value}, finer than 1e-6 USD per 1M tokens: {SET_IT}")


def _thresholds(prices: ModelPrice) -> list[int]:
    from genai_prices.types import TieredPrices

    tiered = (vars(prices).get(key) for _, key in KINDS)
    return sorted({t.start for v in tiered if isinstance(v, TieredPrices) for t in v.tiers})


def _at(value: Decimal | TieredPrices | None, input_tokens: int) -> Decimal | None:
    """A price for a request of `input_tokens` (genai-prices' calc_unit_price)."""
    if value is None or isinstance(value, Decimal):
        return value
    return next((t.price for t in reversed(value.tiers) if input_tokens > t.start), value.base)


def _plain(prices: ModelPrice, key: str) -> Decimal | None:
    """A kind's price below every long-context threshold."""
    return _at(vars(prices).get(key), 0)


def _text(value: Decimal | None) -> str:
    return format(value, "f") if value is not None else ""


def _unmetered(prices: ModelPrice) -> dict[str, str]:
    """What the catalog prices that this proxy's usage (OpenAI's) cannot count."""
    ours = {key for _, key in KINDS}
    if vars(prices).get("cache_audio_read_mtok") == vars(prices).get("cache_read_mtok"):
        ours.add("cache_audio_read_mtok")  # cached audio is charged at cached_input: the same
    return {k: _text(_plain(prices, k)) for k, v in vars(prices).items() if v is not None and k not in ours}


def _next_change(info: ModelInfo, on: date) -> date | None:
    from genai_prices.types import StartDateConstraint

    conditionals = info.prices if isinstance(info.prices, list) else []
    variants = [v for v in info.price_variants or () if v.when in ({"service_tier": t} for t in TIERS)]
    constraints = [c.constraint for c in conditionals] + [v.constraint for v in variants]
    starts = [c.start_date for c in constraints if isinstance(c, StartDateConstraint) and c.start_date > on]
    return min(starts, default=None)


def models(provider_id: str = DEFAULT_PROVIDER, on: date | None = None) -> list[tuple[str, Entry | CatalogError]]:
    """Every model of a provider (not those it lends from others) by catalog id, as
    `lookup` gives it, or why it cannot be priced here."""
    owner = provider(provider_id)
    on = on or datetime.now(UTC).date()
    found: list[tuple[str, Entry | CatalogError]] = []
    for info in owner.models:
        try:
            found.append((info.id, _entry(info, owner.id, None, on)))
        except CatalogError as exc:
            found.append((info.id, exc))
    return found


# -- filling a raw config -----------------------------------------------------------


def wants_catalog(price: Any) -> bool:
    return price == "catalog" or (isinstance(price, Mapping) and price.get("source") == "catalog")


def resolve(data: Any) -> tuple[Any, list[tuple[Loc, str]]]:
    """Raw config data with every `price: catalog` model's prices (and, unless the YAML
    sets it, `max_input_tokens`) filled from the catalog, the YAML's own price fields
    over them; and the problems, located. `data` itself is not changed."""
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
        return data, []
    upstreams = data["upstreams"] if isinstance(data.get("upstreams"), Mapping) else {}
    errors: list[tuple[Loc, str]] = []
    providers: dict[str, str | None] = {}  # upstream -> provider id (None: unknown)
    for name, upstream in upstreams.items():
        chosen = upstream.get("provider") if isinstance(upstream, Mapping) else None
        chosen = chosen.strip() if isinstance(chosen, str) and chosen.strip() else DEFAULT_PROVIDER
        providers[str(name).strip()] = chosen
        if chosen != DEFAULT_PROVIDER:
            try:
                provider(chosen)
            except CatalogError as exc:
                errors.append((("upstreams", name, "provider"), str(exc)))
                providers[str(name).strip()] = None
    models = dict(data["models"])
    for name, model in models.items():
        if not isinstance(model, Mapping):
            continue
        if isinstance(model.get("price"), str) and not wants_catalog(model["price"]):
            errors.append((("models", name, "price"), "must be a mapping of prices, or `catalog`"))
        elif wants_catalog(model.get("price")) and isinstance(model.get("upstream"), str):
            upstream = model["upstream"].strip()  # as validated: Text is stripped
            provider_id = providers.get(upstream, DEFAULT_PROVIDER)  # an unknown upstream is a reference error
            try:
                if provider_id is None:
                    raise CatalogError(f"not priced from the catalog: upstream {upstream!r} has an unknown provider")
                models[name] = _filled(name, model, provider_id)
            except CatalogError as exc:
                errors.append((("models", name, "price"), str(exc)))
    return {**data, "models": models}, errors


def _filled(name: str, model: Mapping[str, Any], provider_id: str) -> dict[str, Any]:
    ref = model.get("upstream_model")
    entry = lookup(ref if isinstance(ref, str) and ref.strip() else name, provider_id)  # as Config.upstream_model
    overrides = model["price"] if isinstance(model["price"], Mapping) else {}
    filled = {**model, "price": merge(entry.price, overrides)}
    if model.get("max_input_tokens") in (None, "") and entry.max_input_tokens:
        filled["max_input_tokens"] = entry.max_input_tokens
    return filled


def merge(catalog: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML's fields over the catalog's, mapping by mapping; a list (`long_context`)
    is replaced whole; `null` removes the catalog's (a tier no longer offered, a kind
    back at its default)."""
    out = copy.deepcopy(dict(catalog))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
