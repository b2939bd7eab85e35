"""schemas.py: admin request bodies become validated values or one 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import errors
from proxy.schemas import AccountCreate, GrantCreate, loads, parse


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount_usd": "0", "kind": "paid"}, "amount_usd"),
        ({"amount_usd": "1.0000001", "kind": "paid"}, "amount_usd"),
        ({"amount_usd": 1.5, "kind": "paid"}, "amount_usd"),  # a float is never money
        ({"amount_usd": "1", "kind": "free"}, "kind"),
        ({"amount_usd": "1", "kind": "paid", "surprise": 1}, "surprise"),
    ],
)
def test_a_bad_grant_is_a_400_naming_its_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        parse(GrantCreate, body)
    assert caught.value.param == param


@pytest.mark.parametrize("metadata", [{"a": 18446744073709551616}, {"a": "\ud800"}])
def test_values_json_cannot_hold_are_a_400_not_a_500(metadata: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidRequest):
        parse(AccountCreate, {"id": "acme", "metadata": metadata})


def test_bodies_keep_numbers_exact_and_must_be_objects() -> None:
    assert str(loads(b'{"amount_usd": 0.1}')["amount_usd"]) == "0.1"  # a Decimal, not 0.1000000000000000055
    assert loads(b"") == {}
    for bad in (b"[1]", b"{", b'{"a": NaN}'):
        with pytest.raises(errors.InvalidRequest):
            loads(bad)
