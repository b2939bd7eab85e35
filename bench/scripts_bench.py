"""Redis's side alone: the admission and settlement scripts of metered requests, run
back to back against an embedded Redis, with the server's CPU per request (INFO cpu)
and each script's share (INFO commandstats). The rate window starts full (a bucket in
each of the last 59 seconds, its running sums first), as it is under steady load.

    .venv/bin/python bench/scripts_bench.py --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import keyspace  # noqa: E402
from proxy.app import connect  # noqa: E402
from proxy.configfile import parse_config  # noqa: E402
from proxy.embedded import EmbeddedRedis  # noqa: E402
from proxy.keys import KeyStore  # noqa: E402
from proxy.ledger import GrantSpec, Ledger, SettleCall  # noqa: E402
from proxy.resp import RespClient  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mp-scripts-bench-"))
    server = EmbeddedRedis(tmp / "redis")
    await server.start()
    try:
        example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
        example.update(redis={"url": server.url}, data_dir=str(tmp / "data"))
        example["rate_tiers"] = {"tiers": [{"name": "bench", "min_usd": "0", "rpm": 10**9, "tpm": 10**12}]}
        config = parse_config(yaml.safe_dump(example))
        redis = connect(server.url)
        fast = RespClient(server.url)
        ledger = Ledger(redis, config, fast=fast)
        await ledger.save_account("bench", {}, create=True)
        await ledger.grant("bench", GrantSpec("paid", 10**15, idem="bench"))
        settings = {"limit": str(10**14), "reset": "daily", "rpm": 10**9} if args.key_limits else None
        record, _ = await KeyStore(redis).create_key("bench", settings=settings)
        key_id = record.key_id
        seconds, _ = await redis.time()
        now = int(seconds)
        # A full minute behind us, as a window under steady load holds it (lua/lib/windows.lua):
        # its running sums first (written when it began, the buckets since after them), then
        # a bucket in each of the last 59 seconds.
        buckets = {f"{kind}:{sec}": n for sec in range(now - 59, now) for kind, n in (("r", 30), ("t", 900))}
        for window in (keyspace.account("bench", "rl"), keyspace.key_window("bench", key_id)):
            await redis.hset(window, mapping={"R:0": 30 * 59, "T:0": 900 * 59, "P:0": now - 60, "O:0": now - 59})
            await redis.hset(window, mapping=buckets)

        async def one(i: int) -> None:
            req = f"req_{i}"
            await admit(req)
            await settle(req)

        async def admit(req: str) -> None:
            await ledger.admit("bench", key_id, "gpt-4o-mini", req, prompt_cost=10, output_cost=100,
                               output_pico=150_000, prompt_tokens=14, max_output_tokens=16, choices=1)  # fmt: skip

        async def settle(req: str) -> None:
            entry = {"model": "gpt-4o-mini", "key_id": key_id, "usage": {"input_tokens": 14, "output_tokens": 16}}
            await ledger.settle(SettleCall("bench", "gpt-4o-mini", req, Decimal("11.7"), 30, entry))

        async def batch(start: int, n: int, step: Any = one) -> None:
            queue = iter(range(start, start + n))

            async def worker() -> None:
                for i in queue:
                    await (step(i) if step is one else step(f"req_{i}"))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        await batch(0, 500)  # warm up
        await redis.config_resetstat()
        cpu0 = await redis.info("cpu")
        t0 = time.perf_counter()
        await batch(10_000, args.requests)
        wall = time.perf_counter() - t0
        cpu1, stats = await redis.info("cpu"), await redis.info("commandstats")
        used = sum(float(cpu1[k]) - float(cpu0[k]) for k in ("used_cpu_user", "used_cpu_sys"))
        print(f"{args.requests} metered requests (admit + settle), concurrency {args.concurrency}: {wall:.1f} s")
        print(f"Redis server CPU per request: {1e6 * used / args.requests:.0f} us")
        for name, step in (("admit", admit), ("settle", settle)):  # each script alone
            calls0 = await redis.info("commandstats")
            await batch(100_000, args.requests, step)
            calls1 = await redis.info("commandstats")
            us = sum(int(v["usec"]) for v in calls1.values()) - sum(int(v["usec"]) for v in calls0.values())
            print(f"  {name}.lua alone: {us / args.requests:.0f} us per call (commandstats, scripts' own commands in)")
        for name, v in sorted(stats.items(), key=lambda kv: -int(kv[1]["usec"])):
            calls = int(v["calls"])
            print(f"  {name.removeprefix('cmdstat_'):14} {calls / args.requests:6.2f} per request"
                  f" {int(v['usec']) / args.requests:7.1f} us per request")  # fmt: skip
        await fast.aclose()
        await redis.aclose()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--key-limits", action="store_true", help="the key with a spend limit and its own RPM")
    asyncio.run(main(parser.parse_args()))
