"""money.py: exact micro-USD amounts, rates per token kind, and the exact costs that
settlement rounds with the account's carried remainder."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.money import (
    FINE,
    STANDARD,
    LongContext,
    LossyAmount,
    Price,
    Rates,
    TierPrice,
    Usage,
    exact_usd,
    split_exact,
    to_micro,
    usd,
)


def test_money_strings_are_exact() -> None:
    assert usd(to_micro("12.5")) == "12.500000" and usd(-1) == "-0.000001"
    with pytest.raises(LossyAmount):
        to_micro("0.0000001")
    with pytest.raises(TypeError):
        to_micro(0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exact", "whole", "fine"),
    [
        (Decimal("0.2"), 0, 2 * 10**14),
        (Decimal("75"), 75, 0),
        (Decimal("19.5"), 19, 5 * 10**14),
        (Decimal("0.0000000000000004"), 0, 0),  # below 1e-15 micro-USD, half down
        (Decimal("0.0000000000000005"), 0, 1),  # half up
    ],
)
def test_an_exact_cost_splits_into_whole_micro_usd_and_fine_units(exact: Decimal, whole: int, fine: int) -> None:
    assert split_exact(exact) == (whole, fine)
    assert 0 <= fine < FINE


def test_exact_costs_print_as_plain_usd() -> None:
    assert exact_usd(*split_exact(Decimal("0.2"))) == "0.0000002"
    assert exact_usd(2070, 0) == "0.00207" and exact_usd(0, 0) == "0"


RATES = Rates(Decimal("2.5"), Decimal("1.25"), Decimal("10"), Decimal("40"), Decimal("80"))


def test_each_kind_of_token_is_priced_once() -> None:
    # 1000 in (400 cached, 100 audio), 50 out (20 audio): cached and audio are part of input
    usage = Usage(1000, 400, 50, 0, audio_input_tokens=100, audio_output_tokens=20)
    assert RATES.exact_cost(usage) == 500 * Decimal("2.5") + 400 * Decimal("1.25") + 100 * 40 + 30 * 10 + 20 * 80


def test_a_request_that_names_no_tier_is_reserved_at_the_dearest() -> None:
    priority = Rates(*(r * 2 for r in RATES.as_tuple()))
    price = Price(((STANDARD, TierPrice(RATES)), ("priority", TierPrice(priority))))
    assert price.worst(None, 10).input == price.worst("auto", 10).input == Decimal(5)
    assert price.worst("default", 10).input == Decimal("2.5")
    assert price.offers("priority") and price.offers("auto") and not price.offers("flex")
    # charged at the tier the upstream reports, else the one asked
    assert price.cost(Usage(1000, service_tier="priority"), "default") == 5000
    assert price.cost(Usage(1000), "priority") == 5000 and price.cost(Usage(1000)) == 2500


def test_reservation_rates_are_the_same_when_remembered() -> None:
    # tiers with long-context rates at different thresholds: asked in any order, each
    # answer equals a fresh price's first (unremembered) answer, at and around every threshold
    def scaled(factor: int) -> Rates:
        return Rates(*(r * factor for r in RATES.as_tuple()))

    def price() -> Price:
        standard = TierPrice(RATES, (LongContext(1000, scaled(2)), LongContext(5000, scaled(3))))
        priority = TierPrice(scaled(2), (LongContext(2000, scaled(5)),))
        return Price(((STANDARD, standard), ("priority", priority)))

    remembered = price()
    sizes = (0, 999, 1000, 1001, 2000, 2001, 4999, 5000, 5001)
    asks = [(tier, n) for n in sizes for tier in (None, "priority", "flex")]
    for tier, n in asks + asks[::-1]:
        assert remembered.worst(tier, n) == price().worst(tier, n), (tier, n)
    assert remembered.worst(None, 1500).input == 2 * RATES.input
    assert remembered.worst(None, 2500).input == 5 * RATES.input
    assert remembered == price()  # what it remembers is no part of its value
