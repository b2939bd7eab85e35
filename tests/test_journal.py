"""The settlement journal on real disk and a real Redis: durable, adopted, idempotent."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy import keyspace, reconcile
from proxy.journal import Journal, pending_on_disk
from proxy.ledger import SettleCall

from .conftest import Running
from .helpers import entries


async def admitted(running: Running, request_id: str) -> SettleCall:
    """A reservation in Redis and the settlement a proxy would have journaled for it."""
    await running.state.ledger.admit(
        "acme", "key_1", "gpt-4o", request_id, prompt_cost=1000, output_cost=0, output_pico=0,
        prompt_tokens=10, max_output_tokens=0, choices=1,
    )  # fmt: skip
    entry = {"model": "gpt-4o", "key_id": "key_1", "usage": {"input_tokens": 10, "output_tokens": 3}}
    return SettleCall("acme", "gpt-4o", request_id, Decimal("55.5"), 13, entry)


async def test_a_dead_proxys_journal_is_adopted_and_replayed_once(
    start_proxy: Any, tmp_path: Path, make_config: Any
) -> None:
    config = make_config()
    running = await start_proxy(config=config)
    await running.account("acme", "10")
    await running.state.redis.hset(keyspace.account("acme", "keys"), "key_1", "active")
    dead = Journal(config.data_dir / "journal")
    dead.open()
    calls = [await admitted(running, f"req_{i}") for i in range(3)]
    for call in calls:
        await dead.append(call)
    await running.state.ledger.settle(calls[0])  # it reached Redis before its reply was lost
    dead._file.write(b'{"account_id": "acme", "mod')  # type: ignore[union-attr]  # killed mid-write
    dead._file.close()  # type: ignore[union-attr]  # the process is gone: its lock with it
    assert pending_on_disk(config.data_dir / "journal") == 4  # three lines and a torn one

    again = await start_proxy(config=config)  # a new proxy on the same data_dir takes it over
    assert again.state.journal is not None and len(again.state.journal) == 0
    usage = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert sorted(e["request_id"] for e in usage) == ["req_0", "req_1", "req_2"]  # req_0 not twice
    view = await running.balance("acme")
    assert view.reserved == 0 and view.balance == 10_000_000 - (56 + 55 + 56)  # 55.5 each, carried
    assert not await reconcile.check_account(running.state.redis, "acme")
    assert pending_on_disk(config.data_dir / "journal") == 0


async def test_a_live_proxys_journal_is_left_alone(tmp_path: Path) -> None:
    first, second = Journal(tmp_path), Journal(tmp_path)
    first.open()
    await first.append(SettleCall("acme", "gpt-4o", "req_1", Decimal(1), 1, {}))
    second.open()  # the first still holds its lock
    assert len(second) == 0 and len(first) == 1
    first.close()
    second.close()
    third = Journal(tmp_path)
    third.open()  # now it is an orphan: adopted
    assert list(third.pending) == ["req_1"]


async def test_a_settlement_redis_refuses_does_not_hold_up_the_others(start_proxy: Any, make_config: Any) -> None:
    config = make_config()
    running = await start_proxy(config=config)
    await running.account("acme", "10")
    await running.state.redis.hset(keyspace.account("acme", "keys"), "key_1", "active")
    journal = running.state.journal
    assert journal is not None
    good = await admitted(running, "req_good")
    poison = SettleCall("acme", "gpt-4o", "req_poison", Decimal("NaN"), 1, {})  # a bug's record, not an outage
    await journal.append(poison)
    await journal.append(good)
    assert await journal.replay(running.state.ledger.settle)  # Redis took what it could
    assert list(journal.pending) == ["req_poison"]  # kept for an operator
    usage = [e for e in await entries(running.state.redis, "acme") if e["type"] == "usage"]
    assert [e["request_id"] for e in usage] == ["req_good"]
