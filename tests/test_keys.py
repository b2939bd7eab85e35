"""keys.py: API keys are shown once, stored only as a hash, and read from a bearer header."""

from __future__ import annotations

import hashlib

import pytest

from proxy import errors
from proxy.keys import KEY_PREFIX, KeyRecord, bearer, hash_key, new_key


def test_a_new_key_is_random_and_only_its_hash_is_kept() -> None:
    (id_a, key_a), (id_b, key_b) = new_key(), new_key()
    assert key_a.startswith(KEY_PREFIX) and len(key_a) > 40 and key_a != key_b and id_a != id_b
    assert hash_key(key_a) == hashlib.sha256(key_a.encode()).hexdigest() and key_a not in hash_key(key_a)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer sk-ünïcode"])
def test_a_missing_or_odd_bearer_is_an_invalid_key(header: str | None) -> None:
    with pytest.raises(errors.InvalidApiKey):
        bearer(header)


def test_a_key_record_allows_its_models_only() -> None:
    record = KeyRecord.from_json(b'{"key_id": "k", "account_id": "a", "allowed_models": ["gpt-4o"]}')
    assert record.allows("gpt-4o") and not record.allows("o3")
    assert KeyRecord.from_json(b'{"key_id": "k", "account_id": "a"}').allows("anything")
