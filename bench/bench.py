"""Benchmark: metering-proxy against a bare aiohttp pass-through and the upstream itself.

Everything runs on 127.0.0.1: a redis-server, the fake OpenAI upstream, the bare
pass-through and the proxy, each its own process. For each target it sends the same
bounded load (non-streamed and streamed chat) and prints throughput, latency
percentiles, the target process's CPU time per request (from /proc) and, for the
proxy, Redis commands per request (INFO commandstats).

    make bench            # or: .venv/bin/python bench/bench.py --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.app import connect  # noqa: E402
from proxy.configfile import parse_config  # noqa: E402
from proxy.embedded import EmbeddedRedis, free_port  # noqa: E402
from proxy.keys import KeyStore  # noqa: E402
from proxy.ledger import GrantSpec, Ledger  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


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


async def load(url: str, key: str, requests: int, concurrency: int, stream: bool) -> list[float]:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 16, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, (resp.status, await resp.text())
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def measure(
    name: str, url: str, pid: int, key: str, args: argparse.Namespace, stream: bool, redis: Any = None
) -> dict[str, Any]:
    await load(url, key, min(200, args.requests), args.concurrency, stream)  # warm up
    before = await redis_calls(redis) if redis is not None else {}
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    latencies = await load(url, key, args.requests, args.concurrency, stream)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    after = await redis_calls(redis) if redis is not None else {}
    latencies.sort()
    return {
        "redis_per_req": {
            k: ((n - before.get(k, (0, 0))[0]) / args.requests, (us - before.get(k, (0, 0))[1]) / args.requests)
            for k, (n, us) in after.items()
            if n != before.get(k, (0, 0))[0]
        },
        "target": name,
        "stream": stream,
        "rps": args.requests / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * len(latencies)) - 1],
        "cpu_us_per_req": 1e6 * cpu / args.requests,
    }


LITELLM_KEY = "sk-litellm-bench"


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


async def redis_calls(redis: Any) -> dict[str, tuple[int, int]]:
    """Command name -> (calls, microseconds), from Redis's own statistics."""
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


async def main(args: argparse.Namespace) -> None:
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
        upstream = spawn("-m", "proxy", "demo-upstream", "--port", str(up_port))
        passthrough = spawn(
            str(ROOT / "bench" / "passthrough.py"), "--port", str(pass_port), "--upstream", upstream_url + "/v1"
        )
        example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
        example.update(redis={"url": redis_server.url}, data_dir=str(tmp / "data"))
        example["server"].update(port=proxy_port, admin_port=free_port(), host="127.0.0.1")
        example["upstreams"]["openai"].update(base_url=upstream_url + "/v1", api_key="sk-bench")
        example["rate_tiers"] = {"tiers": [{"name": "bench", "min_usd": "0", "rpm": 10**9, "tpm": 10**12}]}
        config_file = tmp / "config.yaml"
        config_file.write_text(yaml.safe_dump(example))
        proxy = spawn("-m", "proxy", "--config", str(config_file), "serve", "--log-level", args.log_level)
        litellm = start_litellm(args.litellm, tmp, upstream_url) if args.litellm else None
        for url in (
            f"{upstream_url}/v1/models",
            f"http://127.0.0.1:{pass_port}/",
            f"http://127.0.0.1:{proxy_port}/healthz",
        ):
            await wait_up(url)
        if litellm is not None:
            procs.append(litellm[0])
            await wait_up(f"http://127.0.0.1:{litellm[1]}/health/liveliness", tries=600)  # ~6 s to start

        redis = connect(redis_server.url)
        ledger = Ledger(redis, parse_config(config_file.read_text()))
        await ledger.save_account("bench", {}, create=True)
        await ledger.grant("bench", GrantSpec("paid", 10**15, idem="bench"))
        _, key = await KeyStore(redis).create_key("bench")

        rows = []
        for stream in (False, True):
            rows.append(await measure("upstream (direct)", upstream_url, upstream.pid, key, args, stream))
            rows.append(
                await measure(
                    "bare aiohttp pass-through", f"http://127.0.0.1:{pass_port}", passthrough.pid, key, args, stream
                )
            )
            rows.append(
                await measure("metering-proxy", f"http://127.0.0.1:{proxy_port}", proxy.pid, key, args, stream, redis)
            )
            if litellm is not None:
                url = f"http://127.0.0.1:{litellm[1]}"
                rows.append(await measure("litellm proxy", url, litellm[0].pid, LITELLM_KEY, args, stream))
        print(f"\n{args.requests} requests, concurrency {args.concurrency}, gpt-4o-mini, max_tokens 16\n")
        print(f"{'target':28} {'stream':6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}")
        for row in rows:
            print(
                f"{row['target']:28} {row['stream']!s:6} {row['rps']:8.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
                f" {row['cpu_us_per_req']:11.0f}"
            )
        for stream in (False, True):
            base = next(r for r in rows if r["target"].startswith("bare") and r["stream"] == stream)
            mine = next(r for r in rows if r["target"] == "metering-proxy" and r["stream"] == stream)
            ratio = mine["cpu_us_per_req"] / base["cpu_us_per_req"]
            for other in (r for r in rows if r["target"] == "litellm proxy" and r["stream"] == stream):
                other_ratio = other["cpu_us_per_req"] / base["cpu_us_per_req"]
                print(f"\nstream={stream}: LiteLLM proxy CPU per request = {other_ratio:.1f}x the bare pass-through")
            redis_stats = mine["redis_per_req"]
            evalsha, zadd = redis_stats.get("evalsha", (0, 0)), redis_stats.get("zadd", (0, 0))
            print(
                f"\nstream={stream}: metering-proxy CPU per request = {ratio:.2f}x the bare pass-through;"
                f" per request Redis ran {evalsha[0]:.2f} scripts ({evalsha[1]:.0f} us) and {zadd[0]:.2f}"
                f" pipelined zadd ({zadd[1]:.1f} us)"
            )
        await redis.aclose()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="info", help="the proxy's (info: one access line per request)")
    parser.add_argument("--litellm", metavar="BIN", help="also measure LiteLLM's proxy (path to its `litellm` command)")
    asyncio.run(main(parser.parse_args()))
