"""A seeded chaos run: two `metering-proxy serve` children sharing a real Redis process,
the fake upstream in this process, client tasks sending mixed traffic, and an injector
that kills and restarts the proxies, kills Redis (restarted from its AOF) and freezes it
(SIGSTOP/SIGCONT). Upstream faults (5xx, timeouts, delays, cut streams) and client
disconnects are drawn per request, with the same RNG.

Redis runs with `appendfsync no`: an acknowledged write is in the page cache and survives
its SIGKILL (the OS does not crash here), and no write ever waits on an fsync (with
`everysec` a busy disk postpones writes, and the 2 s timeouts fire), so "every request
served is charged exactly once" can be asserted without exception (what an OS crash
can lose is written down in docs/reliability.md).

Every random choice comes from `random.Random(seed)`; the timing of a run still varies,
so the checks are invariants that must hold on every interleaving.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.embedded import EmbeddedRedis
from proxy.testing.upstream import DemoUpstream, Fault, RecordedRequest

from .helpers import ChildConfig, child_config, spawn_proxy, suite_server, wait_healthy

PROXIES = 2
CLIENTS = 10
TTL_S = 3  # reservations of a dead proxy lapse fast
UPSTREAM_TIMEOUT_S = 1.5
EXPOSURE_S = 2.0  # a kill this long after a request ended may still have cut its settlement
REQUEST_FAULTS = {  # per request: weight
    "none": 50,
    "upstream_5xx": 8,
    "upstream_delay": 8,
    "upstream_timeout": 5,
    "cut_stream": 10,
    "client_disconnect": 10,
}
PROCESS_FAULTS = ("proxy_kill", "redis_kill", "redis_stop")


@dataclass
class Outcome:
    """One client request, as the client saw it."""

    tag: str  # sent as the body's `user`: how the upstream's record finds it
    slot: int  # the proxy it went to
    fault: str
    started: float  # monotonic
    ended: float = 0.0
    status: int | None = None  # None: no answer (connection refused or cut before headers)
    request_id: str | None = None
    complete: bool = False  # the whole answer arrived (a stream to its end)


@dataclass
class Run:
    seed: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[tuple[int, float]] = field(default_factory=list)  # (slot, monotonic time)
    injected: Counter[str] = field(default_factory=Counter)
    plan: dict[str, Fault] = field(default_factory=dict)  # tag -> the upstream fault it asked for


class Chaos:
    def __init__(self, root: Path, upstream: DemoUpstream, seed: int, seconds: float) -> None:
        self.root = root
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.run = Run(seed, seconds)
        self.redis = EmbeddedRedis(root / "redis", binary=suite_server(), appendfsync="no")
        self.configs: list[ChildConfig] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.starts = Counter[int]()
        self.keys: list[str] = []

    async def start(self) -> None:
        await self.redis.start()
        extra = {"billing": {"reservation_ttl_s": TTL_S}, "upstreams": {"openai": {"timeout_s": UPSTREAM_TIMEOUT_S}}}
        upstream, redis = self.upstream.base_url, self.redis.url
        self.configs = [child_config(self.root, upstream, redis, extra, f"p{i}") for i in range(PROXIES)]
        self.children = [self._spawn(slot) for slot in range(PROXIES)]
        for slot in range(PROXIES):
            await wait_healthy(self.configs[slot].url, self.children[slot])
        self.upstream.fault_for = self._fault_for

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        self.starts[slot] += 1
        return spawn_proxy(self.configs[slot].path, self.root / f"p{slot}-{self.starts[slot]}.log")

    def _fault_for(self, record: RecordedRequest) -> Fault | None:
        tag = record.body.get("user") if isinstance(record.body, dict) else None
        return self.run.plan.get(tag) if isinstance(tag, str) else None

    async def traffic(self) -> None:
        """CLIENTS tasks and the injector until `seconds` have passed."""
        deadline = time.monotonic() + self.run.seconds
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            clients = [self._client(session, i, deadline) for i in range(CLIENTS)]
            await asyncio.gather(self._inject(deadline), *clients)

    async def _client(self, session: aiohttp.ClientSession, index: int, deadline: float) -> None:
        rng = random.Random(self.run.seed * 1000 + index)
        for n in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            fault = rng.choices(list(REQUEST_FAULTS), weights=list(REQUEST_FAULTS.values()))[0]
            stream = fault in ("cut_stream", "client_disconnect") or rng.random() < 0.5
            outcome = Outcome(f"c{index}-{n}", rng.randrange(PROXIES), fault, time.monotonic())
            self.run.plan[outcome.tag] = upstream_fault(fault, rng)
            self.run.outcomes.append(outcome)
            await self._send(session, outcome, stream, rng)
            outcome.ended = time.monotonic()
            if outcome.status is None or outcome.status == 503:  # its proxy or Redis is down: back off
                await asyncio.sleep(rng.uniform(0.05, 0.2))  # a client's retry pacing, not a synchronisation

    async def _send(self, session: aiohttp.ClientSession, outcome: Outcome, stream: bool, rng: random.Random) -> None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                "stream": stream, "user": outcome.tag}  # fmt: skip
        url = f"{self.configs[outcome.slot].url}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {rng.choice(self.keys)}"}
        try:
            async with session.post(url, json=body, headers=auth) as resp:
                outcome.status, outcome.request_id = resp.status, resp.headers.get("x-request-id")
                if outcome.fault == "client_disconnect" and resp.status == 200:
                    for _ in range(rng.randrange(1, 6)):  # a few events, then hang up
                        await resp.content.readany()
                    resp.close()
                    return
                data = await resp.read()
                outcome.complete = not stream or resp.status != 200 or data.rstrip().endswith(b"data: [DONE]")
        except (aiohttp.ClientError, TimeoutError):
            pass  # a proxy killed under it (or not yet back): what the checks expect

    async def _inject(self, deadline: float) -> None:
        """Rounds of the three process faults, each round in a seeded order."""
        order: list[str] = []
        while True:
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))  # the fault schedule's pacing, not a synchronisation
            if time.monotonic() >= deadline:
                return
            if not order:
                order = self.rng.sample(PROCESS_FAULTS, len(PROCESS_FAULTS))
            fault = order.pop()
            self.run.injected[fault] += 1
            if fault == "proxy_kill":
                await self._kill_proxy(self.rng.randrange(PROXIES))
            elif fault == "redis_kill":
                await self._kill_redis(self.rng.uniform(0.3, 2.5))
            else:
                await self._freeze_redis(self.rng.uniform(0.3, 2.5))

    async def _kill_proxy(self, slot: int) -> None:
        child = self.children[slot]
        child.send_signal(signal.SIGKILL)
        await asyncio.to_thread(child.wait)
        self.run.kills.append((slot, time.monotonic()))
        self.children[slot] = self._spawn(slot)  # on the same ports and data_dir: it adopts the journal
        await wait_healthy(self.configs[slot].url, self.children[slot], timeout_s=30)

    async def _kill_redis(self, down_s: float) -> None:
        assert self.redis.process is not None
        self.redis.process.kill()
        await asyncio.to_thread(self.redis.process.wait)
        await asyncio.sleep(down_s)  # how long the outage lasts: part of the schedule
        await self.redis.start()  # the same port, its AOF replayed

    async def _freeze_redis(self, frozen_s: float) -> None:
        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(frozen_s)  # how long it stays frozen: part of the schedule
        finally:
            os.kill(self.redis.process.pid, signal.SIGCONT)

    def stop_proxies(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def upstream_fault(kind: str, rng: random.Random) -> Fault:
    """The upstream's answer to one request: 20-50 tokens, streamed with small gaps."""
    fault = Fault(output_tokens=rng.randrange(20, 50), chunk_delay_s=0.01)
    if kind == "upstream_5xx":
        fault.status = rng.choice((500, 502, 503))
    elif kind == "upstream_delay":
        fault.delay_before_headers_s = rng.uniform(0.1, 0.6)
    elif kind == "upstream_timeout":
        fault.delay_before_headers_s = UPSTREAM_TIMEOUT_S + 2.5  # long gone by then: never served
    elif kind == "cut_stream":
        fault.cut_after_chunks = rng.randrange(2, 15)
    elif kind == "client_disconnect":
        fault.chunk_delay_s = 0.05
    return fault


@dataclass
class Verdict:
    problems: list[str]
    counts: Counter[str]


def verify(run: Run, upstream: DemoUpstream, ledger: list[dict[str, Any]]) -> Verdict:
    """Every request the upstream served is charged exactly once (a reaper's checkpoint
    charge and the late settlement's correction count as one); nothing it did not serve
    is charged; a request served but never charged must have had its proxy killed under
    it (then the reaper released it at its last checkpoint, by design)."""
    by_tag = {o.tag: o for o in run.outcomes}
    tag_of = {r.headers.get("x-request-id", ""): (r.body or {}).get("user") for r in upstream.requests}
    served = set(upstream.served)
    charges: dict[str, list[dict[str, Any]]] = {}
    closes: Counter[str] = Counter()
    for entry in ledger:
        rid = entry.get("request_id")
        if rid and entry["type"] in ("usage", "release"):
            closes[rid] += 1
            if entry["type"] == "usage":
                charges.setdefault(rid, []).append(entry)
    problems = [f"{rid}: charged but never served upstream" for rid in charges if rid not in served]
    counts: Counter[str] = Counter(served=len(served), forwarded=len(tag_of))
    for rid in served:
        outcome = by_tag.get(tag_of.get(rid) or "")
        problems += _served_problems(rid, charges.get(rid, []), closes[rid], outcome, run)
        if outcome is not None and outcome.complete and outcome.fault in ("none", "upstream_delay"):
            problems += _cost_problems(rid, charges.get(rid, []), run.plan[outcome.tag])
        kind = "reaped" if any(_reaped(e) for e in charges.get(rid, [])) else "settled"
        counts[f"charged ({kind})" if rid in charges else "served, proxy killed: released by the reaper"] += 1
    return Verdict(problems, counts)


def _served_problems(
    rid: str, charged: list[dict[str, Any]], closes: int, outcome: Outcome | None, run: Run
) -> list[str]:
    reaped = [e for e in charged if _reaped(e)]
    settled = [e for e in charged if not _reaped(e)]
    problems = []
    if len(reaped) > 1 or len(settled) > 1:
        problems.append(f"{rid}: charged {len(charged)} times: {charged}")
    if reaped and settled and settled[0].get("previously_charged") is None:
        problems.append(f"{rid}: settled in full after the reaper charged it: {charged}")
    if closes == 0:
        problems.append(f"{rid}: served, and its reservation never closed")
    # a complete answer was settled before its end reached the client (or journaled)
    if not charged and (outcome is None or outcome.complete or not _exposed(outcome, run)):
        problems.append(f"{rid}: served and never charged, its proxy alive ({outcome})")
    return problems


def _cost_problems(rid: str, charged: list[dict[str, Any]], fault: Fault) -> list[str]:
    """A whole answer with the upstream's usage costs exactly its tokens (gpt-4o: 10
    prompt tokens at $2.50/1M, the output at $10/1M), however many entries it took."""
    cost = 25 + min(60, fault.output_tokens) * 10
    paid = -sum(int(e["amount"]) for e in charged)
    return [] if paid == cost else [f"{rid}: charged {paid} micro-USD for a request costing {cost}: {charged}"]


def _reaped(entry: dict[str, Any]) -> bool:
    return str(entry.get("description") or "").startswith("proxy stopped mid-request")


def _exposed(outcome: Outcome, run: Run) -> bool:
    """Its proxy was killed while it ran or just after (settlement may have been cut)."""
    end = (outcome.ended or time.monotonic()) + EXPOSURE_S
    return any(slot == outcome.slot and outcome.started <= at <= end for slot, at in run.kills)
