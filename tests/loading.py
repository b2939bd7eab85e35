"""A Redis that restarts with a large dataset, on demand, for the tests of `-LOADING`.

A TCP stand-in in front of a real redis-server: normally it relays bytes both ways;
while `loading`, it answers every command with the reply Redis itself gives while it
loads its dataset. Switching drops every open connection, as a restart does. The
commands it refused are recorded, so a test can wait for the one it expects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import hiredis

LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"
Command = list[str]


class RestartingRedis:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loading = False
        self.refused: list[Command] = []
        self._changed = asyncio.Condition()
        self._clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._drop_clients()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def set_loading(self, loading: bool) -> None:
        self.loading = loading
        self._drop_clients()

    async def refusal(self, matches: Callable[[Command], bool], timeout_s: float = 10) -> Command:
        """Block until a command that `matches` was answered with LOADING."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: any(matches(c) for c in self.refused))
        return next(c for c in self.refused if matches(c))

    def _drop_clients(self) -> None:
        for writer in list(self._clients):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            await (self._refuse(reader, writer) if self.loading else self._relay(reader, writer))
        except (ConnectionError, OSError):
            pass  # dropped by a switch, or the client hung up
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        commands = hiredis.Reader(encoding="utf-8", errors="replace")  # requests are RESP arrays too
        while data := await reader.read(65536):
            commands.feed(data)
            while (command := commands.gets()) is not False:
                writer.write(LOADING)
                async with self._changed:
                    self.refused.append(command)
                    self._changed.notify_all()
            await writer.drain()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pumps = [asyncio.create_task(_pump(reader, up_writer)), asyncio.create_task(_pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            up_writer.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
