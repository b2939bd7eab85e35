"""What people see from the CLI: tables from the API's shapes, a progress bar only on a
terminal, and no traceback when the reader of the output goes away (`| head`). The last
two run the real command in a child process, on a pseudo-terminal and on a pipe."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from pathlib import Path

import yaml
from redis.asyncio import Redis

from proxy import output
from proxy.configfile import load_config
from proxy.embedded import EmbeddedRedis
from proxy.ledger import GrantSpec, Ledger

from .conftest import BASE_CONFIG, deep_merge


def test_a_mapping_is_aligned_lines_and_its_lists_are_tables() -> None:
    text = output.render({
        "account_id": "acme",
        "balance_usd": "12.500000",
        "rate_limits": {"rpm": 3, "tpm": 40000},
        "metadata": {},
        "grants": [{"id": "g1", "kind": "paid", "expires_at": None}, {"id": "g2", "kind": "promotional",
                                                                      "description": "x" * 60}],
    })  # fmt: skip
    assert text.splitlines() == [
        "account_id       acme",
        "balance_usd      12.500000",
        "rate_limits.rpm  3",
        "rate_limits.tpm  40000",
        "metadata         -",
        "",
        "grants:",
        "ID  KIND         EXPIRES_AT  DESCRIPTION",
        "g1  paid         -           -",
        "g2  promotional  -           " + "x" * 47 + "…",  # cut in a table, whole under --json
    ]


def test_a_list_page_is_its_table_with_chosen_columns() -> None:
    page = {"object": "list", "data": [{"id": "a", "balance_usd": "1.000000", "extra": 1}], "next_cursor": None}
    assert output.render(page, ["id", "balance_usd"]).splitlines() == [
        "next_cursor  -",
        "",
        "data:",
        "ID  BALANCE_USD",
        "a   1.000000",
    ]
    assert output.render({"object": "list", "data": []}) == "data  (none)\n"


def write_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE_CONFIG, {"redis": {"url": redis_url},
                                                            "data_dir": str(tmp_path / "data")})))  # fmt: skip
    return path


def cli(config: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "--config", str(config), *argv]


async def test_progress_bar_on_a_terminal_only(tmp_path: Path, redis_server: EmbeddedRedis, redis: Redis) -> None:
    config = write_config(tmp_path, redis_server.url)
    ledger = Ledger(redis, load_config(config))
    for name in ("a", "b", "c"):
        await ledger.save_account(name, {}, create=True)
    code, out, drawn = await asyncio.to_thread(on_a_terminal, cli(config, "reconcile"))
    assert code == 0 and out == b"ok: 3 accounts\n"  # stdout: the result only
    assert b"reconcile [" in drawn and b"] 3/3" in drawn and drawn.endswith(b"\r\x1b[K")

    piped = await asyncio.to_thread(subprocess.run, cli(config, "reconcile"), capture_output=True, timeout=30)
    assert piped.returncode == 0 and piped.stderr == b""  # not a terminal: no bar


async def test_a_reader_that_goes_away_gets_no_traceback(
    tmp_path: Path, redis_server: EmbeddedRedis, redis: Redis
) -> None:
    config = write_config(tmp_path, redis_server.url)
    ledger = Ledger(redis, load_config(config))
    await ledger.save_account("acme", {}, create=True)
    for i in range(1000):  # ~120 KB: more than a pipe holds (64 KB)
        await ledger.grant("acme", GrantSpec("paid", 1_000_000, description=f"grant {i}"))
    for argv in (("ledger", "list", "acme", "--limit", "1000"), ("ledger", "export", "acme", "--format", "csv")):
        first, code, err = await asyncio.to_thread(read_a_little, cli(config, *argv))
        assert first and code == 141 and err == b"", (argv, code, err.decode())


def on_a_terminal(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal: (exit code, stdout, what stderr drew)."""
    leader, follower = pty.openpty()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    out, _ = child.communicate(timeout=30)
    return child.returncode, out, drawn


def read_a_little(argv: list[str]) -> tuple[bytes, int, bytes]:
    """What `cmd | head -c 100` does: read a little, then go away. (read, exit code, stderr)"""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert child.stdout is not None and child.stderr is not None
    first = child.stdout.read(100)
    child.stdout.close()
    err = child.stderr.read()
    return first, child.wait(30), err
