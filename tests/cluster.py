"""A real 3-master Redis Cluster on loopback, for the tests of `redis.cluster: true`.

Three redis-server children (the binary the embedded Redis uses) with cluster mode on,
the 16384 slots split in three ranges with CLUSTER ADDSLOTS, joined by CLUSTER MEET.
Ready when every node says `cluster_state:ok` and knows every slot and node.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.embedded import _die_with_parent, server_binary

from .helpers import suite_server

SLOTS = 16384
MASTERS = 3
ADDSLOTS_BATCH = 2048  # Redis 6.2 has no CLUSTER ADDSLOTSRANGE
BUS_OFFSET = 10_000  # Redis 6.2 always listens for the cluster bus on port + 10000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Free ports whose bus ports (port + 10000) are free too; low enough for both to fit."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20_000, 30_000)
        if port not in ports and _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


def slot_ranges(masters: int = MASTERS) -> list[range]:
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [range(low, high) for low, high in itertools.pairwise(bounds)]


class LocalCluster:
    def __init__(self, root: Path, masters: int = MASTERS, node_timeout_ms: int = 5000) -> None:
        self.root = root
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(masters)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"  # any node: the client discovers the rest

    async def start(self, timeout_s: float = 15.0) -> str:
        binary = suite_server() or server_binary()
        for port in self.ports:
            node_dir = self.root / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(node_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "no", "--save", "",
                    "--daemonize", "no", "--logfile", "redis.log"]  # fmt: skip
            # spawning returns at once; readiness is awaited below without blocking
            process = subprocess.Popen(  # noqa: ASYNC220
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
            self.processes.append(process)
        nodes = [Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2) for port in self.ports]
        try:
            async with asyncio.timeout(timeout_s):
                for node in nodes:
                    await self._ping(node)
                for node, slots in zip(nodes, slot_ranges(len(nodes)), strict=True):
                    for low in range(slots.start, slots.stop, ADDSLOTS_BATCH):
                        batch = range(low, min(low + ADDSLOTS_BATCH, slots.stop))
                        await node.execute_command("CLUSTER ADDSLOTS", *batch)
                for port in self.ports[1:]:
                    await nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
                for node in nodes:
                    await self._converged(node)
        except BaseException:
            self.stop()
            raise
        finally:
            for node in nodes:
                await node.aclose()
        return self.url

    async def _ping(self, node: Redis) -> None:
        while True:
            self._check_alive()
            try:
                if await node.ping():
                    return
            except Exception:  # not listening yet
                pass
            await asyncio.sleep(0.02)  # polling a child process's readiness

    async def _converged(self, node: Redis) -> None:
        """Bounded by the caller's timeout: gossip spreads the slots in about a second."""
        while True:
            self._check_alive()
            info = await node.execute_command("CLUSTER INFO")
            if (
                info.get("cluster_state") == "ok"
                and int(info.get("cluster_slots_ok", 0)) == SLOTS
                and int(info.get("cluster_known_nodes", 0)) == len(self.ports)
            ):
                return
            await asyncio.sleep(0.05)  # polling the cluster's own convergence

    def _check_alive(self) -> None:
        for port, process in zip(self.ports, self.processes, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.root / f'node-{port}' / 'redis.log'}")

    def kill_node(self, index: int) -> None:
        """A master dies: its slots go unserved; after node_timeout_ms the cluster is down."""
        self.processes[index].kill()
        self.processes[index].wait()

    async def wait_state(self, index: int, state: str, timeout_s: float = 10.0) -> None:
        """Until node `index` reports `cluster_state:<state>` (bounded)."""
        node = Redis(host="127.0.0.1", port=self.ports[index], decode_responses=True, socket_timeout=2)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    info = await node.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") == state:
                        return
                    await asyncio.sleep(0.05)  # polling the cluster's failure detection
        finally:
            await node.aclose()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


@pytest.fixture(scope="session")
async def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalCluster]:
    """A running 3-master cluster; `.url` is one node's URL (db 0: a cluster has no other)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    await cluster.start()
    yield cluster
    cluster.stop()
