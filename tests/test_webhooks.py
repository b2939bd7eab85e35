"""Webhooks end to end: Lua events -> Redis outbox -> worker -> a real aiohttp receiver
that checks every signature with `verify`. The background worker is paused; tests
drive a Worker of their own with `tick()`, and retries are made due at once by an
injected zero backoff (or by moving `ledger.clock_offset_ms`)."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

from proxy import keyspace, webhooks
from proxy.cli import main as cli_main
from proxy.embedded import EmbeddedRedis
from proxy.ledger import GrantSpec
from proxy.money import to_micro
from proxy.testing.upstream import DemoUpstream
from proxy.webhooks import Webhooks, body_of, full_jitter, list_dead, replay_dead, sign, verify
from proxy.worker import Worker

from .conftest import BASE_CONFIG, Running, deep_merge
from .helpers import Receiver, hook_config, new_secret, pause_background_worker

StartProxy = Callable[..., Awaitable[Running]]


async def start_hooked(start_proxy: StartProxy, receiver: Receiver, **overrides: Any) -> Running:
    running = await start_proxy(hook_config(receiver, **overrides))
    await pause_background_worker(running)
    return running


@pytest.fixture
async def make_worker() -> AsyncIterator[Callable[..., Worker]]:
    made: list[Webhooks] = []

    def make(running: Running, backoff: Callable[[int], int] = lambda tries: 0) -> Worker:
        hooks = Webhooks(running.state, backoff=backoff)
        made.append(hooks)
        return Worker(running.state.ledger, hooks.deliver)

    yield make
    for hooks in made:
        await hooks.close()


async def funded_and_drained(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> tuple[Running, Worker, str]:
    """A hooked proxy, its worker, and a key of "acme" funded with $10, its
    `credits.granted` event already delivered."""
    running = await start_hooked(start_proxy, receiver)
    worker = make_worker(running)
    key = await running.account("acme", "10")
    await drain(worker, running)
    return running, worker, key


async def outbox(running: Running, account_id: str = "acme") -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in await running.state.redis.lrange(keyspace.outbox(account_id), 0, -1)]


async def drain(worker: Worker, running: Running, account_id: str = "acme", max_ticks: int = 10) -> None:
    """Tick until the account's outbox is empty (each tick awaits its deliveries)."""
    for _ in range(max_ticks):
        await worker.tick()
        if not await running.state.redis.llen(keyspace.outbox(account_id)):
            return
    raise AssertionError(f"outbox not drained in {max_ticks} ticks: {await outbox(running, account_id)}")


async def spend(running: Running, upstream: DemoUpstream, key: str, prompt_tokens: int) -> None:
    """One gpt-4o request costing prompt_tokens * 2.5 + 10 micro-USD (1 output token)."""
    upstream.fault.prompt_tokens = prompt_tokens
    await running.client(key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )


def deliveries(event: str, outcome: str) -> float:
    labels = {"event": event, "outcome": outcome}
    return REGISTRY.get_sample_value("metering_proxy_webhook_deliveries_total", labels) or 0.0


# -- signing and bodies (no network) ----------------------------------------------------


def test_sign_matches_the_standard_webhooks_vector() -> None:
    # the published test vector of the Standard Webhooks reference libraries
    secret, msg_id, stamp = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = '{"test": 2432232314}'
    signature = sign(secret, msg_id, stamp, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"Webhook-Id": msg_id, "Webhook-Timestamp": str(stamp), "Webhook-Signature": signature}
    assert verify(secret, headers, body, tolerance_s=10**10)
    assert not verify(secret, headers, body)  # five years old: outside the default 300 s


def test_verify_rejects_what_it_should() -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    now, body = int(time.time()), b'{"type":"x"}'
    good = {"webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": sign(secret, "evt_1", now, body)}
    assert verify(secret, good, body)
    assert verify(secret, {**good, "webhook-signature": "v1,bogus " + good["webhook-signature"]}, body)
    assert not verify(secret, good, body + b" ")
    assert not verify(secret, {**good, "webhook-id": "evt_2"}, body)
    assert not verify("whsec_" + base64.b64encode(os.urandom(24)).decode(), good, body)
    assert not verify(secret, {**good, "webhook-signature": "v2," + good["webhook-signature"][3:]}, body)
    assert not verify(secret, {**good, "webhook-timestamp": "soon"}, body)
    assert not verify(secret, {k: v for k, v in good.items() if k != "webhook-id"}, body)
    stale = now - 301
    assert not verify(secret, {**good, "webhook-timestamp": str(stale),
                               "webhook-signature": sign(secret, "evt_1", stale, body)}, body)  # fmt: skip


async def test_rotation_signs_with_every_secret_and_either_verifies(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    """Mid-rotation a delivery carries one signature per secret: a receiver still on the
    old secret and one already on the new both verify it (standardwebhooks as the oracle)."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    old = new_secret()
    running = await start_hooked(start_proxy, receiver, previous_secrets=[old])  # receiver.secret is the new one
    await running.account("acme", "10")
    await drain(make_worker(running), running)
    [attempt] = receiver.attempts
    assert len(attempt.headers["webhook-signature"].split()) == 2
    for secret in (receiver.secret, old):
        assert Webhook(secret).verify(attempt.raw, attempt.headers)["type"] == "credits.granted"
        assert verify(secret, attempt.headers, attempt.raw)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(attempt.raw, attempt.headers)
    with pytest.raises(WebhookVerificationError):  # the signatures are over this exact body
        Webhook(old).verify(attempt.raw + b" ", attempt.headers)


async def test_one_secret_gives_one_signature_the_oracle_verifies(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    from standardwebhooks.webhooks import Webhook

    running = await start_hooked(start_proxy, receiver)
    await running.account("acme", "10")
    await drain(make_worker(running), running)
    [attempt] = receiver.attempts
    assert " " not in attempt.headers["webhook-signature"]
    assert Webhook(receiver.secret).verify(attempt.raw, attempt.headers)["data"]["account_id"] == "acme"


def test_body_prints_usd_fields_as_decimal_strings() -> None:
    data = {"account_id": "a", "overage_usd": "5000000", "invoice_every_usd": "-1500000", "kind": "paid"}
    event = {"id": "evt_a_1", "type": "overage.invoice_threshold", "ts": 1700000000000, "tries": 0, "data": data}
    assert orjson.loads(body_of(event)) == {
        "type": "overage.invoice_threshold",
        "timestamp": "2023-11-14T22:13:20.000Z",
        "data": {"account_id": "a", "overage_usd": "5.000000", "invoice_every_usd": "-1.500000", "kind": "paid"},
    }


def test_full_jitter_stays_within_its_exponential_ceiling() -> None:
    for tries in range(1, 40):
        ceiling = min(3_600_000, 1000 * 2 ** (tries - 1))
        assert all(0 <= full_jitter(tries) <= ceiling for _ in range(50))


# -- delivery ---------------------------------------------------------------------------


async def test_credits_granted_is_delivered_signed(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    running = await start_hooked(start_proxy, receiver)
    worker = make_worker(running)
    before = deliveries("credits.granted", "success")
    await running.account("acme", "10")
    [event] = await outbox(running)
    await drain(worker, running)
    assert receiver.bad_signatures == 0
    [attempt] = receiver.attempts
    assert attempt.headers["Content-Type"] == "application/json"
    assert attempt.headers["webhook-id"] == event["id"]
    assert abs(int(attempt.headers["webhook-timestamp"]) - time.time()) < 60
    assert attempt.body["type"] == "credits.granted"
    assert attempt.body["timestamp"].endswith("Z")
    data = attempt.body["data"]
    assert data["account_id"] == "acme" and data["amount_usd"] == "10.000000" and data["kind"] == "paid"
    assert data["grant_id"].startswith("grant_")
    assert deliveries("credits.granted", "success") == before + 1
    # nothing left: the watch pointer is gone and so is the lease
    assert await running.state.redis.zscore(keyspace.watch_shard("acme"), "acme") is None
    assert not await running.state.redis.exists(keyspace.delivery_lease("acme"))


async def test_low_balance_fires_once_per_threshold_and_rearms(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], upstream: DemoUpstream
) -> None:
    running, worker, key = await funded_and_drained(start_proxy, receiver, make_worker)

    await spend(running, upstream, key, 2_200_000)  # 10 -> 4.499990: crosses 5
    assert [e["type"] for e in await outbox(running)] == ["credit_balance.low"]
    await drain(worker, running)
    await spend(running, upstream, key, 200_000)  # -> 3.999980: crosses nothing
    assert await outbox(running) == []
    await spend(running, upstream, key, 1_200_000)  # -> 0.999970: crosses 1
    await drain(worker, running)
    await running.fund("acme", "10")  # -> 10.999970: above both, re-armed
    await drain(worker, running)
    await spend(running, upstream, key, 2_400_000)  # -> 4.999960: crosses 5 again
    await drain(worker, running)

    got = [(b["type"], b["data"].get("threshold_usd"), b["data"].get("balance_usd")) for b in receiver.delivered()]
    assert got == [
        ("credits.granted", None, None),
        ("credit_balance.low", "5.000000", "4.499990"),
        ("credit_balance.low", "1.000000", "0.999970"),
        ("credits.granted", None, None),
        ("credit_balance.low", "5.000000", "4.999960"),
    ]
    assert all(b["data"]["account_id"] == "acme" for b in receiver.delivered())
    assert len({a.headers["webhook-id"] for a in receiver.attempts}) == 5


async def test_no_event_for_a_change_that_crosses_nothing(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], upstream: DemoUpstream
) -> None:
    running, worker, key = await funded_and_drained(start_proxy, receiver, make_worker)
    await spend(running, upstream, key, 400_000)  # 10 -> 8.999990
    await running.balance("acme")  # a balance read also runs the event checks
    assert await outbox(running) == []
    await worker.tick()
    assert [b["type"] for b in receiver.delivered()] == ["credits.granted"]


async def test_auto_topup_is_granted_exactly_once_despite_redelivery(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver)
    worker = make_worker(running)
    ledger = running.state.ledger
    key = await running.account("acme", "10")
    await drain(worker, running)
    await ledger.save_account("acme", {"auto_topup": '{"threshold": "5000000", "amount": "10000000"}'}, create=False)
    requests_seen = 0

    async def billing(body: dict[str, Any]) -> int | None:
        """The operator's billing: charge, grant with the event's key, answer 500 the first time."""
        nonlocal requests_seen
        if body["type"] != "auto_topup.requested":
            return None
        idem = body["data"]["idempotency_key"]
        amount = str(to_micro(body["data"]["amount_usd"]))
        await ledger.grant("acme", GrantSpec("paid", int(amount), idem=idem, description="top-up", id=f"grant_{idem}"))
        requests_seen += 1
        return 500 if requests_seen == 1 else None

    receiver.on_event = billing
    await spend(running, upstream, key, 2_200_000)  # 10 -> 4.499990: below the 5 USD threshold
    assert [e["type"] for e in await outbox(running)] == ["credit_balance.low", "auto_topup.requested"]
    await drain(worker, running)

    requested = [a for a in receiver.attempts if a.body["type"] == "auto_topup.requested"]
    assert [a.status for a in requested] == [500, 204]
    assert requested[0].headers["webhook-id"] == requested[1].headers["webhook-id"]  # the same event, twice
    assert requested[0].body == requested[1].body
    assert requested[0].body["data"]["amount_usd"] == "10.000000"
    assert requested[0].body["data"]["idempotency_key"] == "topup_acme_1"
    granted = receiver.delivered("credits.granted")
    assert len(granted) == 2 and granted[1]["data"]["amount_usd"] == "10.000000"  # the account's, the top-up's
    view = await running.balance("acme")
    assert view.balance == 14_499_990  # recovered exactly once
    assert "topup_pending" not in view.fields
    assert await outbox(running) == []


async def test_delivery_survives_a_proxy_restart(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    await receiver.stop()  # the operator's endpoint is down
    first = await start_hooked(start_proxy, receiver)
    await first.account("acme", "10")
    await make_worker(first).tick()
    [pending] = await outbox(first)
    assert pending["tries"] == 1 and pending["error"] == "ClientConnectorError"
    await first.proxy.stop()

    await receiver.start()  # back, on the same port
    second = await start_proxy(hook_config(receiver))  # its own background worker delivers
    deadline = time.monotonic() + 10
    while (await outbox(second) or not receiver.attempts) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # bounded polling of Redis state; the worker ticks every second
    assert await outbox(second) == []
    [attempt] = receiver.attempts
    assert attempt.status == 204 and attempt.headers["webhook-id"] == pending["id"]
    assert attempt.body["type"] == "credits.granted"


async def test_dead_letter_after_max_attempts_then_replay(
    start_proxy: StartProxy,
    receiver: Receiver,
    make_worker: Callable[..., Worker],
    redis_server: EmbeddedRedis,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    running = await start_hooked(start_proxy, receiver)
    worker = make_worker(running)
    outcomes = ("success", "failure", "dead")
    counts = [deliveries("credits.granted", o) for o in outcomes]
    receiver.fail_next = 3
    await running.account("acme", "10")
    await drain(worker, running, max_ticks=3)  # attempts 1 and 2 retry at once, the 3rd buries it
    assert [a.status for a in receiver.attempts] == [500, 500, 500]
    assert await running.state.redis.lrange(keyspace.dead_letters("acme"), 0, -1)
    assert await running.state.redis.smembers(keyspace.DEAD_LETTERS) == {"acme"}
    assert await running.state.redis.zscore(keyspace.watch_shard("acme"), "acme") is None
    assert [deliveries("credits.granted", o) - c for o, c in zip(outcomes, counts, strict=True)] == [0, 2, 1]

    [dead] = await list_dead(running.state.redis)
    assert dead["account_id"] == "acme" and dead["type"] == "credits.granted"
    assert dead["tries"] == 3 and dead["error"] == "HTTP 500"
    assert dead["data"]["amount_usd"] == "10.000000" and dead["dead_at"].endswith("Z")

    # the same through the command line: `metering-proxy webhooks dead list|replay`
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(deep_merge(BASE_CONFIG, {"redis": {"url": redis_server.url}})))
    cli = ["--config", str(config_file), "webhooks", "dead"]
    capsys.readouterr()  # drop the log lines so far
    assert await asyncio.to_thread(cli_main, [*cli, "list", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["data"] == [dead]

    assert await asyncio.to_thread(cli_main, [*cli, "replay", "acme"]) == 0
    assert capsys.readouterr().out == "replayed 1 event\n"
    [queued] = await outbox(running)
    assert queued["id"] == receiver.attempts[0].headers["webhook-id"]
    assert queued["tries"] == 0 and "next_at" not in queued and "error" not in queued
    assert await running.state.redis.smembers(keyspace.DEAD_LETTERS) == set()
    assert await list_dead(running.state.redis) == []
    assert await running.state.redis.zscore(keyspace.watch_shard("acme"), "acme") == 0

    await drain(worker, running, max_ticks=1)
    assert [a.status for a in receiver.attempts] == [500, 500, 500, 204]
    assert await replay_dead(running.state.ledger) == 0


async def test_admin_api_shows_outbox_attempts_dead_letters_and_replays(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the console's webhooks card reads: the outbox with each event's next attempt,
    the latest attempts newest first (capped), the dead letters, and a replay over HTTP."""
    monkeypatch.setattr(webhooks, "DELIVERY_LOG", 3)
    running = await start_hooked(start_proxy, receiver)
    worker = make_worker(running)  # retries due at once, one attempt per tick
    receiver.fail_next = 3
    await running.account("acme", "10")
    path = "/admin/v1/accounts/acme/webhooks"
    status, hooks = await running.admin("GET", path)
    assert status == 200 and hooks["attempts"] == [] and hooks["dead"] == []
    [pending] = hooks["pending"]
    assert (pending["type"], pending["tries"], pending["next_attempt_at"]) == ("credits.granted", 0, None)

    await worker.tick()  # one failed attempt: the event waits for its next
    _, hooks = await running.admin("GET", path)
    [pending] = hooks["pending"]
    assert pending["tries"] == 1 and pending["error"] == "HTTP 500" and pending["next_attempt_at"].endswith("Z")
    [attempt] = hooks["attempts"]
    assert attempt["event_id"] == pending["id"] and (attempt["outcome"], attempt["tries"]) == ("failed", 1)

    await drain(worker, running, max_ticks=2)
    _, hooks = await running.admin("GET", path)
    assert hooks["pending"] == [] and [d["id"] for d in hooks["dead"]] == [pending["id"]]
    assert [(a["outcome"], a["tries"]) for a in hooks["attempts"]] == [("dead", 3), ("failed", 2), ("failed", 1)]
    _, listed = await running.admin("GET", "/admin/v1/webhooks/dead")
    assert listed["data"] == hooks["dead"] == await list_dead(running.state.redis)
    assert (await running.admin("GET", "/admin/v1/webhooks/dead?account_id=other"))[1]["data"] == []
    assert (await running.admin("GET", "/admin/v1/webhooks/dead?account_id=no%20spaces"))[0] == 400
    assert (await running.admin("GET", "/admin/v1/accounts/nobody/webhooks"))[0] == 404

    status, replayed = await running.admin("POST", "/admin/v1/webhooks/dead/replay", {"account_id": "acme"})
    assert status == 200 and replayed == {"object": "webhook_replay", "replayed": 1}
    await drain(worker, running, max_ticks=1)
    _, hooks = await running.admin("GET", path)
    assert hooks["dead"] == [] and hooks["pending"] == []
    assert [a["outcome"] for a in hooks["attempts"]] == ["delivered", "dead", "failed"]  # the latest 3
    assert (await running.admin("POST", "/admin/v1/webhooks/dead/replay", {}))[1]["replayed"] == 0


async def test_a_held_lease_keeps_other_instances_out(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    running = await start_hooked(start_proxy, receiver)
    await running.account("acme", "10")
    redis = running.state.redis
    await redis.set(keyspace.delivery_lease("acme"), "someone-else", px=30_000)
    one, other = Webhooks(running.state), Webhooks(running.state)
    try:
        retry_at = await one.deliver("acme")
        assert retry_at > time.time() * 1000  # look again later
        assert receiver.attempts == [] and len(await outbox(running)) == 1
        assert await redis.get(keyspace.delivery_lease("acme")) == "someone-else"  # not ours to release
        await redis.delete(keyspace.delivery_lease("acme"))
        results = await asyncio.gather(one.deliver("acme"), other.deliver("acme"))
    finally:
        await one.close()
        await other.close()
    assert len(receiver.attempts) == 1  # delivered by exactly one of them
    assert 0 in results and await outbox(running) == []


async def test_backoff_defers_the_retry_and_keeps_order(
    start_proxy: StartProxy, receiver: Receiver, upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver)
    hooks = Webhooks(running.state)  # the real backoff: full jitter from 1 s
    try:
        await running.account("acme", "10")
        await running.fund("acme", "1")
        receiver.fail_next = 1
        started = int(time.time() * 1000)
        retry_at = await hooks.deliver("acme")
        head, second = await outbox(running)
        assert head["next_at"] == retry_at and started <= retry_at <= int(time.time() * 1000) + 1_000
        assert head["tries"] == 1 and second["tries"] == 0  # the second waits behind the first
        running.state.ledger.clock_offset_ms = -60_000  # not due yet: nothing is posted
        assert await hooks.deliver("acme") == retry_at and len(receiver.attempts) == 1
        running.state.ledger.clock_offset_ms = 2_000  # due
        assert await hooks.deliver("acme") == 0
    finally:
        running.state.ledger.clock_offset_ms = 0
        await hooks.close()
    amounts = [a.body["data"]["amount_usd"] for a in receiver.attempts]
    assert amounts == ["10.000000", "10.000000", "1.000000"]


async def test_disabled_webhooks_touch_nothing(start_proxy: StartProxy) -> None:
    running = await start_proxy()
    await running.account("acme", "10")
    redis = running.state.redis
    assert await redis.llen(keyspace.outbox("acme")) == 0  # scripts raise no events
    await redis.rpush(keyspace.outbox("acme"), '{"id": "evt_x", "type": "t", "ts": 1, "data": {}, "tries": 0}')
    hooks = Webhooks(running.state)
    assert await hooks.deliver("acme") == 0
    await hooks.close()
    assert await redis.llen(keyspace.outbox("acme")) == 1
    assert not await redis.exists(keyspace.delivery_lease("acme"))


async def test_a_malformed_event_is_buried_not_retried_forever(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker]
) -> None:
    running = await start_hooked(start_proxy, receiver)
    await running.account("acme", "10")
    redis = running.state.redis
    await redis.lpush(keyspace.outbox("acme"), "not json")
    await drain(make_worker(running), running, max_ticks=1)
    assert [a.body["type"] for a in receiver.attempts] == ["credits.granted"]
    [dead] = await list_dead(redis)
    assert dead["raw"] == "not json" and dead["error"] == "malformed event"
    assert await replay_dead(running.state.ledger) == 0  # nothing to resend; it stays listed
    assert len(await list_dead(redis)) == 1


# -- settlement's events are delivered at once, not at the reservation's TTL -----------


async def test_settle_events_ask_for_a_visit(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], upstream: DemoUpstream
) -> None:
    running, worker, key = await funded_and_drained(start_proxy, receiver, make_worker)
    await spend(
        running,
        upstream,
        key,
        2_200_000,
    )  # crosses 5 USD
    assert [e["type"] for e in await outbox(running)] == ["credit_balance.low"]
    await drain(worker, running, max_ticks=2)  # the watch pointer sits at the reservation TTL (15 min)


async def test_auto_topup_to_a_target_balance(
    start_proxy: StartProxy, receiver: Receiver, make_worker: Callable[..., Worker], upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver)
    key = await running.account("acme", "10")
    status, _ = await running.admin(
        "PATCH", "/admin/v1/accounts/acme", {"auto_topup": {"threshold_usd": "8", "target_usd": "25"}}
    )
    assert status == 200
    await spend(running, upstream, key, 1_000_000)  # 10 -> 7.499990: below 8
    [event] = [e for e in await outbox(running) if e["type"] == "auto_topup.requested"]
    assert event["data"]["amount_usd"] == str(25_000_000 - 7_499_990)  # micro-USD in the outbox
    status, account = await running.admin("GET", "/admin/v1/accounts/acme")
    assert account["auto_topup"] == {"threshold_usd": "8.000000", "target_usd": "25.000000"}
    status, body = await running.admin(
        "PATCH", "/admin/v1/accounts/acme", {"auto_topup": {"threshold_usd": "8", "amount_usd": "5", "target_usd": "9"}}
    )
    assert status == 400 and "exactly one" in body["error"]["message"]


async def test_tier_expiry_depletion_and_overage_events(start_proxy: StartProxy, receiver: Receiver) -> None:
    from .test_ledger import spend as spend_micro

    extra = {
        "rate_tiers": {"tiers": [{"name": "free", "min_usd": "0", "rpm": 100, "tpm": 10**7},
                                 {"name": "tier-1", "min_usd": "5", "rpm": 500, "tpm": 10**7}]},
        "plans": {"metered": {"overage": {"limit_usd": None, "invoice_every_usd": "1"}}},
    }  # fmt: skip
    running = await start_proxy(deep_merge(hook_config(receiver, low_balance_thresholds_usd=[]), extra))
    await pause_background_worker(running)
    ledger = running.state.ledger
    await ledger.save_account("acme", {}, create=True)
    await running.state.redis.hset(keyspace.account("acme", "keys"), "key_test", "active")
    await running.fund("acme", "1")
    await running.fund("acme", "5")  # lifetime paid $6: tier-1 at the next touch
    await ledger.touch("acme")
    expires = int(time.time() * 1000) + 1000
    await running.fund("acme", "2", kind="promotional", expires_at=expires)
    ledger.clock_offset_ms = 2000
    await ledger.touch("acme")  # the promotional grant lapsed
    await spend_micro(ledger, "acme", 6_000_000)  # everything left: depleted
    await ledger.save_account("acme", {"plan": "metered"}, create=False)
    await spend_micro(ledger, "acme", 2_500_000, reserve=0)  # $2.5 of overage: two invoice steps
    events = [(e["type"], e["data"]) for e in await outbox(running) if e["type"] != "credits.granted"]
    assert events == [
        ("tier.changed", {"from": "free", "to": "tier-1", "account_id": "acme"}),
        ("credits.expired", {"grant_id": events[1][1]["grant_id"], "amount_usd": "2000000", "account_id": "acme"}),
        ("credit_balance.depleted", {"balance_usd": "0", "account_id": "acme"}),
        *(("overage.invoice_threshold", {"amount_usd": "1000000", "invoiced_through_usd": through,
                                         "overage_usd": "2500000", "invoice_every_usd": "1000000",
                                         "account_id": "acme"})
          for through in ("1000000", "2000000")),  # one event per step crossed, even in one request
    ]  # fmt: skip


async def test_a_new_account_has_crossed_nothing(start_proxy: StartProxy, receiver: Receiver) -> None:
    running = await start_hooked(start_proxy, receiver)
    await running.account("acme", None)
    await running.balance("acme")
    assert await outbox(running) == []  # no low balance or depleted spam at signup


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def test_settings_on_an_unfunded_account_raise_nothing_until_it_is_funded_and_spends(
    start_proxy: StartProxy, receiver: Receiver, upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver)
    key = await running.account("acme", None)
    patch = {"auto_topup": {"threshold_usd": "5", "amount_usd": "10"}, "low_balance_thresholds_usd": ["5", "2"]}
    assert (await running.admin("PATCH", "/admin/v1/accounts/acme", patch))[0] == 200
    await running.balance("acme")  # every check runs again: still nothing crossed, nobody to charge
    assert await outbox(running) == []

    await running.fund("acme", "10")
    assert kinds(await outbox(running)) == ["credits.granted"]
    await running.state.redis.delete(keyspace.outbox("acme"))
    await spend(running, upstream, key, 2_200_000)  # 10 -> 4.499990: crosses 5, below the top-up threshold
    assert kinds(await outbox(running)) == ["credit_balance.low", "auto_topup.requested"]


async def test_a_threshold_set_above_the_balance_waits_for_a_crossing(
    start_proxy: StartProxy, receiver: Receiver, upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver, low_balance_thresholds_usd=[])
    key = await running.account("acme", "10")
    await running.state.redis.delete(keyspace.outbox("acme"))
    patch = {"low_balance_thresholds_usd": ["20"]}
    assert (await running.admin("PATCH", "/admin/v1/accounts/acme", patch))[0] == 200
    await spend(running, upstream, key, 400_000)  # 10 -> 8.999990: lower, but 20 was never crossed
    assert await outbox(running) == []

    await running.fund("acme", "15")  # 23.999990: above it, armed
    await spend(running, upstream, key, 2_000_000)  # -> 18.999980: crosses 20
    low = [e for e in await outbox(running) if e["type"] == "credit_balance.low"]
    assert [(e["data"]["threshold_usd"], e["data"]["balance_usd"]) for e in low] == [("20000000", "18999980")]


async def test_a_funded_account_below_its_new_top_up_threshold_is_topped_up_at_once(
    start_proxy: StartProxy, receiver: Receiver, upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver, low_balance_thresholds_usd=[])
    await running.account("acme", "3")
    await running.state.redis.delete(keyspace.outbox("acme"))
    patch = {"auto_topup": {"threshold_usd": "5", "amount_usd": "10"}}
    assert (await running.admin("PATCH", "/admin/v1/accounts/acme", patch))[0] == 200
    [event] = await outbox(running)
    assert event["type"] == "auto_topup.requested" and event["data"]["amount_usd"] == "10000000"


async def test_credit_expiring_at_admission_raises_events(
    start_proxy: StartProxy, receiver: Receiver, upstream: DemoUpstream
) -> None:
    running = await start_hooked(start_proxy, receiver)
    key = await running.account("acme", None)
    await running.fund("acme", "10", kind="promotional", expires_at=int(time.time() * 1000) + 1000)
    await running.state.ledger.save_account(
        "acme", {"auto_topup": '{"threshold": "5000000", "amount": "10000000"}'}, create=False
    )
    await running.state.redis.delete(keyspace.outbox("acme"))
    running.state.ledger.clock_offset_ms = 2000  # the credit lapses; the next request finds out
    with pytest.raises(openai.APIStatusError) as caught:
        await running.client(key).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 402
    kinds = [e["type"] for e in await outbox(running)]
    assert kinds == ["credits.expired", "credit_balance.low", "credit_balance.low", "credit_balance.depleted",
                     "auto_topup.requested"]  # fmt: skip
