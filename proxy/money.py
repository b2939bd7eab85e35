"""Money: integer micro-USD inside, decimal strings at every interface.

Prices are USD per 1M tokens, which is exactly micro-USD per token, so a request's
cost is `tokens x price` in micro-USD, computed exactly with `Decimal` and rounded
half-up to a whole micro-USD once per request. A model's price has one set of rates
per service tier, each possibly with long-context rates, and separate audio rates. Reservations round up instead: they
must never be smaller than the charge they stand for. Nothing here touches a float.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation

MICRO = Decimal(1_000_000)
MAX_MICRO = 2**53 - 1  # Lua numbers are doubles: every amount stays exact below 2^53
UNLIMITED_MICRO = 2**52  # "no limit" (an overage without one): still exact, never reached


class LossyAmount(ValueError):
    """An amount that cannot be represented exactly in micro-USD."""


def to_micro(usd: Decimal | str | int) -> int:
    """Parse a USD amount exactly; more than 6 decimals or out of range is an error."""
    if isinstance(usd, float):
        raise TypeError("money must never be a float")
    try:
        value = Decimal(usd) if not isinstance(usd, Decimal) else usd
    except InvalidOperation as exc:
        raise LossyAmount(f"not a decimal amount: {usd!r}") from exc
    if not value.is_finite():
        raise LossyAmount(f"not a finite amount: {usd!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise LossyAmount(f"more precision than 1e-6 USD: {usd!r}")
    if abs(micro) > MAX_MICRO:
        raise LossyAmount(f"amount out of range: {usd!r}")
    return int(micro)


def usd(micro: int) -> str:
    """Format micro-USD as a decimal string with 6 places: 12500000 -> '12.500000'."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def dollars(micro: int) -> str:
    """Micro-USD for a sentence: at least cents, no trailing zeros past them ('1.00', '0.0125')."""
    text = usd(micro)
    return text[: max(text.index(".") + 3, len(text.rstrip("0")))]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as OpenAI reports it: input includes cached and audio input, output
    includes reasoning and audio output. `service_tier` is the tier the upstream says
    it served the request at (None: it did not say)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    service_tier: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, int]:
        out = {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }
        if self.audio_input_tokens:
            out["audio_input_tokens"] = self.audio_input_tokens
        if self.audio_output_tokens:
            out["audio_output_tokens"] = self.audio_output_tokens
        return out


@dataclass(frozen=True, slots=True)
class Rates:
    """Micro-USD per token (= USD per 1M tokens) of each kind, markup applied."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    audio_input: Decimal
    audio_output: Decimal

    def exact_cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        audio_in = min(usage.audio_input_tokens, usage.input_tokens - cached)
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        return (
            (usage.input_tokens - cached - audio_in) * self.input
            + cached * self.cached_input
            + audio_in * self.audio_input
            + (usage.output_tokens - audio_out) * self.output
            + audio_out * self.audio_output
        )

    def describe(self) -> str:
        kinds = ("input", "cached_input", "output", "audio_input", "audio_output")
        return ", ".join(f"{kind} {rate.normalize():f}" for kind, rate in zip(kinds, self.as_tuple(), strict=True))

    def as_tuple(self) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal]:
        return (self.input, self.cached_input, self.output, self.audio_input, self.audio_output)


STANDARD = "default"  # the tier of requests that ask for `auto`, `default` or nothing
STANDARD_NAMES = frozenset({"auto", "default"})


@dataclass(frozen=True, slots=True)
class LongContext:
    """Rates of a request whose input exceeds `above_input_tokens` (the whole request)."""

    above_input_tokens: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class TierPrice:
    """One service tier: its rates, and its long-context rates, lowest threshold first."""

    rates: Rates
    long_context: tuple[LongContext, ...] = ()

    def rates_for(self, input_tokens: int) -> Rates:
        applicable = [lc.rates for lc in self.long_context if input_tokens > lc.above_input_tokens]
        return applicable[-1] if applicable else self.rates

    def worst(self, input_tokens: int) -> Rates:
        """The highest rate of each kind for any input of at most `input_tokens`."""
        return _highest([self.rates, *(lc.rates for lc in self.long_context if input_tokens > lc.above_input_tokens)])


@dataclass(frozen=True, slots=True)
class Price:
    """A model's prices per service tier (`default` always present), markup applied."""

    tiers: tuple[tuple[str, TierPrice], ...]
    # worst() per (tier, long-context band): every reservation asks it, the rates never change
    _worst: dict[tuple[str | None, int], Rates] = field(init=False, compare=False, hash=False, repr=False)
    _thresholds: tuple[int, ...] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        bands = sorted({lc.above_input_tokens for _, tier in self.tiers for lc in tier.long_context})
        object.__setattr__(self, "_thresholds", tuple(bands))
        object.__setattr__(self, "_worst", {})

    @property
    def standard(self) -> TierPrice:
        return self.tier(None)

    @property
    def input(self) -> Decimal:
        return self.standard.rates.input

    @property
    def cached_input(self) -> Decimal:
        return self.standard.rates.cached_input

    @property
    def output(self) -> Decimal:
        return self.standard.rates.output

    def tier(self, name: str | None) -> TierPrice:
        """The tier's prices; `auto`, `default`, None or a tier not configured: standard."""
        wanted = STANDARD if name is None or name in STANDARD_NAMES else name
        found = next((price for tier, price in self.tiers if tier == wanted), None)
        return found or next(price for tier, price in self.tiers if tier == STANDARD)

    def rates(self, usage: Usage, service_tier: str | None = None) -> Rates:
        """The rates of a request: the tier the upstream reported, else the one asked."""
        return self.tier(usage.service_tier or service_tier).rates_for(usage.input_tokens)

    def exact_cost(self, usage: Usage, service_tier: str | None = None) -> Decimal:
        """The exact cost in micro-USD (not rounded)."""
        return self.rates(usage, service_tier).exact_cost(usage)

    def cost(self, usage: Usage, service_tier: str | None = None) -> int:
        """The charge for real usage: exact, rounded half-up to whole micro-USD once."""
        return int(self.exact_cost(usage, service_tier).to_integral_value(rounding=ROUND_HALF_UP))

    def offers(self, service_tier: str) -> bool:
        """Whether a request may ask for this tier: a standard name, or one priced."""
        return service_tier in STANDARD_NAMES or any(service_tier == name for name, _ in self.tiers)

    def worst(self, service_tier: str | None, input_tokens: int) -> Rates:
        """The rates a reservation uses: the highest applicable to an input of at most
        `input_tokens` at the tier asked. A request that names none (or `auto`) is served
        at the upstream project's default tier, which may be any: the dearest of them."""
        tier = None if service_tier is None or service_tier == "auto" else service_tier
        # the same rates for every input between two thresholds (bounded: configured tiers only)
        key = (tier, bisect.bisect_left(self._thresholds, input_tokens))
        rates = self._worst.get(key)
        if rates is None:
            rates = self._worst_uncached(tier, input_tokens)
            if tier is None or self.offers(tier):
                self._worst[key] = rates
        return rates

    def _worst_uncached(self, tier: str | None, input_tokens: int) -> Rates:
        if tier is None:
            return _highest(t.worst(input_tokens) for _, t in self.tiers)
        return self.tier(tier).worst(input_tokens)

    def describe(self) -> list[str]:
        """The effective rates (USD per 1M tokens), one line per tier and context length."""
        lines = []
        for name, tier in self.tiers:
            name = "standard (auto, default or none asked)" if name == STANDARD else name
            lines.append(f"{name}: {tier.rates.describe()}")
            lines += [
                f"{name} above {lc.above_input_tokens} input tokens: {lc.rates.describe()}" for lc in tier.long_context
            ]
        return lines


def _highest(candidates: Iterable[Rates]) -> Rates:
    """The highest rate of each kind among `candidates`."""
    return Rates(*(max(kind) for kind in zip(*(r.as_tuple() for r in candidates), strict=True)))


def ceil_micro(value: Decimal) -> int:
    """Round up to whole micro-USD: what a reservation needs."""
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def pico(rate: Decimal) -> int:
    """A per-token rate in pico-USD, rounded up, for the Lua clamp arithmetic."""
    return ceil_micro(rate * MICRO)


# Sub-micro-USD remainders are carried per account in fine units of 1e-15 micro-USD
# (lua/lib/charges.lua charge): 15 places more than a micro-USD, still exact in a Lua double.
FINE = 10**15


def split_exact(micro: Decimal) -> tuple[int, int]:
    """An exact cost in micro-USD as (whole micro-USD, fraction in FINE units): the form
    settlement sends to Redis, which rounds it with the account's carried remainder."""
    fine = int((micro * FINE).to_integral_value(rounding=ROUND_HALF_UP))
    return divmod(fine, FINE)


def exact_usd(whole: int, fine: int) -> str:
    """An exact cost kept as (micro-USD, FINE units) as a plain decimal USD string."""
    value = (Decimal(whole) * FINE + fine) / (MICRO * FINE)
    return format(value.normalize(), "f") if value else "0"
