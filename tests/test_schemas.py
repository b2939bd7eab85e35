"""schemas.py: admin request bodies become validated values or one 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import errors, schemas
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


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def _patterns(node: Any) -> set[str]:
    """The patterns pydantic itself checks: string schemas in a model's core schema."""
    if isinstance(node, dict):
        own = {node["pattern"]} if node.get("type") == "str" and isinstance(node.get("pattern"), str) else set()
        return own | {p for v in node.values() for p in _patterns(v)}
    return {p for v in node for p in _patterns(v)} if isinstance(node, list) else set()


def test_every_pattern_a_request_can_miss_is_said_in_words() -> None:
    """A customer or operator who sends a bad id, cursor or group_by reads what is expected,
    never the regular expression (the console and the usage page show these messages)."""
    used = {p for model in _subclasses(schemas._Request) for p in _patterns(model.__pydantic_core_schema__)}
    assert used and used <= set(schemas.PATTERN_HINTS), used - set(schemas.PATTERN_HINTS)
    for model, query, param in (
        (schemas.UsageQuery, {"group_by": "bogus"}, "group_by"),
        (schemas.GenerationQuery, {"id": "req-1"}, "id"),
        (schemas.LedgerQuery, {"cursor": "zz"}, "cursor"),
        (AccountCreate, {"id": "bad id!"}, "id"),
    ):
        with pytest.raises(errors.InvalidRequest) as caught:
            parse(model, query)
        assert caught.value.param == param and "pattern" not in str(caught.value) and "^" not in str(caught.value)
        assert str(caught.value).startswith(f"Invalid request: {param}: must be ")
