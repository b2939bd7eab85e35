"""The benchmark's memory section (bench.py --memory): what the proxy holds over many
requests, what one huge prompt costs it, and that streams are not buffered.

    RSS curve     VmRSS of C after a warm-up, then after 10k, 50k and 100k metered requests
                  (JSON and streamed at once): flat means the growth per request is ~0 bytes
    big prompts   one chat message of 1 MB and of 10 MB of text, and the same text in many
                  small content parts, through C and through B: each target's CPU time for
                  the request (all its threads, /proc/PID/task/*/schedstat) and its peak RSS
                  while serving it (VmHWM, reset through /proc/PID/clear_refs) above its
                  RSS before the first big prompt
    long stream   a slow stream of many chunks: its first bytes must reach the client while
                  the upstream is still writing (a buffering relay would hold them to the end)

Sizes are MiB (1 MB = 1,048,576 characters of English-like text), so the 10 MB prompt's
body is just over the default `server.max_body_bytes` (10 MiB): the section also shows
what a proxy with that default answers; the measured C runs with BIG_BODY_LIMIT.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from tests.sample_text import realistic_text

MB = 1024 * 1024
HEADING = "## Memory, big prompts and long streams"  # bench.py --rounds 0 --memory rewrites from here
BIG_BODY_LIMIT = 64 * MB  # the measured proxy's server.max_body_bytes: the 10 MB prompts fit
PART_CHARS = 256  # text per content part in the many-parts prompt
SLOW_DELAY_MS = 10  # between the long stream's chunks


@dataclass
class Plan:
    warmup: int = 2000
    checkpoints: tuple[int, ...] = (10_000, 50_000, 100_000)
    sizes_mb: tuple[float, ...] = (1, 10)
    repeats: int = 3  # big-prompt requests per size, shape and target (median)
    concurrency: int = 16
    slow_chunks: int = 100  # the long stream: ~1 s of upstream writing

    @classmethod
    def smoke(cls) -> Plan:
        return cls(warmup=20, checkpoints=(40, 80), sizes_mb=(0.05, 0.1), repeats=1, concurrency=4, slow_chunks=10)


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS:") / 1024


def hwm_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM:") / 1024


def _status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (Linux >= 4.0, our own processes)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of `pid`, in ns (finer than /proc/PID/stat's ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total


Load = Callable[[str, str, int, int, bool], Awaitable[Any]]


class Target(Protocol):
    name: str
    url: str
    pid: int
    key: str


async def rss_curve(target: Target, redis: Any, load: Load, plan: Plan) -> tuple[list[tuple[int, float]], list[float]]:
    """(requests served, VmRSS MB) after the warm-up (0) and at each checkpoint, and
    Redis's used_memory (MB) at the same points."""
    half = max(1, plan.concurrency // 2)

    async def mixed(n: int) -> None:
        url, key = target.url, target.key
        await asyncio.gather(load(url, key, n // 2, half, False), load(url, key, n - n // 2, half, True))

    async def redis_mb() -> float:
        return int((await redis.info("memory"))["used_memory"]) / MB

    await mixed(plan.warmup)
    points, used, done = [(0, rss_mb(target.pid))], [await redis_mb()], 0
    for checkpoint in plan.checkpoints:
        await mixed(checkpoint - done)
        done = checkpoint
        points.append((done, rss_mb(target.pid)))
        used.append(await redis_mb())
    return points, used


def big_body(text: str, parts: bool) -> bytes:
    content: Any = text
    if parts:
        content = [{"type": "text", "text": text[i : i + PART_CHARS]} for i in range(0, len(text), PART_CHARS)]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 16}
    return orjson.dumps(body)


async def post(session: aiohttp.ClientSession, url: str, key: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        return resp.status, await resp.read()


@dataclass
class Cost:
    cpu_ms: float
    peak_mb: float  # peak RSS while it is served, above the target's RSS before the first big prompt


async def big_prompt_cost(target: Target, body: bytes, repeats: int, steady: float) -> Cost:
    cpu, peak = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(repeats):
            reset_peak(target.pid)
            cpu0 = cpu_ns(target.pid)
            status, answer = await post(session, target.url, target.key, body)
            cpu.append((cpu_ns(target.pid) - cpu0) / 1e6)
            peak.append(hwm_mb(target.pid) - steady)
            if status != 200:
                raise RuntimeError(f"{target.name}: a {len(body)} byte prompt got {status}: {answer[:300]!r}")
    return Cost(statistics.median(cpu), statistics.median(peak))


async def refused(url: str, key: str, body: bytes) -> str:
    """What a proxy with the default body limit answers (status and error code)."""
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, url, key, body)
    try:
        code = orjson.loads(answer)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code = answer[:80].decode(errors="replace")
    return f"{status} `{code}`"


async def first_bytes(url: str, key: str, chunks: int) -> tuple[float, float]:
    """(seconds to the first body bytes, seconds to the end) of a slow long stream."""
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Count slowly."}],
        "max_tokens": chunks,
        "stream": True,
        "metadata": {"bench_chunks": str(chunks), "bench_delay_ms": str(SLOW_DELAY_MS)},
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
            first = None
            async for _chunk in resp.content.iter_any():
                first = first or time.perf_counter()
            assert resp.status == 200 and first is not None, resp.status
        return first - started, time.perf_counter() - started


def streamed(first: float, end: float) -> bool:
    """The first bytes came before half the stream's time: not held until its end."""
    return first < end / 2


@dataclass
class Figures:
    curve: list[tuple[int, float]]
    redis_mb: list[float]  # Redis used_memory at the same points
    costs: dict[tuple[str, float, bool], Cost]  # (target, MB, parts) -> cost
    default_answer: str
    streams: dict[str, tuple[float, float]]  # target -> (first bytes, end)


async def measure(proxy: Target, bare: Target, default_url: str, redis: Any, load: Load, plan: Plan) -> Figures:
    curve, redis_mb = await rss_curve(proxy, redis, load, plan)
    text = realistic_text(int(min(plan.sizes_mb) * MB))
    costs, steady = {}, {t.name: rss_mb(t.pid) for t in (proxy, bare)}
    for mb in plan.sizes_mb:
        prompt = (text * -(-int(mb * MB) // len(text)))[: int(mb * MB)]
        for parts in (False, True):
            body = big_body(prompt, parts)
            for target in (proxy, bare):
                costs[(target.name, mb, parts)] = await big_prompt_cost(target, body, plan.repeats, steady[target.name])
    biggest = big_body((text * -(-int(10 * MB) // len(text)))[: 10 * MB], False)
    default_answer = await refused(default_url, proxy.key, biggest)
    streams = {t.name: await first_bytes(t.url, t.key, plan.slow_chunks) for t in (bare, proxy)}
    return Figures(curve, redis_mb, costs, default_answer, streams)


def report(fig: Figures, plan: Plan, proxy: str, bare: str) -> str:
    (_, r0), (n1, r1), (ny, ry), (nz, rz) = fig.curve[0], fig.curve[1], fig.curve[-2], fig.curve[-1]
    growth = rz - r1
    lines = [
        HEADING,
        "",
        "### RSS over many requests",
        "",
        f"{proxy}: VmRSS after {plan.warmup} warm-up requests, then after each count of metered requests"
        f" (JSON and stream at once, concurrency {plan.concurrency}); Redis `used_memory` beside it.",
        "",
        "| requests | " + " | ".join(f"{n:,}" if n else "warm-up" for n, _ in fig.curve) + " |",
        "|---" * (len(fig.curve) + 1) + "|",
        "| proxy RSS MB | " + " | ".join(f"{r:.1f}" for _, r in fig.curve) + " |",
        "| Redis used MB | " + " | ".join(f"{r:.1f}" for r in fig.redis_mb) + " |",
        "",
        f"Growth from {n1:,} to {nz:,} requests: {growth:+.1f} MB"
        f" ({growth * MB / max(1, nz - n1):+.0f} bytes per request); from {ny:,} to {nz:,}: {rz - ry:+.1f} MB"
        f" ({(rz - ry) * MB / max(1, nz - ny):+.0f} bytes per request); from the warm-up: {rz - r0:+.1f} MB."
        f" Redis grows {(fig.redis_mb[-1] - fig.redis_mb[1]) * MB / max(1, nz - n1):.0f} bytes per request:"
        " each one's ledger entry (the ledger is append-only) and its settled marker (kept 30 days).",
        "",
        "### big prompts",
        "",
        f"One chat message of N MB of text (`text`) or the same text in {PART_CHARS}-character content parts"
        f" (`parts`); the target's CPU for the request (all threads) and its peak RSS while serving it, above"
        " its RSS before the first of these prompts;"
        f" median of {plan.repeats}. The measured {proxy.split()[0]} has `server.max_body_bytes: {BIG_BODY_LIMIT}`;"
        f" with the default ({10 * MB}) a 10 MB text prompt gets {fig.default_answer}.",
        "",
        "| prompt | C CPU ms | B CPU ms | C/B | C ms per MB | C peak RSS +MB | B peak RSS +MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for parts in (False, True):
        for mb in plan.sizes_mb:
            c, b = fig.costs[(proxy, mb, parts)], fig.costs[(bare, mb, parts)]
            lines.append(
                f"| {mb:g} MB {'parts' if parts else 'text'} | {c.cpu_ms:.0f} | {b.cpu_ms:.0f}"
                f" | {c.cpu_ms / max(b.cpu_ms, 1e-9):.1f}x | {c.cpu_ms / mb:.0f} | {c.peak_mb:.1f} | {b.peak_mb:.1f} |"
            )
    lo, hi = min(plan.sizes_mb), max(plan.sizes_mb)
    scales = []
    for parts in (False, True):
        small, big = fig.costs[(proxy, lo, parts)], fig.costs[(proxy, hi, parts)]
        scales.append(f"{(big.cpu_ms / hi) / max(small.cpu_ms / lo, 1e-9):.2f}x ({'parts' if parts else 'text'})")
    lines += [
        "",
        f"C's CPU per MB at {hi:g} MB over that at {lo:g} MB (1.00x: linear): {', '.join(scales)}.",
        "",
        "### long stream",
        "",
        f"A stream of {plan.slow_chunks} chunks written {SLOW_DELAY_MS} ms apart: relayed as it arrives, its"
        " first bytes reach the client long before the upstream's last (a buffering relay: at the end).",
        "",
        "| target | first bytes ms | end ms | relayed as it arrives |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {1000 * a:.0f} | {1000 * z:.0f} | {'yes' if streamed(a, z) else 'NO: buffered'} |"
        for name, (a, z) in fig.streams.items()
    ]
    lines.append("")
    return "\n".join(lines)
