"""The chaos run (tests/chaos.py) in CI: seeded and bounded. `make soak` runs the same
scenario longer (SOAK_SECONDS, default 600; CHAOS_SEED picks another schedule)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from redis.asyncio import Redis

from proxy import journal, keyspace
from proxy.app import connect
from proxy.cli import main as cli_main
from proxy.keys import KeyStore
from proxy.ledger import GrantSpec, Ledger
from proxy.testing.upstream import DemoUpstream

from .chaos import Chaos, verify
from .helpers import entries, raise_fd_limit

SEED = int(os.environ.get("CHAOS_SEED", "1"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "40"))
FUNDS = 1_000_000_000  # $1,000: the run is about faults, not 402s
KEYS = 8


async def test_chaos_run_charges_every_request_served_exactly_once(upstream: DemoUpstream, tmp_path: Path) -> None:
    raise_fd_limit()
    chaos = Chaos(tmp_path, upstream, SEED, SECONDS)
    await chaos.start()
    redis = connect(chaos.redis.url)
    try:
        chaos.keys = await funded_keys(Ledger(redis, chaos.configs[0].config))
        await redis.aclose()
        await chaos.traffic()
        redis = connect(chaos.redis.url)  # after the restarts: a fresh client
        await quiesce(chaos, redis)
        chaos.stop_proxies()
        codes = [await asyncio.to_thread(cli_main, ["--config", str(c.path), "reconcile"]) for c in chaos.configs]
        verdict = verify(chaos.run, upstream, await entries(redis, "acme"))
    finally:
        chaos.stop_proxies()
        await redis.aclose()
        chaos.redis.stop()
    statuses = Counter("no answer" if o.status is None else str(o.status) for o in chaos.run.outcomes)
    print(f"\nchaos run: seed {SEED}, {SECONDS:g} s, {len(chaos.run.outcomes)} client requests")
    print(f"  process faults injected: {dict(chaos.run.injected)}")
    print(f"  request faults drawn: {dict(Counter(o.fault for o in chaos.run.outcomes))}")
    print(f"  client saw: {dict(sorted(statuses.items()))}")
    print(f"  upstream and ledger: {dict(verdict.counts)}; reconcile exit codes {codes}")
    assert codes == [0] * len(codes)
    assert not verdict.problems, "\n".join(verdict.problems[:20])
    assert sum(chaos.run.injected.values()) >= 3 and verdict.counts["served"] > 0


async def funded_keys(ledger: Ledger) -> list[str]:
    await ledger.save_account("acme", {}, create=True)
    await ledger.grant("acme", GrantSpec("paid", FUNDS))
    accounts = KeyStore(ledger.redis)
    return [(await accounts.create_key("acme", name=f"k{i}"))[1] for i in range(KEYS)]


async def quiesce(chaos: Chaos, redis: Redis, timeout_s: float = 90) -> None:
    """Until every journal is replayed and every reservation closed (a dead proxy's lapse
    after their TTL, and nothing is reaped for 10 s after an outage): polled, bounded."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    resv = keyspace.account("acme", "resv")
    while True:
        journaled = sum(journal.pending_on_disk(c.config.data_dir / "journal") for c in chaos.configs)
        open_now = await redis.hlen(resv)
        if journaled == 0 and open_now == 0:
            return
        left = asyncio.get_running_loop().time() < deadline
        assert left, f"after {timeout_s}s: {journaled} settlements journaled, {open_now} reservations open"
        assert all(child.poll() is None for child in chaos.children), "a proxy died"
        await asyncio.sleep(0.2)  # polling Redis and the journals, bounded
