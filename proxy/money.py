"""Money: integer micro-USD inside, decimal strings at every interface.

Prices are USD per 1M tokens, which is exactly micro-USD per token, so a request's
cost is `tokens x price` in micro-USD, computed exactly with `Decimal` and rounded
half-up to a whole micro-USD once per request. Reservations round up instead: they
must never be smaller than the charge they stand for. Nothing here touches a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation

MICRO = Decimal(1_000_000)
MAX_MICRO = 2**53 - 1  # Lua numbers are doubles: every amount stays exact below 2^53


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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as OpenAI reports it: input includes cached, output includes reasoning."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-USD per token (= USD per 1M tokens), markup already applied."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    @classmethod
    def from_config(
        cls, input: Decimal, cached_input: Decimal | None, output: Decimal | None, markup_percent: Decimal
    ) -> Price:
        factor = 1 + markup_percent / 100
        return cls(
            input=input * factor,
            cached_input=(input if cached_input is None else cached_input) * factor,
            output=(output or Decimal(0)) * factor,
        )

    def exact_cost(self, usage: Usage) -> Decimal:
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        return (
            (usage.input_tokens - cached) * self.input + cached * self.cached_input + usage.output_tokens * self.output
        )

    def cost(self, usage: Usage) -> int:
        """The charge for real usage: exact, rounded half-up to whole micro-USD once."""
        return int(self.exact_cost(usage).to_integral_value(rounding=ROUND_HALF_UP))

    def prompt_reserve(self, prompt_tokens: int) -> int:
        """Worst case for the prompt: every token uncached, rounded up."""
        return _ceil(prompt_tokens * self.input)

    def output_reserve(self, output_tokens: int) -> int:
        return _ceil(output_tokens * self.output)

    @property
    def output_pico(self) -> int:
        """Output price per token in pico-USD, rounded up, for the Lua clamp arithmetic."""
        return _ceil(self.output * MICRO)


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


# Sub-micro-USD remainders are carried per account in fine units of 1e-15 micro-USD
# (lua/lib.lua charge): 15 places more than a micro-USD, still exact in a Lua double.
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
