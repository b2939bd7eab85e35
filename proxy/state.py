"""What the listeners share: the current config and the services built from it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from redis.asyncio import Redis

from .catalog import Catalog
from .config import Config
from .journal import Journal
from .keys import KeyCache, KeyStore
from .ledger import Checkpoint, Ledger
from .upstream import Upstream


class InFlight(Protocol):
    """A request this instance holds a reservation for (meter.Meter)."""

    account_id: str

    def checkpoint(self, *, changed_only: bool) -> Checkpoint | None: ...

    def checkpointed(self) -> None: ...


@dataclass
class State:
    config: Config
    redis: Redis
    ledger: Ledger
    key_store: KeyStore
    keys: KeyCache
    catalog: Catalog
    upstream: Upstream
    journal: Journal | None = None  # None: settlements retry Redis until it answers
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # request id -> the request: reservations this instance holds (checkpointed by app.py)
    inflight: dict[str, InFlight] = field(default_factory=dict)
    draining: bool = False  # stopping: /readyz answers 503, the client listener takes no new connection

    def use_config(self, config: Config, catalog: Catalog) -> None:
        """Swap in a reloaded config; requests in flight keep the objects they hold."""
        self.catalog = catalog
        self.ledger.use_config(config)
        self.config = config

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if its request is cancelled (kept referenced)."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


STATE = web.AppKey("state", State)
