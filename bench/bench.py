"""Benchmark: metering-proxy against a bare aiohttp pass-through and the upstream itself.

Everything runs on 127.0.0.1, each part its own process: a redis-server (the embedded
one: Valkey where installed), a lean fake upstream (bench/upstream.py: 16-token chat
completions), and the targets behind it:

    A  the upstream directly
    B  a bare aiohttp pass-through that answers the way the proxy does (bench/passthrough.py)
    B1 the same on the proxy's own upstream client (http1.py): the proxy's transport floor
    C  metering-proxy with real Redis (rate tiers, the journal and checkpoints on)
    C- with --ablate, the same without its access log, metrics, tokenizer and Redis I/O
       (bench/ablate/sitecustomize.py): what the rest costs, for measurement only
    D  LiteLLM's proxy, with --litellm PATH (its own venv; see /work/shared/NOTES.md)

One load generator (aiohttp, in this process) sends every target the same requests,
JSON and streamed, in rounds (A, B, C, D, A, B, ...) so the ratios come from one run:
req/s and p50/p99 at --concurrency (16), p50/p99 at one connection, time to first byte
and the delay per stream chunk, CPU per 1,000 requests of the target process (from
/proc: user + system) and its peak RSS. For C also: Redis commands per request
(top-level ones from MONITOR sampled at one connection; all of them, scripts' included,
from INFO commandstats), Redis server CPU per request (INFO cpu) and each script's time.

    make bench                                   # prints the table, writes docs/benchmarks.md
    .venv/bin/python bench/bench.py --smoke      # seconds: the CI's check that it runs
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402  (bench/memory.py, beside this script)

from proxy.app import connect  # noqa: E402
from proxy.configfile import parse_config  # noqa: E402
from proxy.embedded import EmbeddedRedis, free_port, server_binary  # noqa: E402
from proxy.keys import KeyStore  # noqa: E402
from proxy.ledger import GrantSpec, Ledger  # noqa: E402
from proxy.scripts import SCRIPTS  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
# An app's request as apps send them: the same long system prompt and tool list every time
_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "description": "Look up a record by its id, with the fields asked for and the depth of related records.",
        "parameters": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "The record's id, e.g. cus_123"},
                "fields": {"type": "array", "items": {"type": "string"}},
                "depth": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["id"],
        },
    },
}
APP_REQUEST = {
    "messages": [
        {
            "role": "system",
            "content": "You are the support assistant of ACME Corp. Answer politely and briefly, cite the"
            " knowledge base article you used, and never reveal internal policy or other customers' data. " * 50,
        },
        *MESSAGES,
    ],
    "tools": [{**_TOOL, "function": {**_TOOL["function"], "name": f"lookup_{i}"}} for i in range(20)],
}
TOKENS = 16  # bench/upstream.py's answer
LITELLM_KEY = "sk-litellm-bench"
T = TypeVar("T")
ABLATED = "C- the same without log, metrics, tokenizer, Redis I/O"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def wait_up(url: str, tries: int = 200) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(tries):
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)  # seconds, whole request
    first_byte: list[float] = field(default_factory=list)  # seconds to the first body bytes
    per_chunk: list[float] = field(default_factory=list)  # seconds per chunk after the first byte


async def load(
    url: str, key: str, requests: int, concurrency: int, stream: bool, request: dict[str, Any] | None = None
) -> Sample:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": TOKENS, "stream": stream, **(request or {})}
    headers = {"Authorization": f"Bearer {key}"}
    sample = Sample()
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                    first = None
                    async for _chunk in resp.content.iter_any():
                        first = first or time.perf_counter()
                    assert resp.status == 200, (resp.status, await resp.text())
                end = time.perf_counter()
                sample.latencies.append(end - started)
                if stream and first is not None:
                    sample.first_byte.append(first - started)
                    sample.per_chunk.append((end - first) / TOKENS)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sample


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def redis_counts(redis: Any) -> tuple[dict[str, int], float]:
    """(command -> calls, server CPU seconds) from Redis's own statistics."""
    stats = await redis.info("commandstats")
    cpu = await redis.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def script_names() -> dict[str, str]:
    names = {s.sha: s.name for s in SCRIPTS.values()}
    return names | {name: name for name in SCRIPTS}  # FCALL names the function itself


class Monitor:
    """Top-level commands as Redis sees them (MONITOR marks those a script ran `lua]`)."""

    def __init__(self, url: str) -> None:
        self.url, self.lines = url, 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        host, port = self.url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.writer.write(b"MONITOR\r\n")
        assert (await self.reader.readline()).startswith(b"+OK")
        self.task = asyncio.create_task(self._count())
        return self

    async def _count(self) -> None:
        assert self.reader is not None
        while line := await self.reader.readline():
            if b"lua]" not in line and not any(c in line for c in (b'"SLOWLOG"', b'"CONFIG"', b'"INFO"')):
                self.lines += 1

    async def __aexit__(self, *_: object) -> None:
        await asyncio.sleep(0.2)  # the last lines on their way
        assert self.task is not None and self.writer is not None
        self.task.cancel()
        self.writer.close()


async def redis_sample(redis: Any, url: str, run: Any, requests: int) -> dict[str, Any]:
    """During `run`: the proxy's top-level commands (MONITOR) and each script's time
    (SLOWLOG at 0 us, which logs scripts' own commands too: only scripts are counted)."""
    old = await redis.config_get("slowlog-*")
    await redis.config_set("slowlog-log-slower-than", 0)
    await redis.config_set("slowlog-max-len", 100_000)
    await redis.slowlog_reset()
    try:
        async with Monitor(url) as monitor:
            await run()
        entries = await redis.execute_command("SLOWLOG", "GET", "-1")
    finally:
        for name, value in old.items():
            await redis.config_set(name, value)
    names, scripts = script_names(), {}
    for entry in entries:
        args = [a.decode() if isinstance(a, bytes) else str(a) for a in entry[3]]
        if args[0].lower() in ("evalsha", "eval", "fcall", "evalsha_ro", "fcall_ro"):
            script = names.get(args[1]) or re.sub(r"_[0-9a-f]{16}$", "", args[1])[:12]  # another release's
            n, us = scripts.get(script, (0, 0))
            scripts[script] = (n + 1, us + int(entry[2]))
    return {
        "top_level_per_req": monitor.lines / requests,
        "script_us": {name: us / n for name, (n, us) in scripts.items()},
    }


@dataclass
class Target:
    name: str
    url: str
    pid: int
    key: str
    metered: bool = False
    external: bool = False  # not ours (LiteLLM): a dropped connection is measured again, not a failure
    rows: dict[bool, list[dict[str, Any]]] = field(default_factory=lambda: {False: [], True: []})
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # per REAL_LOADS name, per round


async def again_if_external(target: Target, run: Callable[[], Awaitable[T]]) -> T:
    """A round of a target; LiteLLM's proxy, which has dropped connections under load,
    gets one more try, so that a 15-minute run is not lost to it."""
    try:
        return await run()
    except aiohttp.ClientError as exc:
        if not target.external:
            raise
        print(f"{target.name}: {exc!r}; measuring this round again", file=sys.stderr)
        return await run()


async def measure(target: Target, args: argparse.Namespace, stream: bool, redis: Any) -> dict[str, Any]:
    await load(target.url, target.key, args.warmup, args.concurrency, stream)
    counts0, rcpu0 = await redis_counts(redis)
    spy = profile(target, args, stream)
    cpu0, t0 = cpu_seconds(target.pid), time.perf_counter()
    busy = await load(target.url, target.key, args.requests, args.concurrency, stream)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(target.pid) - cpu0
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    counts1, rcpu1 = await redis_counts(redis)
    one = Sample()

    async def one_connection() -> None:
        nonlocal one
        one = await load(target.url, target.key, args.serial, 1, stream)

    row: dict[str, Any] = {}
    if target.metered:
        row.update(await redis_sample(redis, args.redis_url, one_connection, args.serial))
        calls = sum(counts1.values()) - sum(counts0.values())
        row["commands_per_req"] = calls / args.requests
        row["redis_cpu_us"] = 1e6 * (rcpu1 - rcpu0) / args.requests
    else:
        await one_connection()
    row.update(
        rps=args.requests / wall,
        cpu_us=1e6 * cpu / args.requests,
        p50_c16=1000 * statistics.median(busy.latencies),
        p99_c16=1000 * pct(busy.latencies, 0.99),
        p50_c1=1000 * statistics.median(one.latencies),
        p99_c1=1000 * pct(one.latencies, 0.99),
        ttfb_c1=1000 * statistics.median(one.first_byte) if stream else 0.0,
        chunk_c1=1000 * statistics.median(one.per_chunk) if stream else 0.0,
    )
    return row


def proxy_config(path: Path, redis_url: str, upstream_url: str, port: int, max_body: int | None = None) -> Path:
    """config.example.yaml on this Redis and upstream, with rate tiers that never bind."""
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    example.update(redis={"url": redis_url}, data_dir=str(path.with_suffix(".data")))
    example["server"].update(port=port, admin_port=free_port(), host="127.0.0.1")
    if max_body is not None:
        example["server"]["max_body_bytes"] = max_body
    example["upstreams"]["openai"].update(base_url=upstream_url + "/v1", api_key="sk-bench")
    example["rate_tiers"] = {"tiers": [{"name": "bench", "min_usd": "0", "rpm": 10**9, "tpm": 10**12}]}
    path.write_text(yaml.safe_dump(example))
    return path


async def funded_key(ledger: Ledger, account_id: str) -> str:
    await ledger.save_account(account_id, {}, create=True)
    await ledger.grant(account_id, GrantSpec("paid", 10**15, idem=account_id))
    _, key = await KeyStore(ledger.redis).create_key(account_id)
    return key


def start_proxy(
    config_file: Path, log_level: str, procs: list[subprocess.Popen[bytes]], tree: Path = ROOT, ablate: bool = False
) -> subprocess.Popen[bytes]:
    """The proxy (the code in `tree`), its log as in a container: unbuffered, into a pipe
    someone reads. `ablate`: without what bench/ablate/sitecustomize.py strips."""
    path = f"{ROOT / 'bench' / 'ablate'}:{tree}" if ablate else str(tree)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(config_file), "serve", "--log-level", log_level],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "METERING_BENCH_ABLATE": "1" if ablate else ""},
        cwd=tree,
    )
    procs.append(proxy)
    log = config_file.with_suffix(".log").open("wb")  # kept with the run's files
    procs.append(subprocess.Popen(["cat"], stdin=proxy.stdout, stdout=log))
    return proxy


def profile(target: Target, args: argparse.Namespace, stream: bool) -> subprocess.Popen[bytes] | None:
    """py-spy on the proxy under load (--py-spy DIR: collapsed stacks, one file per mode)."""
    if not (args.py_spy and target.metered):
        return None
    out = Path(args.py_spy) / f"proxy-{'stream' if stream else 'json'}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    argv = [str(spy), "record", "-p", str(target.pid), "-f", "raw", "-r", "400", "-o", str(out), "--nonblocking"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the load starts
    return proc


def start_litellm(binary: str, tmp: Path, upstream_url: str) -> tuple[subprocess.Popen[bytes], int]:
    """LiteLLM's proxy (no database, as NOTES.md describes) on the same fake upstream."""
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": upstream_url + "/v1",
                    "api_key": "sk-bench",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "router_settings": {"num_retries": 0, "disable_cooldowns": True},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen(
        [binary, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp,
    )
    return proc, port


# Loads as apps send them, CPU per request only: (name, request, stream, share of --requests)
REAL_LOADS = (
    ("JSON, an app's request (a 1.7k-token system prompt and 20 tools, the same every time)", APP_REQUEST, False, 2),
    # 100 tokens 1 ms apart, each its own network read, as a model streams them
    (
        "stream, 100 tokens 1 ms apart",
        {"max_tokens": 100, "metadata": {"bench_chunks": "100", "bench_delay_ms": "1"}},
        True,
        6,
    ),
)


async def measure_real_loads(target: Target, args: argparse.Namespace) -> dict[str, float]:
    """CPU per request (us) of each of REAL_LOADS, by its name."""
    cpu_us = {}
    for name, request, stream, share in REAL_LOADS:
        await load(target.url, target.key, args.warmup // share, args.concurrency, stream, request)
        requests = max(1, args.requests // share)
        cpu0 = cpu_seconds(target.pid)
        await load(target.url, target.key, requests, args.concurrency, stream, request)
        cpu_us[name] = 1e6 * (cpu_seconds(target.pid) - cpu0) / requests
    return cpu_us


def ratio_text(values: list[float]) -> str:
    """A CPU ratio; a smoke run's few requests may round to 0 clock ticks."""
    return f"{spread(values)}x" if max(values) < 1e6 else "n/a"


def med(rows: list[dict[str, Any]], name: str) -> float:
    return statistics.median(r[name] for r in rows)


def spread(values: list[float], digits: int = 2) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


def report(targets: list[Target], args: argparse.Namespace, redis_version: str) -> str:
    upstream, bare = targets[0], targets[1]
    lines = [
        f"{args.requests} requests per round at concurrency {args.concurrency}, {args.serial} at one connection,"
        f" {args.rounds} rounds; gpt-4o-mini, {TOKENS} output tokens; {redis_version}; medians over rounds"
        " (ratios: range over rounds)",
        "",
    ]
    for stream in (False, True):
        lines += [
            f"### {'stream' if stream else 'JSON'}",
            "",
            f"| target | req/s c={args.concurrency} | p50/p99 ms c={args.concurrency} | p50/p99 ms c=1"
            " | added p50 c=1 over A | CPU ms per 1k req | CPU vs B | peak RSS MB"
            + (" | TTFB ms c=1 | added TTFB over B | ms per chunk | added per chunk over B |" if stream else " |"),
            "|---" * (12 if stream else 8) + "|",
        ]
        for t in targets:
            rows, a_rows, b_rows = t.rows[stream], upstream.rows[stream], bare.rows[stream]
            ratio = [r["cpu_us"] / max(b["cpu_us"], 1e-9) for r, b in zip(rows, b_rows, strict=True)]
            added = [r["p50_c1"] - a["p50_c1"] for r, a in zip(rows, a_rows, strict=True)]
            cells = [
                t.name,
                f"{med(rows, 'rps'):.0f}",
                f"{med(rows, 'p50_c16'):.2f} / {med(rows, 'p99_c16'):.2f}",
                f"{med(rows, 'p50_c1'):.2f} / {med(rows, 'p99_c1'):.2f}",
                f"{spread(added)} ms",
                f"{med(rows, 'cpu_us'):.0f}",
                ratio_text(ratio),
                f"{memory.hwm_mb(t.pid):.0f}" if t.pid else "",
            ]
            if stream:
                ttfb = [r["ttfb_c1"] - b["ttfb_c1"] for r, b in zip(rows, b_rows, strict=True)]
                chunk = [r["chunk_c1"] - b["chunk_c1"] for r, b in zip(rows, b_rows, strict=True)]
                cells += [
                    f"{med(rows, 'ttfb_c1'):.2f}",
                    f"{spread(ttfb)} ms",
                    f"{med(rows, 'chunk_c1'):.3f}",
                    f"{spread(chunk, 3)} ms",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for t in (t for t in targets if t.metered):
            rows = t.rows[stream]
            scripts = {name for r in rows for name in r["script_us"]}
            per_script = ", ".join(
                f"{name} {spread([r['script_us'].get(name, 0) for r in rows], 0)} us" for name in sorted(scripts)
            )
            lines += [
                f"Redis per {t.name} request ({'stream' if stream else 'JSON'}):"
                f" {spread([r['redis_cpu_us'] for r in rows], 0)} us server CPU;"
                f" {spread([r['top_level_per_req'] for r in rows])} top-level commands"
                f" ({spread([r['commands_per_req'] for r in rows], 1)} counting those scripts ran);"
                f" script time: {per_script}",
                "",
            ]
    for name, *_ in REAL_LOADS:
        lines += [f"### {name}", "", "| target | CPU ms per 1k req | CPU vs B |", "|---|---|---|"]
        for t in targets[1:]:
            ratio = [c / max(b, 1e-9) for c, b in zip(t.cpu_us[name], bare.cpu_us[name], strict=True)]
            lines.append(f"| {t.name} | {statistics.median(t.cpu_us[name]):.0f} | {ratio_text(ratio)} |")
        lines.append("")
    return "\n".join(lines)


def write_docs(text: str, whole: bool) -> Path:
    """docs/benchmarks.md: the whole run, or (--rounds 0 --memory) only its memory section."""
    out = ROOT / "docs" / "benchmarks.md"
    if not whole and out.exists():
        kept = out.read_text().split(memory.HEADING)[0].rstrip("\n")
        text = kept + "\n\n" + text.lstrip("\n")
    else:
        text = (
            "# Benchmarks\n\nWritten by `make bench` (bench/bench.py) on the machine it ran on: compare"
            " ratios within one run, not absolute figures across machines.\n\n" + text
        )
    out.write_text(text.rstrip("\n") + "\n")
    return out.relative_to(ROOT)


async def main(args: argparse.Namespace) -> None:
    if args.smoke:
        args.requests, args.serial, args.warmup, args.rounds = 40, 10, 10, 1
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    redis_server = EmbeddedRedis(tmp / "redis")
    await redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    try:
        up_port, pass_port, proxy_port = free_port(), free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        upstream = spawn(str(ROOT / "bench" / "upstream.py"), "--port", str(up_port))
        passthrough = spawn(
            str(ROOT / "bench" / "passthrough.py"), "--port", str(pass_port), "--upstream", upstream_url + "/v1"
        )
        lean_port = free_port()
        lean = spawn(
            str(ROOT / "bench" / "passthrough.py"),
            *("--port", str(lean_port), "--upstream", upstream_url + "/v1", "--client", "http1"),
        )
        max_body = memory.BIG_BODY_LIMIT if args.memory else None  # the 10 MB prompts fit
        config_file = proxy_config(tmp / "config.yaml", redis_server.url, upstream_url, proxy_port, max_body)
        proxy = start_proxy(config_file, args.log_level, procs)
        if args.memory:  # one with the default body limit: what it answers a 10 MB prompt
            default_port = free_port()
            start_proxy(
                proxy_config(tmp / "default.yaml", redis_server.url, upstream_url, default_port), "warning", procs
            )
        compare = None
        if args.compare:  # another checkout of the proxy, on the same load, its own account
            compare_port = free_port()
            compare_config = proxy_config(tmp / "compare.yaml", redis_server.url, upstream_url, compare_port)
            compare = start_proxy(compare_config, args.log_level, procs, Path(args.compare))
        ablated = None
        if args.ablate:  # the proxy without its log, metrics, tokenizer and Redis I/O
            ablated_port = free_port()
            ablated_config = proxy_config(tmp / "ablated.yaml", redis_server.url, upstream_url, ablated_port)
            ablated = start_proxy(ablated_config, args.log_level, procs, ablate=True)
        litellm = start_litellm(args.litellm, tmp, upstream_url) if args.litellm else None
        for url in (
            f"{upstream_url}/v1/models",
            f"http://127.0.0.1:{pass_port}/",
            f"http://127.0.0.1:{lean_port}/",
            f"http://127.0.0.1:{proxy_port}/healthz",
            *([f"http://127.0.0.1:{compare_port}/healthz"] if compare else []),
            *([f"http://127.0.0.1:{ablated_port}/healthz"] if ablated else []),
            *([f"http://127.0.0.1:{default_port}/healthz"] if args.memory else []),
        ):
            await wait_up(url)
        if litellm is not None:
            procs.append(litellm[0])
            await wait_up(f"http://127.0.0.1:{litellm[1]}/health/liveliness", tries=600)  # ~6 s to start

        redis = connect(redis_server.url)
        args.redis_url = redis_server.url
        info = await redis.info("server")
        redis_version = f"{Path(server_binary()).name} {info.get('valkey_version') or info['redis_version']}"
        ledger = Ledger(redis, parse_config(config_file.read_text()))
        key = await funded_key(ledger, "bench")

        targets = [
            Target("A upstream (direct)", upstream_url, upstream.pid, key),
            Target("B bare aiohttp pass-through", f"http://127.0.0.1:{pass_port}", passthrough.pid, key),
            Target("B1 pass-through on http1.py", f"http://127.0.0.1:{lean_port}", lean.pid, key),
        ]
        if compare is not None:
            name = f"C0 metering-proxy ({Path(args.compare).name})"
            compare_key = await funded_key(ledger, "bench-compare")
            targets.append(Target(name, f"http://127.0.0.1:{compare_port}", compare.pid, compare_key, metered=True))
        targets.append(Target("C metering-proxy", f"http://127.0.0.1:{proxy_port}", proxy.pid, key, metered=True))
        if ablated is not None:
            ablated_key = await funded_key(ledger, "bench-ablated")
            targets.append(Target(ABLATED, f"http://127.0.0.1:{ablated_port}", ablated.pid, ablated_key))
        if litellm is not None:
            url = f"http://127.0.0.1:{litellm[1]}"
            targets.append(Target("D LiteLLM proxy", url, litellm[0].pid, LITELLM_KEY, external=True))
        for _ in range(args.rounds):
            for stream in (False, True):
                for target in targets:
                    row = await again_if_external(target, functools.partial(measure, target, args, stream, redis))
                    target.rows[stream].append(row)
            for target in targets[1:]:
                cpu = await again_if_external(target, functools.partial(measure_real_loads, target, args))
                for name, cpu_us in cpu.items():
                    target.cpu_us.setdefault(name, []).append(cpu_us)
        text = report(targets, args, redis_version) if args.rounds else ""
        if args.memory:
            plan = memory.Plan.smoke() if args.smoke else memory.Plan()
            if args.memory_checkpoints:
                plan.checkpoints = tuple(int(n) for n in args.memory_checkpoints.split(","))
            c, b = next(t for t in targets if t.name == "C metering-proxy"), targets[1]
            figures = await memory.measure(c, b, f"http://127.0.0.1:{default_port}", redis, load, plan)
            text += "\n" + memory.report(figures, plan, c.name, b.name)
        print(text)
        if not args.smoke and (args.rounds or args.memory):
            print(f"\nwrote {write_docs(text, whole=bool(args.rounds))}")
        await redis.aclose()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per target, round and mode, at --concurrency")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serial", type=int, default=300, help="requests at one connection (latency)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few requests, one round, nothing written (CI)")
    parser.add_argument("--log-level", default="info", help="the proxy's (info: one access line per request)")
    parser.add_argument("--compare", metavar="DIR", help="also measure the proxy of another checkout (e.g. main)")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the proxy under load (py-spy, collapsed stacks)")
    parser.add_argument(
        "--memory", action="store_true", help="also: RSS over 100k requests, 10 MB prompts, a long stream (minutes)"
    )
    parser.add_argument(
        "--memory-checkpoints", metavar="N,N,...", help="--memory: RSS after these counts (10000,50000,100000)"
    )
    parser.add_argument(
        "--ablate", action="store_true", help="also: the proxy without log, metrics, tokenizer and Redis I/O (C-)"
    )
    parser.add_argument("--litellm", metavar="BIN", help="also measure LiteLLM's proxy (path to its `litellm` command)")
    parsed = parser.parse_args()
    parsed.compare = parsed.compare and str(Path(parsed.compare).resolve())
    asyncio.run(main(parsed))
