"""The benchmark runs (a seconds-long smoke; no figure is asserted: they depend on the machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
ABLATED = "C- the same without log, metrics, tokenizer, Redis I/O"  # bench.py --ablate


def test_bench_smoke_prints_every_target_redis_and_memory_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--memory", "--ablate"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table, heading, mem = done.stdout.partition("## Memory, big prompts and long streams")
    assert table.count("| A upstream (direct) |") == 2, done.stdout  # JSON and stream
    for target in ("B bare aiohttp pass-through", "C metering-proxy", ABLATED):  # and the two apps' loads
        assert table.count(f"| {target} |") == 4, done.stdout
    assert "### JSON, an app's request" in table and "### stream, 100 tokens 1 ms apart" in table, done.stdout
    assert "top-level commands" in table and "admit" in table and "settle" in table
    # --memory (tiny counts): the RSS curve, the big prompts through C and B, a default
    # proxy's answer to 10 MB, the long stream through both
    assert heading and "| proxy RSS MB |" in mem and "| 0.1 MB parts |" in mem, done.stdout
    assert "a 10 MB text prompt gets 413 `request_too_large`" in mem, done.stdout
    assert "| B bare aiohttp pass-through | " in mem and "| C metering-proxy | " in mem, done.stdout


async def test_a_dropped_connection_measures_an_external_target_again_and_fails_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench

    attempts: list[int] = []

    async def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise aiohttp.ServerDisconnectedError()
        return len(attempts)

    litellm = bench.Target("D LiteLLM proxy", "http://127.0.0.1:1", 0, "k", external=True)
    assert await bench.again_if_external(litellm, flaky) == 2
    attempts.clear()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await bench.again_if_external(bench.Target("C metering-proxy", "http://127.0.0.1:1", 0, "k"), flaky)
    assert len(attempts) == 1
