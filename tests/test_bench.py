"""The benchmark runs (a seconds-long smoke; no figure is asserted: they depend on the machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_prints_every_target_and_redis_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for target in ("A upstream (direct)", "B bare aiohttp pass-through", "C metering-proxy"):
        assert done.stdout.count(f"| {target} |") == 2, done.stdout  # JSON and stream
    assert "top-level commands" in done.stdout and "admit" in done.stdout and "settle" in done.stdout
